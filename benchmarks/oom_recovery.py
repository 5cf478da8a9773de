"""How long an OOM costs with yolosafe: recovery latency against a cold start, and the training lost.

Runs, side by side and alternating, N pairs of real CPU trainings through the installed CLI:

- cold:  ``yolosafe train`` from nothing; measured from the command's start to its first training step;
- oom:   the same run with ``YOLOSAFE_INJECT_OOM`` in epoch E; measured from the OOM (the failure record's time) to
         the first training step of the relaunched attempt, which resumes from the last checkpoint.

It also reports the work lost: the epochs a resumed retry redoes, against the epochs a by-hand restart from scratch
would redo. Usage: ``python benchmarks/oom_recovery.py [--pairs 2] [--epochs 3] [--oom-epoch 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

YOLOSAFE = shutil.which("yolosafe") or "yolosafe"
TINY = ["--imgsz", "64", "--batch", "8", "--effective-batch", "16", "workers=0", "plots=False"]


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def first_step(run: Path, attempt: int) -> float:
    return min(e["t"] for e in events(run) if e["event"] == "train_start" and e["attempt"] == attempt)


def train(workdir: Path, epochs: int, env: dict[str, str]) -> tuple[Path, float]:
    started = time.time()
    subprocess.run([YOLOSAFE, "train", "--epochs", str(epochs), *TINY], cwd=workdir, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return workdir / "runs" / "detect" / "train", started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--oom-epoch", type=int, default=2)
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("YOLOSAFE_", "PYTORCH_"))}
    cache = Path(tempfile.mkdtemp(prefix="yolosafe-bench-"))
    base.update(YOLOSAFE_CACHE=str(cache / "cache"), YOLO_CONFIG_DIR=str(cache / "ultralytics"))
    cold, recovery, redone = [], [], []
    for pair in range(args.pairs):
        workdir = cache / f"cold{pair}"
        workdir.mkdir()
        run, started = train(workdir, args.epochs, base)
        cold.append(first_step(run, 1) - started)

        workdir = cache / f"oom{pair}"
        workdir.mkdir()
        env = {**base, "YOLOSAFE_INJECT_OOM": f"phase=train,epoch={args.oom_epoch},iteration=1"}
        run, _ = train(workdir, args.epochs, env)
        failure = json.loads((run / "failure-1-rank0.json").read_text())
        recovery.append(first_step(run, 2) - failure["t"])
        story = json.loads((run / "yolosafe.json").read_text())
        resumed_epoch = story["attempts"][1]["resumed_from_epoch"]
        redone.append(args.oom_epoch - (resumed_epoch + 1 if resumed_epoch is not None else 0))
    shutil.rmtree(cache, ignore_errors=True)

    cold_s, recovery_s = statistics.median(cold), statistics.median(recovery)
    print(f"OOM injected at epoch {args.oom_epoch} of {args.epochs} (iteration 1), {args.pairs} pairs, CPU, TINY run")
    print(f"  cold start to first training step      {cold_s:6.2f} s  (median of {cold})")
    print(f"  OOM to first step of the resumed retry  {recovery_s:6.2f} s  (median of {recovery})")
    print(f"  ratio recovery / cold start             {recovery_s / cold_s:6.2f}")
    print(f"  full epochs redone after the OOM        {max(redone):6d}  (yolosafe: plus the step(s) of epoch "
          f"{args.oom_epoch} before it)")
    print(f"  full epochs a restart from scratch redoes {args.oom_epoch:4d}")


if __name__ == "__main__":
    main()
