"""scripts/diagnose_gpu_memory.sh and scripts/fix_gpu_memory.sh, run as a user runs them: bash in a scratch working
directory, fake GPUs (YOLOSAFE_FAKE_GPUS) whose processes are real processes started here, and a run directory
written by hand in the format of yolosafe/supervise.py (yolosafe.json) and yolosafe/trainer.py (failure records).
No training: a few seconds in all."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from yolosafe import cli

ROOT = Path(__file__).resolve().parent.parent
DIAGNOSE = ROOT / "scripts" / "diagnose_gpu_memory.sh"
FIX = ROOT / "scripts" / "fix_gpu_memory.sh"
VENV_BIN = Path(sys.executable).parent

MESSAGE = (
    "CUDA out of memory. Tried to allocate 300.00 MiB. GPU 1 has a total capacity of 47.50 GiB of which 194.56 MiB "
    "is free. Including non-PyTorch memory, this process has 47.31 GiB memory in use. Of the allocated memory "
    "45.84 GiB is allocated by PyTorch, and 2302.00 MiB is reserved by PyTorch but unallocated."
)
FIGURES = {"gpu": 1, "tried_mib": 300.0, "total_mib": 48640.0, "free_mib": 194.56, "process_mib": 48445.44,
           "allocated_mib": 46940.16, "reserved_unallocated_mib": 2302.0}
CONFIG = """# my training
batch: 32   # total, over both GPUs
gpus: [0, 1]
imgsz: 1280
epochs: 200
args:
  lr0: 0.01
"""


# --- a hand-written run directory ---------------------------------------------------------------------------------

def attempt(n: int, batch: int, val_batch: int, outcome: str, phase: str | None, epoch: int | None,
            nbs: int = 64, world: int = 2, next_step: str | None = None) -> dict:
    """An entry of yolosafe.json's "attempts", as Supervisor.run writes it."""
    entry = {
        "attempt": n, "mode": "train", "started": "2025-01-01T10:00:00+0000", "batch": batch,
        "per_gpu_batch": batch // world, "val_batch": val_batch, "nbs": nbs, "accumulate": max(round(nbs / batch), 1),
        "resumed_from": None if n == 1 else f"weights/last-before-attempt{n}.pt", "duration_s": 3600.0,
        "exit_code": 0 if outcome == "completed" else 1, "outcome": outcome,
        "reason": MESSAGE if outcome == "oom" else "", "phase": phase, "epoch": epoch,
        "rank": 1 if outcome == "oom" else None, "gpu": 1 if outcome == "oom" else None, "resumed_from_epoch": None,
    }
    if next_step:
        entry["next"] = next_step
    return entry


def failure(n: int, phase: str, epoch: int, per_gpu_batch: int, val_batch: int) -> dict:
    """failure-N-rank1.json, as trainer.write_failure writes it for an OOM on rank 1 (GPU 1)."""
    return {"t": 1_700_000_000.0 + n, "oom": True, "error": "OutOfMemoryError", "message": MESSAGE, "phase": phase,
            "epoch": epoch, "iteration": 12, "rank": 1, "pid": 99999, "batch": per_gpu_batch, "val_batch": val_batch,
            "attempt": n, "figures": FIGURES, "traceback": [], "gpu": 1}


def write_run(run: Path, attempts: list[dict], outcome: str, failures: list[dict], batch: int = 32,
              nbs: int = 64, val_batch: int = 16, others: int | None = None) -> Path:
    run.mkdir(parents=True)
    story = {
        "yolosafe": "0.1.0",
        "command": ["yolosafe", "train", "--gpus", "0,1", "--batch", str(batch), "--effective-batch", str(nbs)],
        "run_dir": str(run),
        "dataset": {"name": "coco", "yaml": "coco.yaml"},
        "plan": {"model": "yolov8s.yaml", "data": "coco.yaml", "gpus": [0, 1], "batch": batch, "effective_batch": nbs,
                 "val_batch": val_batch, "imgsz": 1280, "epochs": 200, "extra": {}, "device": "0,1",
                 "per_gpu_batch": batch // 2, "accumulate": max(round(nbs / batch), 1),
                 "real_effective_batch": batch * max(round(nbs / batch), 1)},
        "allocator": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
                      "PYTORCH_ALLOC_CONF": "expandable_segments:True"},
        "gpu_backend": "nvml",
        "gpus": [{"index": 0, "name": "A100", "total_mib": 48640.0, "used_mib": 0.0, "processes": []},
                 {"index": 1, "name": "A100", "total_mib": 48640.0, "used_mib": 13000.0 if others else 0.0,
                  "processes": [{"pid": others, "used_mib": 13000.0}] if others else []}],
        "simulated_on_cpu": False,
        "max_retries": 1,
        "min_batch": 1,
        "attempts": attempts,
        "outcome": outcome,
    }
    (run / "yolosafe.json").write_text(json.dumps(story, indent=2))
    for record in failures:
        (run / f"failure-{record['attempt']}-rank{record['rank']}.json").write_text(json.dumps(record, indent=2))
    return run


def oom_run(run: Path, others: int | None = None) -> Path:
    """4-GPU post-mortem in small: an OOM in validation at epoch 133 (val batch 16 -> 8), then one in training at
    epoch 140, retries used up."""
    return write_run(
        run,
        [attempt(1, 32, 16, "oom", "val", 133, next_step="val batch 16 -> 8 per GPU"),
         attempt(2, 32, 8, "oom", "train", 140)],
        "oom_exhausted",
        [failure(1, "val", 133, 16, 16), failure(2, "train", 140, 16, 8)],
        others=others,
    )


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# --- processes that hold (fake) GPU memory -------------------------------------------------------------------------

class Holders:
    """Real processes for the fake GPUs' process lists; all stopped at the end of the test."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.extra: list[int] = []

    def start(self, script: str) -> subprocess.Popen:
        proc = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.procs.append(proc)
        return proc

    def sleep(self) -> subprocess.Popen:
        proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
        self.procs.append(proc)
        return proc

    def worker_with_rank(self) -> tuple[int, int]:
        """A process whose command line is yolosafe's worker's, with a child (a DDP rank) running plain sleep."""
        proc = self.start('sleep 300 & echo $!; exec -a "python -m yolosafe.worker /tmp/run/spec-1.json" sleep 300')
        assert proc.stdout is not None
        rank = int(proc.stdout.readline())
        self.extra.append(rank)
        return proc.pid, rank

    def jupyter(self) -> int:
        return self.start('exec -a "/usr/bin/python3 -m ipykernel_launcher -f /tmp/kernel-1.json" sleep 300').pid

    def stop(self) -> None:
        for pid in self.extra:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 15)
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture
def holders() -> Iterator[Holders]:
    h = Holders()
    yield h
    h.stop()


def fake_gpus(*gpus: list[tuple[int, int]]) -> str:
    """YOLOSAFE_FAKE_GPUS JSON: one 47.5 GiB GPU per argument, each a list of (pid, MiB)."""
    return json.dumps({"driver": "550.54.15", "cuda": "12.4", "gpus": [
        {"name": "NVIDIA A100", "total_mib": 48640, "used_mib": sum(m for _, m in procs),
         "processes": [{"pid": pid, "used_mib": m} for pid, m in procs]} for procs in gpus]})


def alive(proc: subprocess.Popen) -> bool:
    return proc.poll() is None


def pid_alive(pid: int) -> bool:
    stat = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(stat) and not stat.startswith("Z")


# --- running the scripts -------------------------------------------------------------------------------------------

def script_env(tmp_path: Path, fake: str, **extra: str) -> dict[str, str]:
    drop = ("YOLOSAFE_", "PYTORCH_", "CUDA_VISIBLE_DEVICES", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}", HOME=str(tmp_path),
               YOLOSAFE_FAKE_GPUS=fake, YOLOSAFE_RC_FILE=str(tmp_path / "rc"), **extra)
    return env


def run_script(script: Path, tmp_path: Path, env: dict[str, str], *args: str, stdin=subprocess.DEVNULL,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(script), *args], cwd=tmp_path, env=env, stdin=stdin, capture_output=True,
                          text=True, timeout=timeout)


def backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".bak.*"))


# --- tests ----------------------------------------------------------------------------------------------------------

def test_scripts_parse_and_pass_shellcheck():
    for script in (DIAGNOSE, FIX):
        subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run(["shellcheck", "-x", str(DIAGNOSE), str(FIX)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_diagnose_explains_the_machine_and_the_newest_run(tmp_path, holders):
    stale = holders.sleep()
    kernel = holders.jupyter()
    worker, rank = holders.worker_with_rank()
    me = os.getpid()  # pytest: a parent of the script's shell
    fake = fake_gpus([(worker, 9000), (rank, 9000), (me, 500)], [(stale.pid, 13000), (kernel, 2000)])
    older = write_run(tmp_path / "runs" / "detect" / "train", [attempt(1, 32, 16, "completed", None, None)],
                      "completed", [])
    os.utime(older / "yolosafe.json", (time.time() - 3600, time.time() - 3600))
    oom_run(tmp_path / "runs" / "detect" / "train2", others=stale.pid)
    before = snapshot(tmp_path / "runs")

    result = run_script(DIAGNOSE, tmp_path, script_env(tmp_path, fake))

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert result.stderr == ""
    for title in ("== machine ==", "== environment ==", "== last run: runs/detect/train2 ==", "== verdict =="):
        assert title in out
    # machine: every holder looked up with ps and judged
    lines = out.splitlines()

    def judged(pid: int) -> str:
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"pid {pid} "))
        return lines[at] + "\n" + lines[at + 1]

    assert "sleep 300" in judged(stale.pid) and "another program, not yolosafe" in judged(stale.pid)
    assert "ipykernel_launcher" in judged(kernel) and "LIKELY STALE: a Jupyter" in judged(kernel)
    assert "running yolosafe worker" in judged(worker) and "running yolosafe worker" in judged(rank)
    assert "this shell or one of its parents" in judged(me)
    assert "GPU 1  NVIDIA A100: 15000 MiB used, 33640 MiB free of 48640 MiB" in out
    # environment
    assert "expandable_segments: off in this shell" in out and "RANK/LOCAL_RANK/WORLD_SIZE: none set" in out
    # the run: outcome, attempts, the OOM records with phase, epoch and GPU
    assert "outcome     oom_exhausted" in out
    assert "failure-1-rank1.json: OOM in val at epoch 133 (0-based; Ultralytics shows 134/200), rank 1, GPU 1" in out
    assert "failure-2-rank1.json: OOM in train at epoch 140" in out
    assert "tried to allocate 300 MiB, 194.6 MiB free of 47.5 GiB" in out and "2302 MiB reserved but unallocated" in out
    assert f"at launch   GPU 1: 13000 MiB already used by other processes (pids {stale.pid})" in out
    assert "memory peaks: none" in out  # no memory.csv: tolerated
    # the verdict: causes and what to do
    verdict = out.split("== verdict ==")[1]
    assert "--val-batch 8" in verdict and "--batch 16 --effective-batch 64" in verdict
    assert "fragmentation" in verdict
    assert f"kill {stale.pid}" in verdict and f"kill {kernel}" in verdict
    assert f"kill {worker}" not in verdict and f"kill {me}" not in verdict
    assert "--gpus 0" in verdict
    assert "fix_gpu_memory.sh" in verdict
    # read-only
    assert snapshot(tmp_path / "runs") == before
    assert alive(stale)


def test_diagnose_without_gpu_with_memory_summary_and_odd_environment(tmp_path):
    run = write_run(tmp_path / "elsewhere" / "run1", [attempt(1, 16, 8, "oom", "val", 3)], "oom",
                    [failure(1, "val", 3, 8, 8)], batch=16, nbs=64, val_batch=8)
    summary = {"gpus": {"0": {"total_mib": 48640.0, "peak_used_mib": 30000.0, "headroom_mib": 18640.0,
                              "peak_others_mib": 0.0,
                              "phases": {"train": {"peak_used_mib": 12000.0, "epoch_of_peak": 2},
                                         "val": {"peak_used_mib": 30000.0, "epoch_of_peak": 3}}}}}
    (run / "memory_summary.json").write_text(json.dumps(summary))
    env = script_env(tmp_path, "none", PYTORCH_CUDA_ALLOC_CONF="expandable_segments:true", RANK="0",
                     CUDA_VISIBLE_DEVICES="1")

    result = run_script(DIAGNOSE, tmp_path, env, str(run))

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "no GPU: no NVIDIA driver" in out
    assert "torch itself accepts only True/False" in out
    assert "stray DDP variables: RANK=0" in out and "CUDA_VISIBLE_DEVICES=1" in out
    assert f"== last run: {run} ==" in out
    assert "val    peak 29.3 GiB" in out and "train  peak 11.7 GiB" in out
    assert "GPU 0 peaks in validation" in out
    assert "an OOM in validation, the last at epoch 3" in out


def test_diagnose_rejects_a_directory_that_is_not_a_run(tmp_path):
    result = run_script(DIAGNOSE, tmp_path, script_env(tmp_path, "1x24GB"), str(tmp_path))
    assert result.returncode == 2
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1 and "not a yolosafe run" in result.stderr


def test_diagnose_without_yolosafe_on_path_still_reads_the_run(tmp_path):
    oom_run(tmp_path / "runs" / "detect" / "train")
    env = script_env(tmp_path, "1x24GB")
    env["PATH"] = "/usr/bin:/bin"
    if shutil.which("python3", path=env["PATH"]) is None:
        pytest.skip("no python3 in /usr/bin:/bin")
    result = run_script(DIAGNOSE, tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert "no GPU: yolosafe is not on PATH" in result.stdout
    assert "OOM in val at epoch 133" in result.stdout


def test_fix_without_yes_and_without_a_terminal_changes_nothing(tmp_path, holders):
    stale = holders.sleep()
    oom_run(tmp_path / "runs" / "detect" / "train")
    (tmp_path / "rc").write_text("alias ll='ls -l'\n")
    (tmp_path / "train.yaml").write_text(CONFIG)
    before = snapshot(tmp_path)

    result = run_script(FIX, tmp_path, script_env(tmp_path, fake_gpus([], [(stale.pid, 13000)])),
                        "--config", "train.yaml")

    assert result.returncode == 0, result.stderr
    assert result.stdout.count("[y/N] n (no terminal") == 4  # the process, the rc file, batch, val_batch
    assert "nothing changed" in result.stdout
    assert alive(stale)
    assert snapshot(tmp_path) == before  # no edit, no backup


def test_fix_with_yes_repairs_once_with_backups(tmp_path, holders):
    stale = holders.sleep()
    kernel = holders.jupyter()
    worker, rank = holders.worker_with_rank()
    me = os.getpid()
    fake = fake_gpus([(worker, 9000), (rank, 9000), (me, 500)], [(stale.pid, 13000), (kernel, 2000)])
    oom_run(tmp_path / "runs" / "detect" / "train")
    rc, config = tmp_path / "rc", tmp_path / "train.yaml"
    rc.write_text("alias ll='ls -l'\n")
    config.write_text(CONFIG)
    env = script_env(tmp_path, fake, PYTORCH_CUDA_ALLOC_CONF="max_split_size_mb:128")

    result = run_script(FIX, tmp_path, env, "--yes", "--config", "train.yaml")

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    # a. the stale holders are stopped with SIGTERM; the worker, its rank and this test are left alone
    assert stale.wait(timeout=10) == -15
    assert f"pid {stale.pid} exited" in out
    deadline = time.time() + 10
    while pid_alive(kernel) and time.time() < deadline:
        time.sleep(0.1)
    assert not pid_alive(kernel)
    assert pid_alive(worker) and pid_alive(rank)
    # b. the allocator export, merged with the user's value, appended once, after a backup
    assert rc.read_text().count("export PYTORCH_CUDA_ALLOC_CONF='max_split_size_mb:128,expandable_segments:True'") == 1
    assert rc.read_text().startswith("alias ll='ls -l'\n")
    [rc_backup] = backups(rc)
    assert rc_backup.read_text() == "alias ll='ls -l'\n"
    assert rc_backup.name[len("rc.bak."):].replace("-", "").isdigit()  # rc.bak.YYYYmmdd-HHMMSS
    # c. the config: half the batch, the old effective batch kept, half the val batch; the rest kept, comments too
    data = yaml.safe_load(config.read_text())
    assert data == {"batch": 16, "effective_batch": 64, "val_batch": 8, "gpus": [0, 1], "imgsz": 1280, "epochs": 200,
                    "args": {"lr0": 0.01}}
    assert "batch: 16   # total, over both GPUs" in config.read_text() and "# my training" in config.read_text()
    [config_backup] = backups(config)
    assert config_backup.read_text() == CONFIG
    assert "-batch: 32   # total, over both GPUs" in out and "+batch: 16   # total, over both GPUs" in out  # diff
    assert cli.load_config(str(config))["effective_batch"] == 64  # yolosafe train --config accepts it
    # the end: what was done, and the backups
    summary = out.split("== summary ==")[1]
    assert f"stopped pid {stale.pid}" in summary and f"stopped pid {kernel}" in summary
    assert str(rc_backup) in summary and config_backup.name in summary

    again = run_script(FIX, tmp_path, env, "--yes", "--config", "train.yaml")

    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing changed" in again.stdout
    assert rc.read_text().count("PYTORCH_CUDA_ALLOC_CONF") == 1 and "already turns it on" in again.stdout
    assert "already at or below 8 per GPU: unchanged" in again.stdout
    assert backups(rc) == [rc_backup] and backups(config) == [config_backup]
    assert pid_alive(worker) and pid_alive(rank)


def test_fix_config_after_a_run_that_recovered_uses_what_worked(tmp_path):
    write_run(tmp_path / "runs" / "detect" / "train",
              [attempt(1, 8, 4, "oom", "val", 1, nbs=16), attempt(2, 8, 2, "oom", "val", 1, nbs=16),
               attempt(3, 4, 2, "completed", None, None, nbs=16)],
              "completed", [failure(1, "val", 1, 4, 4), failure(2, "val", 1, 4, 2)], batch=8, nbs=16, val_batch=4)
    config = tmp_path / "small.yaml"
    config.write_text("batch: 8\neffective-batch: 16\ngpus: 0,1\n")
    env = script_env(tmp_path, "2x24GB", PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")

    result = run_script(FIX, tmp_path, env, "--yes", "--config", str(config))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "expandable_segments is already on in this shell" in result.stdout
    assert not (tmp_path / "rc").exists()
    assert yaml.safe_load(config.read_text()) == {"batch": 4, "effective-batch": 16, "gpus": "0,1", "val_batch": 2}
    assert "attempt 3 of the run completed with it" in result.stdout


def test_fix_asks_on_a_terminal_and_defaults_to_no(tmp_path, holders):
    stale = holders.sleep()
    oom_run(tmp_path / "runs" / "detect" / "train")
    config = tmp_path / "train.yaml"
    config.write_text(CONFIG)
    master, slave = pty.openpty()
    try:
        # the process: Enter (No); the rc file: y; the batch: yes; the val batch: n
        os.write(master, b"\ny\nyes\nn\n")
        env = script_env(tmp_path, fake_gpus([(stale.pid, 13000)]))
        result = run_script(FIX, tmp_path, env, "--config", "train.yaml", stdin=slave, timeout=30)
    finally:
        os.close(slave)
        os.close(master)

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"stop pid {stale.pid} (kill -TERM {stale.pid})? [y/N] " in result.stdout  # the questions, on stdout
    assert alive(stale)
    assert (tmp_path / "rc").read_text().count("export PYTORCH_CUDA_ALLOC_CONF='expandable_segments:True'") == 1
    data = yaml.safe_load(config.read_text())
    assert (data["batch"], data["effective_batch"], "val_batch" in data) == (16, 64, False)
    assert f"pid {stale.pid} (sleep 300, 13000 MiB on GPU 0) left running" in result.stdout
    assert "train.yaml: val_batch=8 not applied" in result.stdout


def test_fix_usage_errors(tmp_path):
    env = script_env(tmp_path, "1x24GB")
    for args in (["--config", "missing.yaml"], ["--run", str(tmp_path)], ["--bogus"]):
        result = run_script(FIX, tmp_path, env, *args)
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, (args, result.stderr)


@pytest.mark.skipif(getattr(os, "geteuid", lambda: -1)() != 0, reason="another user's process needs root to start")
def test_fix_with_yes_leaves_other_users_processes_alone(tmp_path, holders):
    theirs = subprocess.Popen(["sleep", "300"], user="nobody", start_new_session=True)
    holders.procs.append(theirs)

    result = run_script(FIX, tmp_path, script_env(tmp_path, fake_gpus([(theirs.pid, 13000)])), "--yes")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "nobody's process, not yours: --yes does not stop it" in result.stdout
    assert alive(theirs)
