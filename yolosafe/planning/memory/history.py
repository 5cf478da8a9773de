"""This machine's own runs: predicted against measured peaks, and the per-GPU-type correction learned from them.

After each run yolosafe appends one line per phase to ``memory_history.jsonl`` in its cache directory
(``$YOLOSAFE_CACHE`` or ``~/.cache/yolosafe``): model, imgsz, batch, AMP, GPU name, torch and driver versions, the
predicted peak (from ``yolosafe.json``'s ``memory_plan``) and the measured one (NVML peak of the run's own processes,
from ``memory_summary.json``). The memory model multiplies its predicted peak by the median ratio of measured to
(uncalibrated) predicted for the same GPU name, shrunk toward 1 while there are few runs (n / (n + 1) of the way),
so one odd run cannot swing the next plan far.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

from yolosafe.planning import datasets
from yolosafe.rundir import files as rundir
from yolosafe.rundir.layout import RunDir

HISTORY_FILE = "memory_history.jsonl"
PHASES = MappingProxyType({"train": ("train",), "val": ("val", "final")})


def history_path() -> Path:
    return datasets.cache_dir() / HISTORY_FILE


def measured_peaks(summary: dict[str, Any], gpu: str) -> dict[str, float]:
    """The run's own NVML peak per phase on one GPU (MiB), from ``memory_summary.json``."""
    phases = summary.get("gpus", {}).get(gpu, {}).get("phases", {})
    found = {}
    for phase, names in PHASES.items():
        values = [phases[n].get("peak_ours_mib") for n in names if n in phases]
        values = [v for v in values if v]
        if values:
            found[phase] = max(values)
    return found


def near_misses(run_dir: RunDir | Path, plan_gpus: list[Any]) -> dict[tuple[int, str], int]:
    """Per (GPU, phase): the OOMs the run went on from without a relaunch: validation OOMs a rank recovered in
    place (its ``recovered`` failure records) and the assigner's fallbacks in training (``assigner_oom`` events).
    Their ``gpu`` is the position in the plan's GPUs; the key is the GPU's own index."""
    found: dict[tuple[int, str], int] = {}
    run = RunDir.of(run_dir)
    seen = [r for r in map(rundir.read_json, run.recovered_failures()) if r.get("recovered")]
    events = run.events
    seen += [e for e in rundir.read_jsonl(events) if e.get("event") == "assigner_oom"] if events.is_file() else []
    for r in seen:
        pos = r.get("gpu")
        if isinstance(pos, int) and 0 <= pos < len(plan_gpus) and isinstance(plan_gpus[pos], int):
            key = (plan_gpus[pos], "train" if r.get("phase") == "train" else "val")
            found[key] = found.get(key, 0) + 1
    return found


def entries_for_run(run: RunDir, story: dict[str, Any]) -> list[dict[str, Any]]:
    """The history lines of a finished run: one per GPU and phase with both a prediction and a measurement."""
    memory_plan = story.get("memory_plan")
    summary_file = run.memory_summary
    if not memory_plan or not summary_file.is_file():
        return []
    summary = rundir.read_json(summary_file)
    versions = story.get("versions", {})
    names = {str(g["index"]): g.get("name") for g in story.get("gpus", [])}
    lines, missed = [], near_misses(run, list((story.get("plan") or {}).get("gpus") or []))
    for gpu, name in names.items():
        for phase, measured in measured_peaks(summary, gpu).items():
            predicted = memory_plan["predicted"][phase]
            required = predicted.get("required_mib", predicted.get("peak_mib"))
            lines.append({
                "t": round(time.time(), 3), "run_dir": str(run.path.resolve()), "gpu": int(gpu), "gpu_name": name,
                "model": memory_plan["model"], "imgsz": memory_plan["imgsz"], "amp": memory_plan["amp"],
                "batch": predicted["batch"], "phase": phase, "world_size": memory_plan["world_size"],
                "torch": versions.get("torch"), "driver": versions.get("driver"),
                "predicted_required_mib": required, "calibration": predicted["calibration"],
                "predicted_uncalibrated_mib": round(required / (predicted["calibration"] or 1.0), 1),
                "measured_peak_mib": measured,
                "ooms_gone_on": missed.get((int(gpu), phase), 0),  # OOMs survived in place at this peak's phase
            })
    return lines


def record(run: RunDir, story: dict[str, Any], path: Path | None = None) -> int:
    """Append the run's lines to the history; returns how many. Never raises: the run is over whatever happens."""
    try:
        lines = entries_for_run(run, story)
        if lines:
            target = path or history_path()
            target.parent.mkdir(parents=True, exist_ok=True)
            for line in lines:
                rundir.append_jsonl(target, line)
        return len(lines)
    except Exception:  # a broken history must never change a run's outcome
        return 0


def read(path: Path | None = None) -> list[dict[str, Any]]:
    target = path or history_path()
    return list(rundir.read_jsonl(target)) if target.is_file() else []


def calibration(gpu_name: str | None, path: Path | None = None, phase: str | None = None) -> tuple[float, int]:
    """``(factor, n)``: the correction of ``required_mib`` for this GPU type (and phase, when given), from ``n``
    earlier runs here. Each ratio is taken against the uncalibrated prediction, so corrections never compound."""
    ratios, runs = [], set()
    for entry in read(path):
        if entry.get("gpu_name") != gpu_name or (phase and entry.get("phase", phase) != phase):
            continue
        runs.add((entry.get("run_dir"), entry.get("gpu")))
        predicted = float(entry.get("predicted_uncalibrated_mib") or entry.get("predicted_required_mib")
                          or entry.get("predicted_peak_mib") or 0)
        measured = float(entry.get("measured_peak_mib") or 0)
        if predicted > 0 and measured > 0:
            ratios.append(measured / predicted)
    if not ratios:
        return 1.0, 0
    n = len(runs)
    return 1.0 + (statistics.median(ratios) - 1.0) * n / (n + 1), n
