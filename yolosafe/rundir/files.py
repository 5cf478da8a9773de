"""The run directory: one folder per ``yolosafe train``, shared by the supervisor, the worker, every DDP rank and the
report. This module owns its file names and the small, crash-safe ways of writing them.

Layout (Ultralytics' own files, ``weights/``, ``results.csv``, ``args.yaml``, sit beside these)::

    yolosafe.json          the story of the run: plan, versions, every attempt and the outcome
    train.log              everything the worker and its ranks printed, all attempts
    spec-N.json            what attempt N was asked to do (read by the worker and by every rank)
    worker-N.json          what the worker of attempt N saw (environment, torch, CUDA)
    events.jsonl           phase events from the trainer callbacks of every rank (train/val start and end)
    failure-N-rankR.json   what killed rank R of attempt N (an OOM record when "oom" is true), written as it died
    memory.csv             NVML samples of every GPU of the run, all attempts (the supervisor's memory watch)
    memory_summary.json    peaks per GPU and phase, from memory.csv joined with events.jsonl (``yolosafe report``)
    memory.png             used memory per GPU over time, validation shaded, OOM marked (``yolosafe report``)
    final_metrics.json     the final validation's metrics (of best.pt), whichever attempt ran it
    weights/last-before-attemptN.pt   the checkpoint attempt N resumed from, kept (last.pt moves on every epoch)
    ranks/attempt-N/       torch.distributed.run's per-rank logs and error files of attempt N (several GPUs)
    .injected              how many injected faults (YOLOSAFE_INJECT_OOM) have fired, across attempts
    .injected-hang         which injected hangs (YOLOSAFE_INJECT_HANG) have fired, across attempts
    heartbeat/attempt-N/rank-R   rank R's progress (phase, epoch, iteration, time), overwritten in place at each beat
    stacks/attempt-N/rank-R.txt  rank R's Python stacks, written when the hang watch found a rank stuck (faulthandler;
                           rank-R.py-spy.txt: py-spy's native frames where it is installed)
    hang-N.json            the hang the supervisor's watch found in attempt N: the stuck rank, phase, frame, stacks
    .lock                  held (flock) by the supervisor that runs in it, for its whole life; holds its pid

A run over several machines (``--nnodes``) lives in one directory on storage every node shares: rank 0 (on node 0)
writes the checkpoints and Ultralytics' files; node 0's supervisor keeps the names above; the supervisor of node R > 0
writes its own files with the node in the name (:func:`node_file`: ``yolosafe-node1.json``, ``train-node1.log``,
``spec-N-node1.json``, ``events-node1.jsonl``, ``memory-node1.csv``, ``ranks/node1/attempt-N/``,
``heartbeat/node1/attempt-N/``, ``hang-N-node1.json``, ``.lock-node1``).
Failure records are named by global rank, so they never collide. The files the nodes use to agree
(:mod:`yolosafe.supervisor.multinode.cluster`)::

    nodes.json             node 0's marker: the run's nodes and plan; the other nodes look for it at start
    node-R.json            node R's live state (attempt, state, a heartbeat), rewritten every few seconds
    attempt-N-nodeR.json   how attempt N ended on node R (written once, read by every node to agree)

One run per directory: the lock is an OS lock on an open file, released by the kernel when the supervisor exits,
however it dies, so it is never stale; the pid in the file is only there to name the holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from yolosafe.errors import YolosafeError

STORY = "yolosafe.json"
LOG = "train.log"
EVENTS = "events.jsonl"
MEMORY_CSV = "memory.csv"
MEMORY_SUMMARY = "memory_summary.json"
MEMORY_PLOT = "memory.png"
FINAL_METRICS = "final_metrics.json"
INJECTED = ".injected"
INJECTED_HANG = ".injected-hang"
# the phase file of the fake NVML backend (YOLOSAFE_FAKE_PHASE_FILE), fake GPUs only; ranks write .fake-phase-gpuN.json
FAKE_PHASE = ".fake-phase.json"
LOCK = ".lock"
ORPHANED = "abandoned"  # the outcome of a run whose supervisor died while it said "running" (resumable)
NODES_MARKER = "nodes.json"
# Ultralytics' own files in the run directory (its save_dir) that yolosafe reads
WEIGHTS = "weights"
LAST = "last.pt"
BEST = "best.pt"
UNVALIDATED = "unvalidated.pt"  # an epoch trained, not yet validated (yolosafe.training.valretry)
ARGS = "args.yaml"
RESULTS_CSV = "results.csv"
# Set by the supervisor in the environment of every process of an attempt (worker, launcher, ranks), read by nobody but
# yolosafe.readers.holders, which recognises a run's processes by it in /proc/PID/environ. The processes themselves
# learn their run from the run spec on their command line (yolosafe.rundir.runspec, yolosafe.training.context).
RUN_DIR_ENV = "YOLOSAFE_RUN_DIR"


def node_file(name: str, node: int = 0) -> str:
    """A file of node ``node``'s supervisor: node 0 keeps today's name, node R > 0 gets ``-nodeR`` before the
    suffix (``train.log`` -> ``train-node1.log``, ``.lock`` -> ``.lock-node1``), so no two nodes write one file."""
    if node <= 0:
        return name
    stem, dot, suffix = name.rpartition(".")
    if not stem or not dot:  # no suffix, or a dot file without one (".lock")
        return f"{name}-node{node}"
    return f"{stem}-node{node}.{suffix}"


def node_ranks(run_dir: Path) -> list[int]:
    """The nodes that kept a story in ``run_dir``: [0] for a run on one machine."""
    stem, _, suffix = STORY.rpartition(".")
    found = {0}
    for path in run_dir.glob(f"{stem}-node*.{suffix}"):
        digits = path.stem.rpartition("-node")[2]
        if (digits.isascii() and digits.isdecimal()):
            found.add(int(digits))
    return sorted(found)


def node_state_path(run_dir: Path, node: int) -> Path:
    return run_dir / f"node-{node}.json"


def node_end_path(run_dir: Path, attempt: int, node: int) -> Path:
    return run_dir / f"attempt-{attempt}-node{node}.json"


def spec_path(run_dir: Path, attempt: int, node: int = 0) -> Path:
    return run_dir / node_file(f"spec-{attempt}.json", node)


SPEC_NAME = re.compile(r"spec-\d+(-node\d+)?\.json$")  # what spec_path names, on any node


def worker_path(run_dir: Path, attempt: int) -> Path:
    return run_dir / f"worker-{attempt}.json"


def ranks_log_dir(run_dir: Path, attempt: int, node: int = 0) -> Path:
    return run_dir / "ranks" / (f"node{node}" if node > 0 else "") / f"attempt-{attempt}"


def heartbeat_path(run_dir: Path, attempt: int, rank: int, node: int = 0) -> Path:
    """Rank ``rank``'s heartbeat file in attempt ``attempt`` (a single process is rank 0); by node, so each node's
    hang watch lists only its own ranks."""
    return run_dir / "heartbeat" / (f"node{node}" if node > 0 else "") / f"attempt-{attempt}" / f"rank-{max(rank, 0)}"


def stack_path(run_dir: Path, attempt: int, rank: int, native: bool = False) -> Path:
    """Where rank ``rank``'s Python stacks (``native``: py-spy's dump) of attempt ``attempt`` go."""
    name = f"rank-{max(rank, 0)}.py-spy.txt" if native else f"rank-{max(rank, 0)}.txt"
    return run_dir / "stacks" / f"attempt-{attempt}" / name


def hang_path(run_dir: Path, attempt: int, node: int = 0) -> Path:
    return run_dir / node_file(f"hang-{attempt}.json", node)


def weights_dir(run_dir: Path) -> Path:
    """Ultralytics' checkpoints of the run (``save_dir / "weights"``)."""
    return run_dir / WEIGHTS


def last_checkpoint(run_dir: Path) -> Path:
    """``weights/last.pt``: what a resume and every retry continue from."""
    return weights_dir(run_dir) / LAST


def best_checkpoint(run_dir: Path) -> Path:
    return weights_dir(run_dir) / BEST


def failure_path(run_dir: Path, attempt: int, rank: int) -> Path:
    return run_dir / f"failure-{attempt}-rank{max(rank, 0)}.json"


def new_run_dir(project: Path, name: str) -> Path:
    """Create ``project/name``, or ``name2``, ``name3``... as Ultralytics does: an earlier run is never reused."""
    project.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = project / (name if n == 1 else f"{name}{n}")
        try:
            candidate.mkdir()
            return candidate.resolve()
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run directory name under {project}")


def latest_run(project: Path) -> Path | None:
    """The most recently started yolosafe run under ``project`` (searched recursively, like runs/detect/train3)."""
    stories = sorted(project.glob(f"**/{STORY}"), key=lambda p: p.stat().st_mtime)
    return stories[-1].parent if stories else None


def write_json(path: Path, data: Any) -> None:
    """Write atomically (temp file + rename) so a reader or a crash never sees half a file; a write that fails (a
    full disk) leaves no temp file behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One ``write`` on an O_APPEND descriptor: lines from several ranks never interleave."""
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed rank


class RunLocked(YolosafeError):
    """Another live process holds the run directory; ``pid`` is the holder's."""

    def __init__(self, run_dir: Path, pid: str) -> None:
        super().__init__(f"{run_dir} is in use by a running yolosafe (pid {pid or '?'})")
        self.pid = pid


def lock(run_dir: Path, node: int = 0) -> int:
    """Take the run directory's lock for this process's life (the descriptor stays open, never inherited by the
    worker); raises :class:`RunLocked` naming the holder. Each node of a multi-node run has its own lock."""
    fd = os.open(run_dir / node_file(LOCK, node), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise RunLocked(run_dir, pid) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def unlock(run_dir: Path, node: int = 0) -> None:
    """Give up this process's hold on the run directory (:func:`lock`), for a process that goes on after the run
    (a notebook's kernel resumes it next): every descriptor of this process on its lock file is closed."""
    try:
        target = os.stat(run_dir / node_file(LOCK, node))
    except OSError:
        return
    fd_dir = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    for name in os.listdir(fd_dir):
        with contextlib.suppress(OSError, ValueError):
            found = os.fstat(int(name))
            if (found.st_dev, found.st_ino) == (target.st_dev, target.st_ino):
                os.close(int(name))


def claim_new_run_dir(project: Path, name: str, refuse_live: bool) -> Path:
    """A new run directory (:func:`new_run_dir`), locked for this process's life. ``refuse_live``: the user named
    this run, so a live run of that name is a mistake (:class:`RunLocked`), not a reason to go to ``name2``."""
    if refuse_live:
        pid = holder(project / name)
        if pid is not None:
            raise RunLocked(project / name, pid)
    run_dir = new_run_dir(project, name)
    lock(run_dir)  # its descriptor stays open until this process exits
    return run_dir


def holder(run_dir: Path, node: int = 0) -> str | None:
    """The pid of the live process holding the run directory (node ``node``'s lock), or None when nobody does."""
    try:
        fd = os.open(run_dir / node_file(LOCK, node), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file: no yolosafe has run here since locks exist
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a probe: released by the close below, the file unchanged
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)
    return None


def mark_if_orphaned(run_dir: Path, node: int = 0, locked_here: bool = False) -> bool:
    """A story that says "running" while nobody holds the lock: its supervisor died (kill -9, power loss). Say so in
    the story, and give the attempt it was running the same outcome, so that neither the user nor ``--resume`` takes
    it for a live run. ``locked_here``: this process holds the lock (a resume about to run), so nobody else can.
    Returns whether it was marked."""
    path = run_dir / node_file(STORY, node)
    with contextlib.suppress(OSError, ValueError):
        story = read_json(path)
        if not isinstance(story, dict) or story.get("outcome") != "running":
            return False
        if not locked_here and holder(run_dir, node) is not None:
            return False
        story["outcome"] = ORPHANED
        attempts = story.get("attempts")
        for attempt in attempts[-1:] if isinstance(attempts, list) else []:
            if isinstance(attempt, dict) and attempt.get("outcome") in (None, "running"):
                attempt["outcome"] = ORPHANED
        write_json(path, story)
        return True
    return False
