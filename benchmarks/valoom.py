"""What a validation OOM costs: recovered in place against recovered by relaunch, side by side in one run.

Two real trainings through the installed CLI with fake GPUs (every fake GPU one real CPU rank over gloo), the same
OOM injected on the last rank in the validation of epoch 2 of 3:

- in place:  ``--val-oom in-place`` (the default): that rank halves its own validation batch and validates again;
- relaunch:  ``--val-oom relaunch``: every rank ends, the run is relaunched with half the validation batch and
             resumes from ``last.pt``, which Ultralytics writes after validation, so epoch 2 is trained again.

Measured for each, from the ranks' own records: the wall time from the OOM (its failure record's time) to the start
of the next epoch (the first rank's ``train_start`` of epoch 3), and the training iterations redone (epochs trained
more than once on a rank, times the iterations of an epoch on a rank). Printed with the ratios in place / relaunch.

Usage: ``python benchmarks/valoom.py [--ranks 2] [--epochs 3]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

YOLOSAFE = shutil.which("yolosafe") or "yolosafe"
PER_GPU = 4  # the per-GPU train batch; validation batch the same


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def oom_time(run: Path) -> float:
    """The first OOM record of the run: the recovered one (in place) or the rank's own (relaunch)."""
    found = [json.loads(p.read_text()) for p in run.glob("failure-*-rank*.json")]
    return min(r["t"] for r in found if r.get("oom"))


def iterations_per_epoch(run: Path, ranks: int) -> int:
    """Training iterations of one epoch on one rank: the train images Ultralytics reports, over the ranks, in
    batches."""
    images = int(re.search(r"Using (\d+) train", (run / "train.log").read_text())[1])
    return math.ceil(math.ceil(images / ranks) / PER_GPU)


def measure(mode: str, ranks: int, epochs: int, base: dict[str, str], workdir: Path) -> dict[str, float]:
    workdir.mkdir()
    oom_epoch = epochs - 2  # 0-based: the validation of the second-to-last epoch
    env = {**base, "YOLOSAFE_FAKE_GPUS": f"{ranks}x24GB",
           "YOLOSAFE_INJECT_OOM": f"phase=val,epoch={oom_epoch},rank={ranks - 1}"}
    subprocess.run([YOLOSAFE, "train", "--gpus", ",".join(map(str, range(ranks))), "--epochs", str(epochs),
                    "--imgsz", "64", "--batch", str(PER_GPU * ranks), "--effective-batch", str(2 * PER_GPU * ranks),
                    "--val-oom", mode, "workers=0", "plots=False"],
                   cwd=workdir, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = workdir / "runs" / "detect" / "train"
    found = events(run)
    oom = oom_time(run)
    next_start = min(e["t"] for e in found if e["event"] == "train_start" and e["epoch"] == oom_epoch + 1
                     and e["t"] > oom)
    trained = Counter((e["rank"], e["epoch"]) for e in found if e["event"] == "train_start")
    redone_epochs = sum(n - 1 for n in trained.values())
    attempts = len(json.loads((run / "yolosafe.json").read_text())["attempts"])
    return {"oom_to_next_epoch_s": next_start - oom, "iterations_redone": redone_epochs * iterations_per_epoch(
        run, ranks), "epochs_redone": redone_epochs, "attempts": attempts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("YOLOSAFE_", "PYTORCH_"))}
    cache = Path(tempfile.mkdtemp(prefix="yolosafe-bench-valoom-"))
    base.update(YOLOSAFE_CACHE=str(cache / "cache"), YOLO_CONFIG_DIR=str(cache / "ultralytics"))
    try:
        found = {mode: measure(mode, args.ranks, args.epochs, base, cache / mode) for mode in ("in-place", "relaunch")}
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    where = f"rank {args.ranks - 1} in the validation of epoch {args.epochs - 1}/{args.epochs}"
    print(f"{args.ranks} ranks, OOM on {where}")
    print(f"{'':>9}  {'attempts':>8}  {'OOM -> next epoch':>17}  {'iterations redone':>17}  {'rank-epochs redone':>18}")
    for mode, m in found.items():
        print(f"{mode:>9}  {m['attempts']:>8}  {m['oom_to_next_epoch_s']:>16.1f}s  {m['iterations_redone']:>17}  "
              f"{m['epochs_redone']:>18}")
    inplace, relaunch = found["in-place"], found["relaunch"]
    print(f"ratio in place / relaunch: time {inplace['oom_to_next_epoch_s'] / relaunch['oom_to_next_epoch_s']:.2f}, "
          f"iterations redone {inplace['iterations_redone']}/{relaunch['iterations_redone']}")


if __name__ == "__main__":
    main()
