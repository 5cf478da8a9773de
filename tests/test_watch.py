"""The memory watch without training: the fake NVML backend, a real child process, an NVML that fails mid-run."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from yolosafe import gpus
from yolosafe.planning.options import DEFAULTS
from yolosafe.planning.trainoptions import TrainOptions
from yolosafe.proc import run_child
from yolosafe.rundir import files as rundir
from yolosafe.rundir.layout import RunDir
from yolosafe.rundir.records import Story
from yolosafe.supervisor import watch
from yolosafe.supervisor.child import RunOptions, Supervisor

SPEC = json.dumps({"gpus": [
    {"total_mib": 10000, "used_mib": 1000, "processes": [{"pid": 4242, "used_mib": 1000}],
     "phase_mib": {"train": 2000, "val": 8500}},
    {"total_mib": 10000, "phase_mib": {"train": 2000, "val": 3000}},
]})


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / rundir.MEMORY_CSV, newline="") as fh:
        return list(csv.DictReader(fh))


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def make_watch(tmp_path: Path, said: list[str], backend=None, interval: float = 0.01) -> watch.MemoryWatch:
    env = {gpus.FAKE_ENV: SPEC, gpus.PHASE_FILE_ENV: str(tmp_path / rundir.FAKE_PHASE)}
    return watch.MemoryWatch(tmp_path, [0, 1], interval, 0.9, backend or (lambda: gpus.open_backend(env)), said.append)


def test_samples_split_ours_from_others_and_warn_once_per_gpu_and_phase(tmp_path):
    rundir.write_json(tmp_path / rundir.FAKE_PHASE, {"phase": "val", "pid": os.getpid(), "epoch": 3})
    rundir.append_jsonl(tmp_path / rundir.EVENTS, {"t": time.time(), "event": "val_start", "phase": "val",
                                                   "epoch": 3, "rank": -1, "gpu": None, "attempt": 1})
    said: list[str] = []
    w = make_watch(tmp_path, said)
    w.start(1, lambda: {os.getpid()})
    wait_for(lambda: w.samples >= 20)
    w.stop()
    assert not w.alive
    got = rows(tmp_path)
    assert list(got[0]) == list(watch.COLUMNS)
    first = {r["gpu"]: r for r in got[:2]}
    assert (first["0"]["used_mib"], first["0"]["ours_mib"], first["0"]["others_mib"]) == ("9500.0", "8500.0", "1000.0")
    assert (first["1"]["used_mib"], first["1"]["ours_mib"], first["1"]["others_mib"]) == ("3000.0", "3000.0", "0.0")
    assert {r["attempt"] for r in got} == {"1"}
    assert len(said) == 1 and "GPU 0 at 95% in val, epoch 4" in said[0], said  # many samples over 90 %, one line
    assert w.status()["warnings"][0]["gpu"] == 0


def test_phase_tracker_reads_only_whole_lines_of_its_attempt(tmp_path):
    path = tmp_path / rundir.EVENTS
    tracker = watch.PhaseTracker(path, [2, 3])
    tracker.begin(2)
    tracker.poll()  # no file yet
    old = {"event": "val_start", "phase": "val", "epoch": 0, "gpu": 0, "attempt": 1}
    line = json.dumps({"event": "val_start", "phase": "val", "epoch": 4, "gpu": 1, "attempt": 2}) + "\n"
    path.write_text(json.dumps(old) + "\n" + line[:20])  # a rank is half-way through a write
    tracker.poll()
    assert tracker.at(2) == tracker.at(3) == ("other", None)
    with open(path, "a") as fh:
        fh.write(line[20:])
    tracker.poll()
    assert tracker.at(3) == ("val", 4) and tracker.at(2) == ("other", None)  # CUDA device 1 of the plan is GPU 3


class FlakyBackend:
    """A fake NVML that fails on reads number ``first`` to ``last`` (None: for good), like a GPU off the bus."""

    name = "flaky"

    def __init__(self, first: int, last: int | None) -> None:
        self.inner = gpus.FakeBackend(SPEC, {})
        self.reads, self.first, self.last = 0, first, last

    def inventory(self) -> gpus.Inventory:
        return self.inner.inventory()

    def read_memory(self, index: int) -> gpus.MemoryReading:
        self.reads += 1
        if self.reads >= self.first and (self.last is None or self.reads <= self.last):
            raise gpus.GPUReadError(f"GPU {index}: Unknown Error")
        return self.inner.read_memory(index)

    def close(self) -> None:
        pass


def test_nvml_error_mid_run_is_reported_once_and_sampling_goes_on(tmp_path):
    said: list[str] = []
    backend = FlakyBackend(first=10, last=40)
    w = make_watch(tmp_path, said, backend=lambda: backend, interval=0.005)
    w.start(1, set)
    wait_for(lambda: backend.reads > 80)
    w.stop()
    assert not w.alive and w.stopped is None
    assert w.read_errors == 31 and w.samples == backend.reads - 31
    assert len(said) == 1 and "NVML read failed" in said[0]


def test_nvml_gone_for_good_stops_the_watch_cleanly(tmp_path):
    said: list[str] = []
    w = make_watch(tmp_path, said, backend=lambda: FlakyBackend(first=5, last=None), interval=0.002)
    w.start(1, set)
    wait_for(lambda: not w.alive)  # ends by itself: no GPU left to read
    w.stop()
    assert w.stopped == "memory watch stopped: no GPU could be read"
    assert len(said) == 2 and w.samples == 4
    assert len(rows(tmp_path)) == 4


def run_options(env: dict, **given) -> RunOptions:
    return RunOptions.of(env, TrainOptions.of({**DEFAULTS, **given}), simulated=False)


def test_watch_runs_while_the_worker_lives_and_stops_with_it(tmp_path):
    phase_file = tmp_path / rundir.FAKE_PHASE
    env = {**os.environ, gpus.FAKE_ENV: SPEC, gpus.PHASE_FILE_ENV: str(phase_file)}
    supervisor = Supervisor(RunDir(tmp_path), run_options(env, watch_interval=0.01), Story())
    child = ("import json, os, sys, time\n"
             "json.dump({'phase': 'train', 'pid': os.getpid()}, open(sys.argv[1], 'w'))\n"
             "time.sleep(1.0)\n")
    spec = SimpleNamespace(attempt=1, plan={"gpus": [0, 1]})
    with supervisor.memory_watch(spec) as on_start:
        result = run_child([sys.executable, "-c", child, str(phase_file)], env, io.BytesIO(), on_start=on_start,
                           out=io.BytesIO())
    assert result.exit_code == 0
    assert supervisor.watch is not None and not supervisor.watch.alive
    assert not [t for t in threading.enumerate() if t.name == "yolosafe-watch"]  # no thread leak
    assert supervisor.story.memory_watch["samples"] > 10
    assert any(r["gpu"] == "0" and r["ours_mib"] == "2000.0" for r in rows(tmp_path))  # the child, via its pid

    off = Supervisor(RunDir(tmp_path), run_options(env, watch_interval=0), Story())
    with off.memory_watch(spec) as on_start:
        assert on_start is None and off.watch is None


def test_spec_carries_clear_before_val(tmp_path):
    from yolosafe.planning.trainplan import build_plan

    plan = build_plan(model="yolov8n.yaml", data="d.yaml", gpus=(0, 1), batch=8, effective_batch=16, val_batch=None,
                      imgsz=64, epochs=1, extra={})
    for flag in (True, False):
        spec = Supervisor(RunDir(tmp_path), run_options({}, clear_before_val=flag), Story()).spec(plan, 1, None, False)
        assert spec.clear_before_val is flag
