"""``yolosafe.train`` inside a real Jupyter kernel (ipykernel, driven by jupyter_client; local sockets only): the
output streams into the cell, interrupting the kernel stops every rank and raises ``TrainingInterrupted``, and
``yolosafe.train(resume=...)`` in the same kernel returns the completed run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import cli_env, run_dir_of, story
from tests.test_ranks import started

pytest.importorskip("ipykernel")
manager = pytest.importorskip("jupyter_client.manager")
pytestmark = pytest.mark.slow  # real Ultralytics trainings on CPU, two fake-GPU ranks

TRAIN_CELL = """
import os
import yolosafe

def mark_epoch(trainer):  # a callback defined in the notebook: every rank, every attempt (a resume keeps it)
    with open(f"cb-rank{os.environ.get('RANK', '-1')}.txt", "a") as f:
        f.write(f"{trainer.epoch}\\n")

yolosafe.train(data="shapes", device=[0, 1], epochs=2, imgsz=64, batch=8, effective_batch=16, workers=0,
               plots=False, callbacks={"on_train_epoch_start": mark_epoch})
"""


def execute(kc: Any, code: str, timeout: float) -> tuple[dict[str, Any], str]:
    """Run ``code`` in the kernel: its reply's content and everything it streamed (stdout and stderr)."""
    msg_id = kc.execute(code)
    reply = kc.get_shell_msg(timeout=timeout)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=timeout)
    streamed = []
    while True:
        msg = kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            streamed.append(msg["content"]["text"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return reply["content"], "".join(streamed)


def descendants(pid: int, at_least: int) -> set[int]:
    deadline = time.time() + 30
    found: set[int] = set()
    while time.time() < deadline:
        found = {c.pid for c in psutil.Process(pid).children(recursive=True)}
        if len(found) >= at_least:
            return found
        time.sleep(0.1)
    raise AssertionError(f"expected a launcher and two ranks under the kernel, found {found}")


def test_train_in_a_kernel_streams_stops_on_interrupt_and_resumes(tmp_path: Path, shared_cache: Path) -> None:
    env = cli_env(shared_cache, {"YOLOSAFE_FAKE_GPUS": "2x24GB"})
    km, kc = manager.start_new_kernel(kernel_name="python3", cwd=str(tmp_path), env=env)
    try:
        run = run_dir_of(tmp_path)
        msg_id = kc.execute(TRAIN_CELL)
        deadline = time.time() + 240
        while not (len(started(run, 1)) == 2 and (run / "weights" / "last.pt").is_file()):
            assert time.time() < deadline, "two ranks never trained an epoch in the kernel"
            time.sleep(0.1)
        kernel_pid = km.provisioner.process.pid
        pids = descendants(kernel_pid, 3)
        km.interrupt_kernel()
        interrupted = time.time()
        reply = kc.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != msg_id:  # the kernel_info replies of its start
            reply = kc.get_shell_msg(timeout=30)
        assert (reply["content"]["status"], reply["content"]["ename"]) == ("error", "TrainingInterrupted")
        while {p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}:
            assert time.time() - interrupted < 15, "ranks outlived the kernel's interrupt"
            time.sleep(0.1)
        assert story(run)["outcome"] == "interrupted"
        marks = {r: (tmp_path / f"cb-rank{r}.txt").read_text().split() for r in (0, 1)}
        assert all(marks.values()), marks  # the notebook's callback ran in both ranks

        content, streamed = execute(kc, f"run = yolosafe.train(resume={str(run)!r})\n"
                                        "print('OUTCOME', run.outcome, run.best is not None, len(run.attempts))",
                                    timeout=300)
        assert content["status"] == "ok", content
        assert "OUTCOME completed True 2" in streamed
        assert "Epoch" in streamed and "\r" in streamed  # rank 0's progress, redrawn in place
        assert "yolosafe: resuming" in streamed
        assert "[rank" not in streamed and "Traceback" not in streamed
        for r in (0, 1):  # the resumed attempt's ranks ran it too
            assert len((tmp_path / f"cb-rank{r}.txt").read_text().split()) > len(marks[r])
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
