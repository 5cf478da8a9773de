"""What yolosafe costs over plain Ultralytics: the same training side by side, and where the difference goes.

The workload: ``yolov8n.yaml`` from scratch on 16 training and 8 validation images of the built-in ``shapes`` kind
(generated here, 128 px), ``imgsz=128``, ``batch=4``, ``workers=0``, on the CPU. Plain is a fresh
``python -c "YOLO('yolov8n.yaml').train(...)"``; yolosafe is ``yolosafe train --gpus cpu`` with the same arguments
and ``--val-batch 8`` (Ultralytics validates with twice the train batch, yolosafe by default with the train batch).
Both get ``YOLO_OFFLINE=1`` (yolosafe sets it for its worker) and write their output to /dev/null.

1. **Pairs** (``--pairs`` rounds, the order of the commands rotated each round) at 2 and 8 epochs: wall
   and CPU (user + system of the whole process tree: every process the command started, waited for) and the median
   of the per-pair ratios. Each run is cut in three at two moments both sides record: the start of the first epoch
   and the end of the last validation (plain: two trivial callbacks; yolosafe: its phase events). The yolosafe-minus-
   plain difference of the first part is the fixed start-up cost; of the middle part, divided by the epochs, the
   per-epoch cost; of the last part, the teardown. The start-up is split further at the moment the supervisor wrote
   the attempt's run spec (``spec-1.json``, right before the worker starts): before it, the supervisor's start;
   after it, the worker's start beyond what plain Ultralytics needs to reach its first epoch.
2. **Parts** (``--parts``): yolosafe at 8 epochs with each part switched off in turn (``YOLOSAFE_BENCH_OFF``, read by
   ``yolosafe.bench.bench_off``, benchmark only): tee (the child writes to the terminal itself, no train.log), filter
   (tee without the traceback filter), tree (no background refresh of the process tree), events (no phase events),
   checkpoint (Ultralytics' in-place write), peaks (no epoch peak metrics), heartbeat (no beats, no hang watch
   input), and the clearing before validation
   (``--no-clear-before-val``); all-on and each-off alternated; per part the median on-minus-off of the middle part
   per epoch (CPU and wall). The memory watch samples GPUs only: with none (this workload) it never starts.
3. **Profile** (``--profile``): one yolosafe run at 8 epochs, the supervisor under cProfile (CPU time) and the worker
   too (``YOLOSAFE_BENCH_PROFILE``): the seconds of each yolosafe function that runs per epoch or at start.
4. **Process tree** (``--tree``): the CPU of one refresh of the supervisor's process tree (it runs every 0.5 s
   while an attempt runs) with 3, 19 and 67 processes known (a rank per GPU, each with its dataloader workers).
5. **fsync** (``--fsync-mb``): on the disk of the scratch folder, writing a file of that size with and without an
   ``fsync`` before the close (median of 3), and the same for a checkpoint of this workload's size.

Usage: ``python benchmarks/overhead.py [--pairs 3] [--epochs 2,8] [--parts] [--profile] [--tree] [--fsync-mb 200]
[--compare SRC]`` (``--skip-pairs``: only the other parts; ``--compare SRC``: also the yolosafe of the source tree
SRC, e.g. an older checkout, put first on its PYTHONPATH, in the same rounds). On a shared machine measure few pairs
and read the medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from yolosafe import bench
from yolosafe.planning import datasets
from yolosafe.rundir import files as rundir

YOLOSAFE = shutil.which("yolosafe") or str(Path(sys.executable).with_name("yolosafe"))
WORKLOAD = {"imgsz": 128, "batch": 4, "workers": 0, "device": "cpu"}
PLAIN = """
import json, sys, time
from ultralytics import YOLO
data, epochs, project, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
seen = {}
model = YOLO("yolov8n.yaml")
model.add_callback("on_train_epoch_start", lambda trainer: seen.setdefault("first_epoch", time.time()))
model.add_callback("on_val_end", lambda validator: seen.update(last_val_end=time.time()))
model.train(data=data, epochs=epochs, project=project, name="train", exist_ok=True, **json.loads(sys.argv[5]))
open(out, "w").write(json.dumps(seen))
"""
PARTS = ("tee", "filter", "tree", "events", "checkpoint", "peaks", "heartbeat", "clear-before-val")
WATCHED = ("_tee", "write", "refresh", "_record", "save_model", "validate", "save_metrics", "clear_cache",
           "epoch_peaks", "append_jsonl", "on_val_start", "maybe_inject", "on_train_batch_start", "preprocess_batch")


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, float]:
    """Start time, wall and CPU seconds of ``cmd``'s whole process tree (every descendant was waited for)."""
    cpu, t0 = cpu_of_children(), time.time()
    subprocess.run(cmd, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return t0, time.time() - t0, cpu_of_children() - cpu


def run_plain(work: Path, data: Path, epochs: int, env: dict[str, str]) -> dict[str, float]:
    work.mkdir(parents=True)
    out = work / "times.json"
    t0, wall, cpu = timed([sys.executable, "-c", PLAIN, str(data), str(epochs), str(work / "runs"), str(out),
                           json.dumps(WORKLOAD)], env, work)
    seen = json.loads(out.read_text())
    return {"wall": wall, "cpu": cpu, "start": seen["first_epoch"] - t0, "supervisor": 0.0,
            "train": seen["last_val_end"] - seen["first_epoch"], "end": t0 + wall - seen["last_val_end"]}


def warm_check(work: Path, data: Path, epochs: int, env: dict[str, str]) -> None:
    """A dry run of the workload: the input check's verdict is then in the cache the timed runs share."""
    work.mkdir(parents=True)
    cmd = [YOLOSAFE, "train", "--dry-run", "--model", "yolov8n.yaml", "--data", str(data), "--gpus", "cpu",
           "--batch", str(WORKLOAD["batch"]), "--imgsz", str(WORKLOAD["imgsz"]), "--epochs", str(epochs),
           "--project", str(work / "runs"), "--name", "train", "workers=0"]
    subprocess.run(cmd, env=env, cwd=work, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_yolosafe(work: Path, data: Path, epochs: int, env: dict[str, str], off: str = "") -> dict[str, float]:
    work.mkdir(parents=True)
    flags = [f"{k}={v}" for k, v in WORKLOAD.items() if k == "workers"]
    cmd = [YOLOSAFE, "train", "--model", "yolov8n.yaml", "--data", str(data), "--gpus", WORKLOAD["device"],
           "--batch", str(WORKLOAD["batch"]), "--val-batch", str(2 * WORKLOAD["batch"]), "--imgsz",
           str(WORKLOAD["imgsz"]), "--epochs", str(epochs), "--project", str(work / "runs"), "--name", "train", *flags]
    if off == "clear-before-val":
        cmd.insert(2, "--no-clear-before-val")
    elif off:
        env = {**env, bench.BENCH_OFF_ENV: off}
    t0, wall, cpu = timed(cmd, env, work)
    run_dir = work / "runs" / "train"
    events = list(rundir.read_jsonl(run_dir / rundir.EVENTS))  # none with the events switched off: no segments
    first = next((e["t"] for e in events if e["event"] == "train_start"), math.nan)
    last = max((e["t"] for e in events if e["event"] == "val_end"), default=math.nan)
    spec = (run_dir / "spec-1.json").stat().st_mtime
    return {"wall": wall, "cpu": cpu, "start": first - t0, "supervisor": spec - t0, "train": last - first,
            "end": t0 + wall - last}


def pairs(scratch: Path, data: Path, env: dict[str, str], epochs: int, count: int,
          compare: str | None) -> dict[str, list[dict]]:
    """``count`` rounds of plain and yolosafe (and the yolosafe of ``compare``), the order rotated each round."""
    kinds = ["plain", "yolosafe", *(["compared"] if compare else [])]
    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for pair in range(count):
        for kind in kinds[pair % len(kinds):] + kinds[:pair % len(kinds)]:
            work = scratch / f"{kind}-{epochs}e-{pair}"
            if kind == "plain":
                runs[kind].append(run_plain(work, data, epochs, env))
            else:
                tree = {**env, "PYTHONPATH": compare} if kind == "compared" and compare else env
                runs[kind].append(run_yolosafe(work, data, epochs, tree))
            shutil.rmtree(work, ignore_errors=True)
    return runs


def median_diff(a: list[dict], b: list[dict], key: str) -> float:
    return statistics.median(x[key] - y[key] for x, y in zip(a, b, strict=True))


def show_pairs(epochs: int, runs: dict[str, list[dict]], kind: str = "yolosafe") -> dict[str, float]:
    ys, pl = runs[kind], runs["plain"]
    label = "yolosafe" if kind == "yolosafe" else "compared"
    print(f"{epochs} epochs, {label}, {len(ys)} pair(s), medians:")
    for key in ("wall", "cpu"):
        ratio = statistics.median(x[key] / y[key] for x, y in zip(ys, pl, strict=True))
        print(f"  {key:<4} plain {statistics.median(r[key] for r in pl):6.2f} s, {label} "
              f"{statistics.median(r[key] for r in ys):6.2f} s: ratio {ratio:.3f} (median of pair ratios); "
              f"plain {[round(r[key], 2) for r in pl]}, {label} {[round(r[key], 2) for r in ys]}")
    found = {key: median_diff(ys, pl, key) for key in ("wall", "cpu", "start", "supervisor", "train", "end")}
    print(f"  {label} minus plain (median of pairs): start-up {found['start']:+.3f} s (supervisor until the worker "
          f"starts {found['supervisor']:+.3f} s, the worker's start beyond plain's "
          f"{found['start'] - found['supervisor']:+.3f} s), epochs {found['train']:+.3f} s = "
          f"{found['train'] / epochs:+.3f} s per epoch (plain's epoch "
          f"{statistics.median(r['train'] for r in pl) / epochs:.3f} s), teardown {found['end']:+.3f} s")
    return found


def show_fixed(found: dict[int, dict[str, float]]) -> None:
    """Per-epoch and fixed cost from the whole runs at two epoch counts (wall and CPU)."""
    lo, hi = min(found), max(found)
    for key in ("wall", "cpu"):
        per_epoch = (found[hi][key] - found[lo][key]) / (hi - lo)
        fixed = found[lo][key] - lo * per_epoch
        print(f"  from the whole runs ({key}): per epoch {per_epoch:+.3f} s, fixed {fixed:+.3f} s")


def parts(scratch: Path, data: Path, env: dict[str, str], epochs: int, count: int,
          only: tuple[str, ...] = PARTS) -> None:
    """Each part switched off in turn against all on, alternated."""
    runs: dict[str, list[dict]] = {"": [], **{part: [] for part in only}}
    for pair in range(count):
        order = ["", *only] if pair % 2 == 0 else [*only, ""]
        for off in order:
            work = scratch / f"parts-{off or 'on'}-{pair}"
            runs[off].append(run_yolosafe(work, data, epochs, env, off))
            shutil.rmtree(work, ignore_errors=True)
    on = runs[""]
    print(f"parts, yolosafe at {epochs} epochs, all on against each off, {count} round(s), median of on minus off:")
    for part in only:
        off = runs[part]
        segments = "per epoch (no events: n/a)" if part == "events" else (
            f"per epoch {median_diff(on, off, 'train') / epochs * 1000:+7.1f} ms wall; start-up "
            f"{median_diff(on, off, 'start') * 1000:+7.1f} ms")
        print(f"  {part:<17} {segments}; whole run wall {median_diff(on, off, 'wall'):+.3f} s, CPU "
              f"{median_diff(on, off, 'cpu'):+.3f} s = {median_diff(on, off, 'cpu') / epochs * 1000:+.1f} ms per "
              f"epoch")


def profile(scratch: Path, data: Path, env: dict[str, str], epochs: int) -> None:
    """The supervisor and the worker under cProfile: the seconds of each yolosafe function."""
    work = scratch / "profile"
    folder = work / "prof"
    folder.mkdir(parents=True)
    runner = ("import cProfile, sys, time\nfrom yolosafe.cli.main import main\n"
              "p = cProfile.Profile(time.process_time)\n"
              "try:\n    p.runcall(main, sys.argv[2:])\nexcept SystemExit:\n    pass\n"
              "p.dump_stats(sys.argv[1])\n")
    cmd = [sys.executable, "-c", runner, str(folder / "supervisor.prof"), "train", "--model", "yolov8n.yaml",
           "--data", str(data), "--gpus", "cpu", "--batch", str(WORKLOAD["batch"]), "--val-batch",
           str(2 * WORKLOAD["batch"]), "--imgsz",
           str(WORKLOAD["imgsz"]), "--epochs", str(epochs), "--project", str(work / "runs"), "--name", "train",
           "workers=0"]
    timed(cmd, {**env, bench.BENCH_PROFILE_ENV: str(folder)}, work)
    for path in sorted(folder.glob("*.prof")):
        stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
        clock = "CPU" if path.name.startswith("supervisor") else "wall"
        print(f"profile of the {path.stem.split('-')[0]} ({clock} seconds, cumulative, yolosafe's functions):")
        inside = ultralytics_share(stats)
        rows = [(ct - inside.get(key, 0.0), ct, nc, f"{Path(key[0]).parent.name}/{Path(key[0]).name}:{key[2]}")
                for key, (_cc, nc, _tt, ct, _callers) in stats.items() if "yolosafe" in key[0] and key[2] in WATCHED]
        for own, ct, nc, where in sorted(rows, reverse=True)[:14]:
            print(f"  {own:8.3f} s own ({ct:7.3f} s with Ultralytics' part)  {nc:6d} calls  {where}")
        first = [(ct, f"{Path(file).parent.name}/{Path(file).name}:{name}")
                 for (file, _line, name), (_cc, _nc, _tt, ct, _callers) in stats.items()
                 if name in ("new_run", "run_attempt", "warn_unsupported_ultralytics", "_observed", "<module>")
                 and "yolosafe" in file and "benchmarks" not in file]
        for ct, where in sorted(first, reverse=True)[:8]:
            print(f"  {ct:8.3f} s  (start)      {where}")
    shutil.rmtree(work, ignore_errors=True)


def ultralytics_share(stats: dict) -> dict[tuple, float]:
    """Per yolosafe function, the seconds spent in the Ultralytics (and torch) functions it called: what it wraps."""
    found: dict[tuple, float] = {}
    for (file, _line, _name), (*_, callers) in stats.items():
        if "site-packages/ultralytics" in file or "site-packages/torch" in file:
            for caller, (_cc, _nc, _tt, ct) in callers.items():
                if "yolosafe" in caller[0]:
                    found[caller] = found.get(caller, 0.0) + ct
    return found


TREE = """
import os, subprocess, sys, time
import psutil
from yolosafe.proc import ProcessTree
sleeper = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
for n in (1, 9, 33):  # each child has a child of its own (a rank and its dataloader worker)
    kids = [subprocess.Popen([sys.executable, "-c", sleeper + "time.sleep(60)"]) for _ in range(n)]
    time.sleep(2)
    tree = ProcessTree(os.getpid())
    tree.refresh()
    used = time.process_time()
    for _ in range(10):
        known = len(tree.refresh())
    print(known, (time.process_time() - used) / 10, flush=True)
    for proc in list(tree._known.values())[1:]:
        try:
            proc.kill()
        except psutil.Error:
            pass
    for kid in kids:
        kid.wait()
"""


def tree_cost(env: dict[str, str], compare: str | None) -> None:
    """CPU of one refresh of the process tree (every 0.5 s while an attempt runs) by how many processes it knows."""
    for label, tree in (("yolosafe", env), *((("compared", {**env, "PYTHONPATH": compare}),) if compare else ())):
        done = subprocess.run([sys.executable, "-c", TREE], env=tree, capture_output=True, text=True, check=True)
        for line in done.stdout.split("\n"):
            if line.strip():
                known, seconds = line.split()
                print(f"process tree, {label}: {int(known):3d} processes known, {float(seconds) * 1000:6.1f} ms CPU "
                      f"per refresh = {float(seconds) / 0.5:.1%} of one core at one refresh per 0.5 s")


def write_file(path: Path, data: bytes, sync: bool) -> float:
    started = time.perf_counter()
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        if sync:
            os.fsync(fh.fileno())
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed


def fsync_cost(scratch: Path, megabytes: int) -> None:
    for label, size in ((f"{megabytes} MB file", megabytes << 20), ("6 MB checkpoint (this workload's last.pt)",
                                                                    6 << 20)):
        data = os.urandom(size)
        plain = statistics.median(write_file(scratch / "fsync.bin", data, False) for _ in range(3))
        synced = statistics.median(write_file(scratch / "fsync.bin", data, True) for _ in range(3))
        print(f"fsync, {label} on {scratch}: write {plain * 1000:.0f} ms, write + fsync {synced * 1000:.0f} ms "
              f"(+{(synced - plain) * 1000:.0f} ms, {synced / plain:.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--epochs", default="2,8", help="epoch counts to compare, comma-separated")
    parser.add_argument("--skip-pairs", action="store_true")
    parser.add_argument("--parts", action="store_true", help="switch each part off in turn (at the last --epochs)")
    parser.add_argument("--parts-rounds", type=int, default=2)
    parser.add_argument("--parts-only", help=f"these parts only, comma-separated ({', '.join(PARTS)})")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--tree", action="store_true", help="CPU of a process tree refresh by processes known")
    parser.add_argument("--fsync-mb", type=int, default=0, help="time fsync of a file this big (0: not)")
    parser.add_argument("--compare", help="also run the yolosafe of this source tree (its PYTHONPATH), alternated")
    parser.add_argument("--scratch", help="folder for the runs (default: a new one under the temp folder)")
    args = parser.parse_args()
    epochs = [int(e) for e in args.epochs.split(",")]
    scratch = Path(tempfile.mkdtemp(prefix="yolosafe-overhead-", dir=args.scratch))
    data = datasets.ensure_shapes(scratch / "data", train=16, val=8, size=128)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLOSAFE_", "PYTORCH_"))}
    env.update(YOLO_OFFLINE="1", YOLO_CONFIG_DIR=str(scratch / "ultralytics"), YOLOSAFE_CACHE=str(scratch / "cache"))
    print(f"workload: yolov8n.yaml, 16 train / 8 val images, {WORKLOAD}; {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.1f}")
    try:
        run_plain(scratch / "warm-up", data, 1, env)  # Ultralytics' settings and the labels cache, outside timing
        # The input check's verdict for these inputs, as any earlier run of them leaves it in the cache: the timed
        # runs measure a repeated training (a first one of new inputs adds the check's child, about 1.5 s here).
        for count in epochs:
            warm_check(scratch / f"warm-up-check-{count}", data, count, env)
        if not args.skip_pairs:
            runs = {e: pairs(scratch, data, env, e, args.pairs, args.compare) for e in epochs}
            for kind in ("yolosafe", *(["compared"] if args.compare else [])):
                found = {e: show_pairs(e, runs[e], kind) for e in epochs}
                if len(epochs) >= 2:
                    show_fixed(found)
        if args.parts:
            only = tuple(args.parts_only.split(",")) if args.parts_only else PARTS
            parts(scratch, data, env, epochs[-1], args.parts_rounds, only)
        if args.profile:
            profile(scratch, data, env, epochs[-1])
        if args.tree:
            tree_cost(env, args.compare)
        if args.fsync_mb:
            fsync_cost(scratch, args.fsync_mb)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
