"""The memory report of a run: ``memory.csv`` joined with the phase events, summarised per GPU and phase, plotted
(:mod:`yolosafe.readers.memplot`).

Each NVML sample is given the phase and epoch of its GPU at that moment (the latest event of the rank on that GPU
at or before the sample, within the same attempt: :func:`yolosafe.supervisor.watch.phase_after`), so a validation
peak on one
GPU is attributed to validation on that GPU, whatever the other GPUs were doing. torch's own peaks (from the ranks'
end events) stand next to NVML's view: NVML's "this run" minus torch's reserved is the CUDA context and non-PyTorch
memory; torch's reserved minus allocated is the allocator's cache and fragmentation.

``yolosafe train`` writes the report when it ends; ``yolosafe report RUN_DIR`` writes it again. pandas and
matplotlib are imported inside the functions: the CLI must start without them.

A multi-node run has each node's samples and events in that node's own files (``memory-node1.csv``...): every
function takes the node's :class:`~yolosafe.rundir.layout.RunDir`, each node is summarised on its own (its GPUs are
its own, numbered as on that machine), and ``yolosafe report`` merges them: node 0's summary with the others' under
``nodes``, one plot per node.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yolosafe.errors import YolosafeError
from yolosafe.gpus import nvml_index
from yolosafe.readers import memplot
from yolosafe.rundir import files as rundir
from yolosafe.rundir import records
from yolosafe.rundir.events import event_gpus, phase_after
from yolosafe.rundir.layout import RunDir
from yolosafe.rundir.records import VAL_PHASES

if TYPE_CHECKING:
    import pandas as pd

class NoMemoryData(YolosafeError):
    """The run has no memory samples; the message says why, in one line."""


def _story(run: RunDir) -> dict[str, Any]:
    """The story as a dict; empty when it is missing or damaged (the memory data still reads)."""
    try:
        story = rundir.read_json(run.story)
    except (OSError, ValueError):
        return {}
    return story if isinstance(story, dict) else {}


def outcome(run: RunDir | Path) -> str:
    """The run's outcome as its story says; "unknown" when the story is damaged."""
    value = _story(RunDir.of(run)).get("outcome")
    return value if isinstance(value, str) else "unknown"


def epochs(run: RunDir | Path) -> int | None:
    """The run's epochs as its story's plan says (None when unknown)."""
    value = (_story(RunDir.of(run)).get("plan") or {}).get("epochs")
    return value if isinstance(value, int) else None


def hangs(run: RunDir | Path) -> list[records.Hang]:
    """Every hang the supervisors' hang watches recorded (every node, every attempt); a damaged record is skipped."""
    found = []
    for path in RunDir.of(run).hangs():
        try:
            record = records.load_hang(path)
        except records.RecordError:
            continue
        record.extra["file"] = str(path)
        found.append(record)
    return sorted(found, key=lambda h: (h.attempt or 0, h.node or 0))


def hang_line(hang: records.Hang, epochs: int | None = None) -> str:
    """One hang as report and doctor show it: attempt, stuck rank, phase, for how long, frame, and the stacks."""
    who = "the worker" if (hang.rank or 0) < 0 else f"rank {hang.rank}"
    node = f" of node {hang.node}" if hang.node else ""
    how = "stopped (SIGSTOP)" if hang.stopped else "stuck"
    batch = f", batch {hang.iteration}" if hang.iteration is not None else ""
    frame = f" in {hang.frame}" if hang.frame else ""
    waiting = f"; waiting for it in a collective: ranks {', '.join(map(str, hang.waiting))}" if hang.waiting else ""
    stacks = ", ".join([*(hang.stacks or []), *(hang.native or [])]) or "none written"
    return (f"attempt {hang.attempt}: hang: {who}{node} {how} in {hang.phase} at "
            f"{records.epoch_label(hang.epoch, epochs)}{batch}, for {hang.stuck_s:g} s (timeout {hang.timeout_s:g} s, "
            f"{hang.timeout_source}){frame}{waiting}; stacks: {stacks}")


def stragglers(run: RunDir | Path) -> list[str]:
    """The straggler warnings of the run, as the supervisor said them."""
    found = _story(RunDir.of(run)).get("stragglers") or []
    return [str(s.get("message")) for s in found if isinstance(s, dict) and s.get("message")]


def plan_gpus(run: RunDir) -> list[int]:
    if run.node:
        gpus = (_story(run).get("plan") or {}).get("gpus") or []
        return [g for g in gpus if isinstance(g, int)]
    try:
        return records.load_story(run).plan_gpus
    except records.RecordError as exc:
        raise NoMemoryData(f"the run's GPUs are unknown: {exc}") from None


def events(run: RunDir) -> list[dict[str, Any]]:
    return [e for e in rundir.read_jsonl(run.events) if e.get("attempt") is not None and "t" in e]


def load(run: RunDir) -> pd.DataFrame:
    """The samples of ``memory.csv`` with ``phase`` and ``epoch`` columns; raises :class:`NoMemoryData`."""
    import pandas as pd

    path = run.memory_csv
    if not path.is_file():
        raise NoMemoryData(f"no {path.name}: the watch was off (--watch-interval 0), the run trained on the "
                           "CPU, or it predates the memory watch")
    try:
        samples = pd.read_csv(path, on_bad_lines="skip")
    except pd.errors.EmptyDataError:
        samples = pd.DataFrame()
    except (UnicodeDecodeError, pd.errors.ParserError, ValueError) as exc:  # binary, or not a table
        raise NoMemoryData(f"{path.name} is not the memory watch's table ({type(exc).__name__})") from None
    if not samples.empty:  # a last line cut short by a killed supervisor has missing fields: drop it
        try:
            samples = samples.dropna(subset=["t", "attempt", "gpu", "used_mib"])
            samples = samples.astype({"t": float, "attempt": "int64", "gpu": "int64"})
        except (KeyError, ValueError, TypeError) as exc:  # columns missing or not numbers
            raise NoMemoryData(f"{path.name} is not the memory watch's table ({type(exc).__name__}: "
                               f"{str(exc)[:120]})") from None
        samples = samples.drop(columns=["phase", "epoch"], errors="ignore")  # joined again below, from all events
    if samples.empty:
        raise NoMemoryData(f"{path.name} has no samples: the worker ended before the first one")
    gpus = plan_gpus(run)
    rows = [{"t": e["t"], "attempt": e["attempt"], "gpu": gpu, "phase": phase_after(e), "epoch": e.get("epoch")}
            for e in events(run) for gpu in event_gpus(e, gpus)]
    phases = pd.DataFrame(rows, columns=["t", "attempt", "gpu", "phase", "epoch"]).astype(
        {"t": float, "attempt": "int64", "gpu": "int64"})
    joined = pd.merge_asof(samples.sort_values("t"), phases.sort_values("t"), on="t", by=["attempt", "gpu"],
                           direction="backward")
    joined["phase"] = joined["phase"].fillna("other")  # before the attempt's first event: setup
    return joined


def torch_peaks(run: RunDir) -> dict[tuple[int, str], dict[str, float]]:
    """torch's peak allocated and reserved MiB per (GPU, phase), from the end events of every rank (GPU only)."""
    gpus = plan_gpus(run)
    found: dict[tuple[int, str], dict[str, float]] = {}
    for event in events(run):
        if event.get("max_reserved_mib") is None:
            continue
        for gpu in event_gpus(event, gpus):
            peaks = found.setdefault((gpu, str(event.get("phase"))), {})
            for key in ("max_allocated_mib", "max_reserved_mib"):
                peaks[key] = max(peaks.get(key, 0.0), float(event[key] or 0.0))
    return found


def ooms(run: RunDir) -> list[dict[str, Any]]:
    """The OOMs of the run (on the node's ranks), each with the GPU it hit (NVML index) where the record tells,
    and ``recovered`` ("in_place") for a validation OOM the rank went on from with half its validation batch."""
    gpus = plan_gpus(run)
    nproc = max(len(gpus), 1) if int((_story(run).get("plan") or {}).get("nnodes") or 1) > 1 else None
    found = []
    for record in records.load_failures(run):  # attempt, then rank, in numeric order
        rank = max(int(record.rank or 0), 0)
        if not record.oom or (nproc is not None and rank // nproc != run.node):  # another node's rank
            continue
        index = record.gpu
        if index is None and record.rank is not None and gpus:
            index = rank % nproc if nproc else rank
        found.append({"t": record.t, "attempt": record.attempt, "phase": record.phase, "epoch": record.epoch,
                      "rank": record.rank, "gpu": nvml_index(gpus, index),
                      **({"recovered": record.recovered, "val_batch": record.val_batch} if record.recovered else {})})
    return found


def near_misses(run: RunDir) -> list[dict[str, Any]]:
    """The training steps that ran out of memory in Ultralytics' assigner and went on, one image at a time (its
    ``assigner_oom`` events): batch, ``max_num_obj``, where."""
    keys = ("t", "attempt", "epoch", "iteration", "rank", "gpu", "batch", "max_num_obj")
    return [{k: e.get(k) for k in keys} for e in events(run) if e.get("event") == "assigner_oom"]


def _num(value: Any, digits: int = 1) -> float | None:
    """A JSON-safe rounded number: None for a missing figure (None or NaN)."""
    return None if value is None or math.isnan(value) else round(float(value), digits)


def summarize(run: RunDir, samples: pd.DataFrame) -> dict[str, Any]:
    """Per GPU and phase: the peak of used memory (and when), this run's and others' memory, torch's peaks."""
    story = _story(run)
    peaks = torch_peaks(run)
    gpus: dict[str, Any] = {}
    for gpu, rows in samples.groupby("gpu"):
        total = rows["total_mib"].max()
        phases = {}
        for phase, part in rows.groupby("phase"):
            top = part.loc[part["used_mib"].idxmax()]
            allocator = peaks.get((int(gpu), str(phase)), {})
            reserved, allocated = allocator.get("max_reserved_mib"), allocator.get("max_allocated_mib")
            phases[str(phase)] = {
                "peak_used_mib": _num(top["used_mib"]),
                "peak_used_share": _num(top["used_mib"] / total, 4) if total else None,
                "headroom_mib": _num(total - top["used_mib"]),
                "epoch_of_peak": None if _num(top["epoch"]) is None else int(top["epoch"]),
                "attempt_of_peak": int(top["attempt"]),
                "t_of_peak": round(float(top["t"]), 3),
                "ours_at_peak_mib": _num(top["ours_mib"]),
                "others_at_peak_mib": _num(top["others_mib"]),
                "peak_ours_mib": _num(part["ours_mib"].max()),
                "peak_others_mib": _num(part["others_mib"].max()),
                "torch_max_allocated_mib": _num(allocated),
                "torch_max_reserved_mib": _num(reserved),
                "torch_reserved_minus_allocated_mib": _num(reserved - allocated) if allocator else None,
                "samples": len(part),
            }
        gpus[str(gpu)] = {
            "total_mib": _num(total),
            "peak_used_mib": _num(rows["used_mib"].max()),
            "headroom_mib": _num(total - rows["used_mib"].max()),
            "peak_others_mib": _num(rows["others_mib"].max()),
            "phases": phases,
        }
    watch = story.get("memory_watch") or {}  # a killed run's story holds null
    return {
        "run_dir": str(run.path.resolve()),
        "interval_s": watch.get("interval_s"),
        "warn_at": watch.get("warn_at"),
        "samples": len(samples),
        "attempts": sorted(int(a) for a in samples["attempt"].unique()),
        "gpus": gpus,
        "warnings": watch.get("warnings", []),
        "ooms": ooms(run),
        **({"near_misses": found} if (found := near_misses(run)) else {}),
    }


def write_node(run: RunDir) -> dict[str, Any]:
    """Join, summarise, write the node's ``memory_summary.json`` and ``memory.png``; raises :class:`NoMemoryData`."""
    samples = load(run)
    summary = summarize(run, samples)
    rundir.write_json(run.memory_summary, summary)
    memplot.plot(run, samples, summary, events(run))
    return summary


def write(where: RunDir | str | os.PathLike[str]) -> dict[str, Any]:
    """The report of one node (a :class:`RunDir`: the end of its ``yolosafe train``), or of every node that kept files
    in a directory (a path: ``yolosafe report``): node 0's summary, the others' under ``nodes``; raises
    :class:`NoMemoryData` when no node has samples."""
    one = isinstance(where, RunDir)
    found: dict[int, dict[str, Any]] = {}
    missing: list[str] = []
    for run in [where] if isinstance(where, RunDir) else RunDir.of(where).nodes():
        try:
            found[run.node] = write_node(run)
        except NoMemoryData as exc:
            missing.append(f"node {run.node}: {exc}" if run.node else str(exc))
    if not found:
        raise NoMemoryData("; ".join(missing))
    first = min(found)
    if len(found) == 1 and (one or first == 0):
        return found[first]
    summary = {**found[first], "nodes": {str(n): s for n, s in found.items() if n != first}}
    summary["node"] = first
    rundir.write_json(RunDir.of(where).on_node(0).memory_summary, summary)
    return summary


def _gib(mib: float | None) -> str:
    return "?" if mib is None else f"{mib / 1024:.1f} GiB"


def _peak(phases: dict[str, Any], names: tuple[str, ...]) -> str:
    found = [phases[n] for n in names if n in phases]
    if not found:
        return "-"
    top = max(found, key=lambda p: p["peak_used_mib"] or 0)
    share = f" {top['peak_used_share']:.0%}" if top["peak_used_share"] is not None else ""
    epoch = f" e{top['epoch_of_peak'] + 1}" if top["epoch_of_peak"] is not None else ""  # 1-based, as shown
    return f"{_gib(top['peak_used_mib'])}{share}{epoch}"


def table(summary: dict[str, Any]) -> list[str]:
    """GPU x (train peak, val peak, headroom, other processes): the lines ``yolosafe train`` ends with.

    Columns that mean nothing are left out (no other processes on any GPU, no validation), and GPUs whose samples are
    all zero (fake GPUs while the training ran on the CPU) get one note instead of rows of zeros.
    """
    gpus = sorted(summary["gpus"].items(), key=lambda item: int(item[0]))
    measured = [(gpu, info) for gpu, info in gpus if info.get("peak_used_mib")]
    idle = [gpu for gpu, info in gpus if not info.get("peak_used_mib")]
    others = any(info.get("peak_others_mib") for _, info in measured)
    val = any(set(info["phases"]) & set(VAL_PHASES) for _, info in measured)
    lines = [f"node {summary['node']}:"] if "nodes" in summary else []
    if measured:
        lines.append(f"{'GPU':>3}  {'total':>9}  {'train peak':>20}" + (f"  {'val peak':>20}" if val else "")
                     + f"  {'headroom':>9}" + (f"  {'others':>9}" if others else ""))
    for gpu, info in measured:
        phases = info["phases"]
        lines.append(f"{gpu:>3}  {_gib(info['total_mib']):>9}  {_peak(phases, ('train',)):>20}"
                     + (f"  {_peak(phases, VAL_PHASES):>20}" if val else "") + f"  {_gib(info['headroom_mib']):>9}"
                     + (f"  {_gib(info['peak_others_mib']):>9}" if others else ""))
    if idle:
        lines.append(f"GPU {', '.join(idle)}: no memory in use in any sample (fake GPUs while the training ran on the "
                     "CPU, or idle ones): no peaks to show")
    for node, part in sorted(summary.get("nodes", {}).items(), key=lambda item: int(item[0])):
        lines += [f"node {node}:", *table(part)]  # the other nodes of a multi-node run, each its own GPUs
    return lines
