"""What the memory watch costs: CPU of the sampler thread, and the wall time of a real training with it on and off.

1. The sampler alone, in this process, for ``--seconds`` at 10 Hz and 50 Hz, sampling four fake GPUs (scripted phase
   memory, so every read parses the phase file) and matching pids against a real process tree (this process and a
   sleeping child): CPU seconds used (``time.process_time`` while the main thread sleeps, minus an idle baseline)
   as a share of one core. The same with real NVML when a GPU is present.
2. ``yolosafe train`` (TINY, fake 4x24GB GPUs, so the worker trains on the CPU) with ``--watch-interval 0.1`` and
   ``--watch-interval 0`` (off), alternately, ``--pairs`` times each: the median wall times and their ratio, for the
   training itself (the attempt, from yolosafe.json: the sampler runs beside it) and for the whole command (which,
   with the watch on, ends by writing the report: pandas, matplotlib, the plot), the median of the per-pair ratios,
   and the sampler thread's own CPU time in those runs (``cpu_s`` in yolosafe.json) per second of training.

3. NVML's calls per sample (``--nvml-calls``, alone: no training): nvidia-ml-py's real functions over the faked
   driver library of the tests (``tests/fake_nvml.py``: each C symbol counts its calls), 1 and 8 GPUs with two
   compute processes each, after the watch's first sample (NVML opened, handles cached): the C calls of one sample
   (``read_memory`` of every GPU, what each tick of the watch asks), per symbol, and per second at the default
   0.1 s interval. No graphics-process list is asked (a CUDA job's processes are compute processes).

Usage: ``python benchmarks/watch_overhead.py [--seconds 5] [--pairs 3] [--epochs 2]``,
``python benchmarks/watch_overhead.py --nvml-calls``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from yolosafe import gpus
from yolosafe.proc import ProcessTree
from yolosafe.rundir import files as rundir
from yolosafe.supervisor.watch import MemoryWatch

YOLOSAFE = shutil.which("yolosafe") or str(Path(sys.executable).with_name("yolosafe"))
TINY = ["--imgsz", "64", "--batch", "8", "--effective-batch", "16", "workers=0", "plots=False"]
FAKE = json.dumps({"gpus": [{"total_mib": 24576, "used_mib": 1000, "processes": [{"pid": 4242, "used_mib": 1000}],
                             "phase_mib": {"train": 3000, "val": 9000}} for _ in range(4)]})


def cpu_share(make_backend, gpu_ids: list[int], hz: float, seconds: float, workdir: Path) -> tuple[float, int]:
    """Share of one core the sampler thread used, and how many samples it took."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    tree = ProcessTree(os.getpid())
    tree.refresh()
    try:
        idle = time.process_time()
        time.sleep(seconds)
        idle = time.process_time() - idle
        watch = MemoryWatch(workdir, gpu_ids, 1 / hz, 0.99, make_backend, lambda line: None)
        used = time.process_time()
        watch.start(1, tree.pids)
        time.sleep(seconds)
        watch.stop()
        used = time.process_time() - used
    finally:
        child.kill()
        child.wait()
    (workdir / rundir.MEMORY_CSV).unlink(missing_ok=True)
    return max(used - idle, 0.0) / seconds, watch.samples


def train(workdir: Path, env: dict[str, str], interval: float, epochs: int) -> tuple[float, float, float]:
    """Wall seconds of the training attempt(s) and of the whole command; CPU seconds of the sampler thread."""
    workdir.mkdir()
    started = time.perf_counter()
    subprocess.run([YOLOSAFE, "train", "--gpus", "0,1,2,3", "--epochs", str(epochs), "--watch-interval", str(interval),
                    *TINY], cwd=workdir, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = time.perf_counter() - started
    story = rundir.read_json(workdir / "runs" / "detect" / "train" / rundir.STORY)
    sampler = story.get("memory_watch", {}).get("cpu_s", 0.0)
    return sum(a["duration_s"] for a in story["attempts"]), total, sampler


def nvml_calls(count: int, ticks: int = 100) -> dict[str, float]:
    """C calls per watch sample of ``count`` GPUs, per symbol, over the faked driver library."""
    import pytest

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests import fake_nvml

    processes = [(4242, 1000), (4343, 500)]
    driver = fake_nvml.Driver([fake_nvml.gpu(i, used_mib=1500, processes=processes) for i in range(count)])
    with pytest.MonkeyPatch.context() as patch:
        fake_nvml.install(patch, driver)
        backend = gpus.NvmlBackend()
        try:
            for index in range(count):  # the first sample: NVML opened, handles looked up and cached
                backend.read_memory(index)
            before = dict(driver.calls)
            for _ in range(ticks):
                for index in range(count):
                    backend.read_memory(index)
            after = dict(driver.calls)
        finally:
            backend.close()
    return {name: (n - before.get(name, 0)) / ticks for name, n in after.items() if n > before.get(name, 0)}


def print_nvml_calls(interval: float = 0.1) -> None:
    print(f"NVML C calls per watch sample (nvidia-ml-py over tests/fake_nvml.py), and per second at {interval:g} s")
    for count in (1, 8):
        per = nvml_calls(count)
        total = sum(per.values())
        detail = ", ".join(f"{name} {n:g}" for name, n in sorted(per.items()))
        print(f"  {count} GPU{'s' if count > 1 else ' '}: {total:g} calls per sample ({total / count:g} per GPU), "
              f"{total / interval:g} per second; {detail}")
        graphics = [name for name in per if "Graphics" in name]
        print(f"          graphics-process calls: {graphics or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--nvml-calls", action="store_true", help="only NVML's calls per sample (1 and 8 GPUs)")
    args = parser.parse_args()
    if args.nvml_calls:
        print_nvml_calls()
        return
    scratch = Path(tempfile.mkdtemp(prefix="yolosafe-watch-bench-"))
    phase_file = scratch / rundir.FAKE_PHASE
    rundir.write_json(phase_file, {"phase": "val", "pid": os.getpid(), "epoch": 0})
    fake_env = {gpus.FAKE_ENV: FAKE, gpus.PHASE_FILE_ENV: str(phase_file)}

    print(f"sampler CPU, {args.seconds:g} s per rate ({os.cpu_count()} cores)")
    backends = [("fake, 4 GPUs", lambda: gpus.FakeBackend(FAKE, fake_env), [0, 1, 2, 3])]
    real = gpus.read_inventory({})
    if real.gpus:
        backends.append((f"NVML, {len(real.gpus)} GPU(s)", gpus.NvmlBackend, list(real.ids)))
    else:
        print(f"  real NVML: not measured ({real.problem})")
    for label, make, ids in backends:
        for hz in (10, 50):
            share, samples = cpu_share(make, ids, hz, args.seconds, scratch)
            rate = samples / len(ids) / args.seconds
            print(f"  {label:<16} {hz:>3} Hz: {share:7.3%} of one core  ({rate:.1f} ticks/s achieved)")

    base = {k: v for k, v in os.environ.items() if not k.startswith(("YOLOSAFE_", "PYTORCH_"))}
    base.update(YOLOSAFE_CACHE=str(scratch / "cache"), YOLO_CONFIG_DIR=str(scratch / "ultralytics"),
                YOLOSAFE_FAKE_GPUS="4x24GB")
    times: dict[str, list[tuple[float, float, float]]] = {"on": [], "off": []}
    train(scratch / "warm-up", base, 0, 1)  # builds the synthetic dataset once, outside the measurement
    for pair in range(args.pairs):
        for mode, interval in (("on", 0.1), ("off", 0)) if pair % 2 == 0 else (("off", 0), ("on", 0.1)):
            times[mode].append(train(scratch / f"{mode}{pair}", base, interval, args.epochs))
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"yolosafe train, TINY, {args.epochs} epochs, fake 4x24GB (CPU training), {args.pairs} alternating pairs")
    for column, what in ((0, "training (attempt)"), (1, "whole command")):
        on = statistics.median(t[column] for t in times["on"])
        off = statistics.median(t[column] for t in times["off"])
        paired = statistics.median(a[column] / b[column] for a, b in zip(times["on"], times["off"], strict=True))
        print(f"  {what:<19} watch on (10 Hz) {on:6.2f} s, off {off:6.2f} s (medians): ratio {on / off:.3f}, "
              f"median of pair ratios {paired:.3f}")
        print(f"  {'':<19} on {[round(t[column], 2) for t in times['on']]}, off "
              f"{[round(t[column], 2) for t in times['off']]}")
    sampler = sum(t[2] for t in times["on"]) / sum(t[0] for t in times["on"])
    print(f"  sampler thread CPU during those trainings: {sampler:.3%} of one core")


if __name__ == "__main__":
    main()
