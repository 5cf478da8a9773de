"""What the hang watch costs and how fast it acts.

1. **A beat** (default): the real ``yolosafe.training.heartbeat.beat`` of a rank's context into its real file,
   timed over ``--beats`` calls, side by side with the same loop that does nothing (the loop's own cost), median of
   5 rounds; then the share of one training step of the tiny workload (``--step-ms``, measured by
   ``benchmarks/overhead.py`` on the same machine) that a step's one beat is.
2. **Hang to relaunch** (``--relaunch``): a real 2-rank run on fake GPUs (``yolov8n.yaml``, the built-in shapes,
   imgsz 64, 2 epochs) with rank 1 stuck in a training step of epoch 2 under ``--hang-timeout T``: from the stuck
   rank's last beat to the watch's finding (``hang-1.json``'s ``stuck_s``), from the finding to the next attempt's
   run spec (the moment its child starts), and to its first training beat.

For the whole-run view, ``python benchmarks/overhead.py --parts`` switches the heartbeat off
(``YOLOSAFE_BENCH_OFF=heartbeat``) in turn with the other parts.

Usage: ``python benchmarks/heartbeat.py [--beats 100000] [--step-ms 250] [--relaunch] [--timeout 10]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from yolosafe.rundir import heartbeat as beats  # noqa: E402
from yolosafe.rundir.layout import RunDir  # noqa: E402
from yolosafe.rundir.runspec import RunSpec  # noqa: E402
from yolosafe.training import heartbeat  # noqa: E402
from yolosafe.training.context import Rank, RunContext  # noqa: E402


def per_beat(folder: Path, count: int) -> tuple[float, float]:
    """(seconds per beat, seconds per empty loop pass), median of 5 rounds each, alternated."""
    spec = RunSpec(attempt=1, mode="train", world_size=2, fake_gpus=True, run_dir=str(folder), model="m.yaml",
                   resume=None, val_batch=4, clear_before_val=True, cuda_visible_devices=None)
    context = RunContext(spec, Rank(1, 1, 2))
    heartbeat.beat(context, "setup")  # opens the files once, as the first beat of a rank does
    with_beat, empty = [], []
    for _ in range(5):
        start = time.perf_counter()
        for i in range(count):
            context.progress.iteration = i
            heartbeat.beat(context, "train")
        with_beat.append((time.perf_counter() - start) / count)
        start = time.perf_counter()
        for i in range(count):
            context.progress.iteration = i
        empty.append((time.perf_counter() - start) / count)
    assert beats.read(RunDir(folder).heartbeat(1, 1)) is not None
    return statistics.median(with_beat), statistics.median(empty)


def relaunch(timeout: float) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "YOLOSAFE_FAKE_GPUS": "2x24GB", "OMP_NUM_THREADS": "1", "YOLO_OFFLINE": "1",
               "YOLOSAFE_INJECT_HANG": "phase=train,epoch=1,rank=1", "PYTHONPATH": str(ROOT),
               "YOLOSAFE_CACHE": f"{scratch}/cache", "YOLO_CONFIG_DIR": f"{scratch}/ultralytics"}
        cmd = [sys.executable, "-m", "yolosafe", "train", "--gpus", "0,1", "--epochs", "2", "--imgsz", "64",
               "--batch", "8", "--effective-batch", "16", "workers=0", "plots=False", "--hang-timeout", f"{timeout:g}"]
        done = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True)
        run = next(Path(scratch, "runs").glob("*/train"))
        if done.returncode != 0:
            raise SystemExit(f"the run failed ({done.returncode}): {done.stderr[-2000:]}")
        found = json.loads(run.joinpath("hang-1.json").read_text())
        spec = RunDir(run).spec(2).stat().st_mtime
        events = [json.loads(line) for line in run.joinpath("events.jsonl").read_text().splitlines()]
        first = min(e["t"] for e in events if e["attempt"] == 2 and e["event"] == "train_start")
        print(f"hang to relaunch, --hang-timeout {timeout:g}: found {found['stuck_s']:.1f} s after the stuck rank's "
              f"last beat; next attempt's child started {spec - found['t']:.1f} s after the finding (stacks "
              f"written, every rank killed, the story saved, the checkpoint copied); its first epoch started "
              f"{first - found['t']:.1f} s after the finding")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beats", type=int, default=100000)
    parser.add_argument("--step-ms", type=float, default=250.0, help="one training step of the tiny workload")
    parser.add_argument("--relaunch", action="store_true")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        beat, empty = per_beat(Path(scratch), args.beats)
    cost = beat - empty
    print(f"one beat: {cost * 1e6:.2f} us (loop with a beat {beat * 1e6:.2f} us, without {empty * 1e6:.2f} us per "
          f"pass, median of 5 x {args.beats}); one beat per step of {args.step_ms:g} ms is "
          f"{cost / (args.step_ms / 1000):.5%} of it")
    if args.relaunch:
        relaunch(args.timeout)


if __name__ == "__main__":
    main()
