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
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STORY = "yolosafe.json"
LOG = "train.log"
EVENTS = "events.jsonl"
MEMORY_CSV = "memory.csv"
MEMORY_SUMMARY = "memory_summary.json"
MEMORY_PLOT = "memory.png"
FINAL_METRICS = "final_metrics.json"
INJECTED = ".injected"
# the phase file of the fake NVML backend (YOLOSAFE_FAKE_PHASE_FILE), fake GPUs only; ranks write .fake-phase-gpuN.json
FAKE_PHASE = ".fake-phase.json"
RUN_DIR_ENV = "YOLOSAFE_RUN_DIR"
SPEC_ENV = "YOLOSAFE_SPEC"


def spec_path(run_dir: Path, attempt: int) -> Path:
    return run_dir / f"spec-{attempt}.json"


def worker_path(run_dir: Path, attempt: int) -> Path:
    return run_dir / f"worker-{attempt}.json"


def ranks_log_dir(run_dir: Path, attempt: int) -> Path:
    return run_dir / "ranks" / f"attempt-{attempt}"


def failure_path(run_dir: Path, attempt: int, rank: int) -> Path:
    return run_dir / f"failure-{attempt}-rank{max(rank, 0)}.json"


def failure_records(run_dir: Path, attempt: int) -> list[dict[str, Any]]:
    return [read_json(p) for p in sorted(run_dir.glob(f"failure-{attempt}-rank*.json"))]


def all_failure_records(run_dir: Path) -> list[dict[str, Any]]:
    """The failure records of every attempt (the memory report marks the OOMs among them)."""
    return [read_json(p) for p in sorted(run_dir.glob("failure-*-rank*.json"))]


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
    """Write atomically (temp file + rename) so a reader or a crash never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


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
