"""Stand-ins for the doctor and fix tests: real processes that hold (fake) GPU memory, fake GPUs whose processes are
those pids, and run directories written through yolosafe's own records (never the schema by hand)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from yolosafe.rundir import files as rundir
from yolosafe.rundir import records

MESSAGE = (
    "CUDA out of memory. Tried to allocate 300.00 MiB. GPU 1 has a total capacity of 47.50 GiB of which 194.56 MiB "
    "is free. Including non-PyTorch memory, this process has 47.31 GiB memory in use. Of the allocated memory "
    "45.84 GiB is allocated by PyTorch, and 2302.00 MiB is reserved by PyTorch but unallocated."
)
FIGURES = {"gpu": 1, "tried_mib": 300.0, "total_mib": 48640.0, "free_mib": 194.56, "reserved_unallocated_mib": 2302.0}
SLEEPER = "import time; time.sleep(600)"


def fake_gpus(*holders: list[tuple[int, float]], total: float = 48640.0) -> str:
    """YOLOSAFE_FAKE_GPUS JSON: one GPU per argument, each with its (pid, MiB) holders."""
    gpus = [{"name": "NVIDIA A100", "total_mib": total, "used_mib": sum(m for _, m in procs),
             "processes": [{"pid": pid, "used_mib": mib} for pid, mib in procs]} for procs in holders]
    return json.dumps({"driver": "550.54.15", "cuda": "12.4", "gpus": gpus})


def attempt(n: int, batch: int, val_batch: int, outcome: str, phase: str | None, epoch: int | None, nbs: int = 64,
            world: int = 2, next_step: str | None = None) -> records.Attempt:
    return records.Attempt(attempt=n, batch=batch, per_gpu_batch=batch // world, val_batch=val_batch, nbs=nbs,
                           accumulate=max(round(nbs / batch), 1), outcome=outcome, phase=phase, epoch=epoch,
                           exit_code=0 if outcome == "completed" else 1, next=next_step,
                           gpu=1 if outcome == "oom" else None, rank=1 if outcome == "oom" else None)


def failure(n: int, phase: str, epoch: int, per_gpu_batch: int, val_batch: int) -> records.Failure:
    return records.Failure(attempt=n, rank=1, oom=True, phase=phase, epoch=epoch, iteration=12, batch=per_gpu_batch,
                           val_batch=val_batch, gpu=1, pid=99999, t=1_700_000_000.0 + n, error="OutOfMemoryError",
                           message=MESSAGE, figures=FIGURES)


def write_run(run: Path, attempts: list[records.Attempt], outcome: str, failures: list[records.Failure],
              batch: int = 32, nbs: int | None = 64, val_batch: int = 16, gpus: tuple[int, ...] = (0, 1)) -> Path:
    """A run directory as the supervisor and the trainer write it, through the records module."""
    run.mkdir(parents=True)
    world = max(len(gpus), 1)
    effective = nbs or batch * max(round(64 / batch), 1)
    plan = {"model": "yolov8s.yaml", "data": "coco.yaml", "gpus": list(gpus), "batch": batch,
            "effective_batch": effective, "val_batch": val_batch, "imgsz": 1280, "epochs": 200, "extra": {},
            "device": ",".join(map(str, gpus)) or "cpu", "per_gpu_batch": batch // world,
            "accumulate": max(round(effective / batch), 1)}
    command = ["yolosafe", "train", "--gpus", plan["device"], "--batch", str(batch)]
    story = records.Story(plan=plan, attempts=attempts, outcome=outcome, run_dir=str(run), command=command,
                          dataset={"name": "coco", "yaml": "coco.yaml"},
                          allocator={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    records.save_story(run, story)
    for record in failures:
        records.save_failure(run, record)
    return run


def oom_run(run: Path, nbs: int | None = 64) -> Path:
    """An OOM in validation at the trainer's epoch 133 (epoch 134/200 as printed; val batch 16 -> 8), then one in
    training at its epoch 140; retries used up."""
    return write_run(run, [attempt(1, 32, 16, "oom", "val", 133, next_step="val batch 16 -> 8 per GPU"),
                           attempt(2, 32, 8, "oom", "train", 140)],
                     "oom_exhausted", [failure(1, "val", 133, 16, 16), failure(2, "train", 140, 16, 8)], nbs=nbs)


class Processes:
    """Real processes started for a test, all stopped at its end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[subprocess.Popen] = []
        self.orphans: list[int] = []

    def start(self, argv: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kwargs)
        self.started.append(proc)
        return proc

    def sleep(self) -> subprocess.Popen:
        return self.start(["sleep", "600"])

    def named(self, name: str) -> subprocess.Popen:
        """A program with that file name (a copy of sleep): NVIDIA daemons, display servers."""
        program = self.tmp / name
        shutil.copy(shutil.which("sleep"), program)
        return self.start([str(program), "600"])

    def jupyter(self) -> subprocess.Popen:
        return self.start([sys.executable, "-c", SLEEPER, "-m", "ipykernel_launcher", "-f", "kernel-3f2a.json"])

    def yolosafe_worker(self, run: Path) -> subprocess.Popen:
        """A worker of a live run: yolosafe's run marker in its environment, this test as its supervisor."""
        env = {**os.environ, rundir.RUN_DIR_ENV: str(run)}
        return self.start([sys.executable, "-c", SLEEPER, "-m", "yolosafe.training.worker"], env=env)

    def orphaned_rank(self, run: Path, command: str | None = None) -> int:
        """A DDP rank whose worker and supervisor are gone: started through a shell that exits at once, so the
        rank is re-parented to pid 1. Its run is a yolosafe run whose supervisor ended (its story and run spec are
        there, nobody holds its lock); ``command`` instead of the rank's own (``python -m yolosafe.training.worker
        RUN/spec-1.json``, its argv as a real rank's: :func:`asleep` keeps it from running the worker)."""
        spec = stale_run(run)
        env = {**asleep(self.tmp), rundir.RUN_DIR_ENV: str(run)}
        command = command or f"{sys.executable} -m yolosafe.training.worker {spec}"
        out = subprocess.run(["sh", "-c", f"{command} >/dev/null 2>&1 & echo $!"], env=env,
                             capture_output=True, text=True, check=True)
        pid = int(out.stdout)
        self.orphans.append(pid)
        for _ in range(100):  # the shell has exited once the rank is adopted
            if psutil.Process(pid).ppid() != os.getpid():
                break
            time.sleep(0.02)
        return pid

    def stop(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for pid in self.orphans:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()


def stale_run(run: Path, node: int = 0) -> Path:
    """A run directory as a dead supervisor left it: its story and attempt 1's run spec (a real one, naming the
    run); returns the spec."""
    from yolosafe.rundir.runspec import RunSpec

    run.mkdir(parents=True, exist_ok=True)
    if not (run / rundir.STORY).exists():
        rundir.write_json(run / rundir.STORY, {"outcome": "running", "attempts": [{"attempt": 1}]})
        day_ago = time.time() - 86400  # an earlier run: never taken for the newest one
        os.utime(run / rundir.STORY, (day_ago, day_ago))
    spec = RunSpec(attempt=1, mode="train", world_size=1, fake_gpus=False, run_dir=str(run), model="yolov8n.yaml",
                   resume=None, val_batch=1, clear_before_val=False, cuda_visible_devices=None, node_rank=node)
    return spec.save()


def asleep(tmp: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """An environment in which a Python process sleeps before it runs anything (a ``sitecustomize`` on its path):
    a stand-in whose ``argv`` is exactly a worker's or a rank's (``python -m yolosafe.training.worker SPEC``)."""
    stub = tmp / "asleep"
    stub.mkdir(exist_ok=True)
    (stub / "sitecustomize.py").write_text(SLEEPER + "\n")
    return {**(os.environ if env is None else env), "PYTHONPATH": str(stub)}


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
