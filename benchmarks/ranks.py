"""What an OOM on one rank costs with real ranks, and how long ranks take to start: 2 and 4 CPU ranks side by side.

For each rank count, one real training through the installed CLI with fake GPUs (every fake GPU one real CPU rank
over gloo, launched by yolosafe through torch.distributed.run) and an OOM injected on the last rank in epoch 2:

- cold:      from the command's start to the first training step of attempt 1 (the first rank's ``train_start``);
- recovery:  from the OOM (the failure record's time) to the first training step of the relaunched attempt, which
             halves the batch and resumes from the checkpoint: the teardown of every rank, the relaunch, the resume;
- ratio:     recovery / cold;
- start-up:  from the launcher's start (the attempt's spec file is written just before) to the first and to the last
             rank's ``train_start``, for attempt 1 and for the relaunch.

Usage: ``python benchmarks/ranks.py [--ranks 2 4]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

YOLOSAFE = shutil.which("yolosafe") or "yolosafe"


def starts(run: Path, attempt: int) -> list[float]:
    lines = (run / "events.jsonl").read_text().splitlines()
    found = [json.loads(line) for line in lines]
    return sorted(e["t"] for e in found if e["event"] == "train_start" and e["attempt"] == attempt)


def measure(ranks: int, base: dict[str, str], workdir: Path) -> dict[str, float]:
    workdir.mkdir()
    env = {**base, "YOLOSAFE_FAKE_GPUS": f"{ranks}x24GB",
           "YOLOSAFE_INJECT_OOM": f"phase=train,epoch=1,rank={ranks - 1}"}
    gpus = ",".join(map(str, range(ranks)))
    started = time.time()
    subprocess.run([YOLOSAFE, "train", "--gpus", gpus, "--epochs", "2", "--imgsz", "64", "--batch", str(4 * ranks),
                    "--effective-batch", str(8 * ranks), "workers=0", "plots=False"],
                   cwd=workdir, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = workdir / "runs" / "detect" / "train"
    record = next(json.loads(p.read_text()) for p in run.glob("failure-1-rank*.json")
                  if json.loads(p.read_text()).get("oom"))
    first, second = starts(run, 1), starts(run, 2)
    launched = {n: (run / f"spec-{n}.json").stat().st_mtime for n in (1, 2)}
    cold, recovery = first[0] - started, second[0] - record["t"]
    return {"cold_s": cold, "recovery_s": recovery, "ratio": recovery / cold,
            "startup_first_s": first[0] - launched[1], "startup_last_s": first[-1] - launched[1],
            "restart_first_s": second[0] - launched[2], "restart_last_s": second[-1] - launched[2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("YOLOSAFE_", "PYTORCH_"))}
    cache = Path(tempfile.mkdtemp(prefix="yolosafe-bench-ranks-"))
    base.update(YOLOSAFE_CACHE=str(cache / "cache"), YOLO_CONFIG_DIR=str(cache / "ultralytics"))
    print(f"{'ranks':>5}  {'cold->step':>10}  {'OOM->step':>10}  {'ratio':>6}  {'rank start-up (first/last)':>27}  "
          f"{'relaunch (first/last)':>22}")
    try:
        for ranks in args.ranks:
            m = measure(ranks, base, cache / f"ranks{ranks}")
            print(f"{ranks:>5}  {m['cold_s']:>9.1f}s  {m['recovery_s']:>9.1f}s  {m['ratio']:>6.2f}  "
                  f"{m['startup_first_s']:>12.1f}s / {m['startup_last_s']:>5.1f}s  "
                  f"{m['restart_first_s']:>10.1f}s / {m['restart_last_s']:>5.1f}s", flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
