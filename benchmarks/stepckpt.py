"""What step checkpoints save after a mid-epoch OOM, and what they cost.

Runs, side by side in one invocation, two real CPU trainings through the CLI (``yolov8n.yaml``, imgsz 64, a
synthetic training set of ``--images`` images, an odd count, ``--epochs`` epochs) with the same training OOM injected
at iteration ``--oom-at`` of epoch 2 (``YOLOSAFE_INJECT_OOM``):

- with:    ``--save-every Nit`` (``--every``): the relaunch resumes from the step checkpoint inside the epoch;
- without: ``--save-every 0``: the relaunch resumes from the epoch's start (``last.pt``), as Ultralytics would.

For each, the work the relaunch trains again (iterations and seconds of the failed attempt after the checkpoint it
resumed from: the story's ``redone``, from the ranks' own events), and for the run with step checkpoints what they
cost: the seconds of every save over the training time (rank 0's train_start to train_end), and the share the
default ``--save-every auto`` gives with the save time measured here (its interval is at least the save's seconds
over ``saveevery.AUTO_SHARE``, and never under ``saveevery.AUTO_FLOOR_S``).

Usage: ``python benchmarks/stepckpt.py [--images 101] [--epochs 2] [--oom-at 22] [--every 5]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import tinysets  # noqa: E402
from yolosafe.planning import saveevery  # noqa: E402
from yolosafe.rundir import steps  # noqa: E402

TINY = ["--imgsz", "64", "--batch", "4", "--effective-batch", "8", "workers=0", "plots=False",
        "--model", "yolov8n.yaml"]


def dataset(root: Path, images: int) -> Path:
    tinysets.split(root / "images" / "train", root / "labels" / "train", images, "detect", 3)
    tinysets.split(root / "images" / "val", root / "labels" / "val", 4, "detect", 4)
    return tinysets.data_yaml(root / "data.yaml", {"path": str(root), "train": "images/train", "val": "images/val",
                                                  "nc": 1, "names": {0: "thing"}}, "detect")


def train(scratch: Path, name: str, data: Path, args: argparse.Namespace, every: str) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "YOLO_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "YOLOSAFE_CACHE": f"{scratch}/cache", "YOLO_CONFIG_DIR": f"{scratch}/ultralytics",
           "YOLOSAFE_INJECT_OOM": f"phase=train,epoch=1,iteration={args.oom_at}"}
    cmd = [sys.executable, "-m", "yolosafe", "train", "--data", str(data), "--epochs", str(args.epochs), *TINY,
           "--save-every", every, "--name", name]
    done = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name}: the run failed ({done.returncode}): {done.stderr[-2000:]}")
    return next(Path(scratch, "runs").glob(f"*/{name}"))


def redone(run: Path) -> dict:
    story = json.loads((run / "yolosafe.json").read_text())
    return story["attempts"][1]["redone"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=101)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--oom-at", type=int, default=22, help="0-based iteration of epoch 2 that raises the OOM")
    parser.add_argument("--every", type=int, default=5, help="--save-every in iterations for the run with")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        data = dataset(scratch / "data", args.images)
        with_run = train(scratch, "with", data, args, f"{args.every}it")
        without_run = train(scratch, "without", data, args, "0")
        again = {"with": redone(with_run), "without": redone(without_run)}
        saves = steps.save_seconds(with_run)
        trained = steps.train_seconds(with_run)
    print(f"OOM at iteration {args.oom_at + 1} of epoch 2 ({args.images} images, batch 4, one process):")
    for name, every in (("with", f"--save-every {args.every}it"), ("without", "--save-every 0")):
        print(f"  {name:<8} ({every:<17}): redone {again[name]['iterations']:>3} iterations, "
              f"{again[name]['seconds']:6.2f} s")
    w, wo = again["with"], again["without"]
    if wo["seconds"]:
        print(f"  redone with / without: {w['iterations']}/{wo['iterations']} iterations, "
              f"{w['seconds'] / wo['seconds']:.2f} of the seconds")
    if saves:
        median = statistics.median(saves)
        interval = saveevery.parse("auto").interval_s(median)
        print(f"  step checkpoints every {args.every}it: {len(saves)} saves, median {median:.3f} s, "
              f"{sum(saves):.2f} s = {sum(saves) / trained:.2%} of {trained:.1f} s of training")
        print(f"  --save-every auto with that save time: one every {interval:.0f} s = "
              f"{median / (interval + median):.3%} of training time")


if __name__ == "__main__":
    main()
