"""Shared helpers: run the installed ``yolosafe`` CLI in a subprocess, as a user would, on CPU and offline.

GPUs come from the package's fake NVML backend (``YOLOSAFE_FAKE_GPUS``); OOMs from its fault-injection hook
(``YOLOSAFE_INJECT_OOM``), which raises the real ``torch.OutOfMemoryError`` inside the real Ultralytics trainer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

YOLOSAFE = shutil.which("yolosafe") or str(Path(sys.executable).with_name("yolosafe"))
# The smallest real training that still exercises train, val and checkpoints: seconds on 2 CPU cores.
TINY = ["--imgsz", "64", "--batch", "8", "--effective-batch", "16", "workers=0", "plots=False"]


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic dataset and one Ultralytics config dir for the whole session."""
    return tmp_path_factory.mktemp("cache")


def cli_env(shared_cache: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without yolosafe/allocator settings, plus the shared caches and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLOSAFE_", "PYTORCH_"))}
    env.update(YOLOSAFE_CACHE=str(shared_cache / "yolosafe"), YOLO_CONFIG_DIR=str(shared_cache / "ultralytics"),
               YOLO_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # the suite runs a training per core (pytest-xdist): one thread each
    return env | (extra or {})


@pytest.fixture
def run_cli(tmp_path: Path, shared_cache: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_cli(*args, env={...})`` runs ``yolosafe`` in ``tmp_path`` and returns the completed process."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
            keep_cr: bool = False) -> subprocess.CompletedProcess[str]:
        """``keep_cr``: the output as written, ``\r`` redraws kept (text mode turns each one into a line end)."""
        done = subprocess.run([YOLOSAFE, *args], cwd=tmp_path, env=cli_env(shared_cache, env), capture_output=True,
                              text=not keep_cr, timeout=timeout)
        if keep_cr:
            return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(errors="replace"),
                                               done.stderr.decode(errors="replace"))
        return done

    return run


@pytest.fixture
def start_cli(tmp_path: Path, shared_cache: Path) -> Callable[..., subprocess.Popen[str]]:
    """``start_cli(*args)`` starts ``yolosafe`` in ``tmp_path`` without waiting (stderr piped, stdout dropped)."""

    def start(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([YOLOSAFE, *args], cwd=tmp_path, env=cli_env(shared_cache),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    return start


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen[str], what: str, timeout: float = 120) -> None:
    """Poll ``condition`` while ``proc`` runs; fail the test if it exits or ``timeout`` passes first."""
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline and proc.poll() is None, f"{what} never happened"
        time.sleep(0.05)


def wait_gone(pids: set[int], timeout: float = 30) -> set[int]:
    """Wait (bounded) until none of ``pids`` runs; the ones still running at the deadline."""
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(pids)


def alive(pids: set[int]) -> set[int]:
    """The processes of ``pids`` that still run (a zombie has ended)."""
    import psutil

    found = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                found.add(pid)
        except psutil.Error:
            pass
    return found


def run_dir_of(tmp_path: Path, name: str = "train") -> Path:
    return tmp_path / "runs" / "detect" / name


def story(run_dir: Path) -> dict:
    return json.loads((run_dir / "yolosafe.json").read_text())


FAIL_IN_EPOCH_2 = {"YOLOSAFE_INJECT_OOM": "phase=train,epoch=1,error=runtime"}


def failed_in_epoch_2(home: Path, shared_cache: Path, *args: str) -> Path:
    """A 2-epoch run in ``home`` that failed (not an OOM) in epoch 2, so weights/last.pt holds epoch 1: its run
    directory, once its end is checked (one line for the failure, the traceback in train.log only)."""
    result = subprocess.run([YOLOSAFE, "train", "--epochs", "2", *TINY, *args], cwd=home, capture_output=True,
                            text=True, env=cli_env(shared_cache, FAIL_IN_EPOCH_2), timeout=300)
    assert result.returncode == 1, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if "training failed" in ln]
    assert len(lines) == 1 and "RuntimeError: yolosafe injected" in lines[0] and "at epoch 2" in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    run = run_dir_of(home)
    assert "Traceback" in (run / "train.log").read_text()
    return run
