"""The judgement of GPU memory holders, on real stand-in processes: this process, its parent shell, pid 1 (also as
seen from inside a child pid namespace entered like ``docker exec``), another user's process, NVIDIA daemons, kernel
threads, yolosafe's own live and orphaned processes, and pids reused after the judgement."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from tests.standins import Processes, alive, fake_gpus
from yolosafe.readers import holders
from yolosafe.readers.holders import ASK, NEVER, PROVEN


@pytest.fixture
def procs(tmp_path):
    p = Processes(tmp_path)
    yield p
    p.stop()


def test_this_process_its_parents_and_init_are_never_offered():
    for pid in (os.getpid(), os.getppid(), 1, 0):
        judged = holders.judge(pid, 0, 100.0)
        assert judged.action == NEVER, judged
    assert holders.judge(os.getppid(), 0, 1.0).kind == "this shell"
    assert holders.judge(1, 0, 1.0).kind == "init"


def test_ancestors_walk_to_the_top():
    chain = holders.ancestors()
    assert {os.getpid(), os.getppid()} <= chain
    assert 1 in chain or any(psutil.Process(p).ppid() == 0 for p in chain if psutil.pid_exists(p))


def test_own_programs_are_asked_about_never_proven(procs):
    sleeper, kernel = procs.sleep(), procs.jupyter()
    assert holders.judge(sleeper.pid, 0, 10.0).action == ASK
    judged = holders.judge(kernel.pid, 0, 10.0)
    assert (judged.action, judged.kind) == (ASK, "Jupyter kernel")
    assert judged.started == psutil.Process(kernel.pid).create_time()


@pytest.mark.parametrize("name", ["nvidia-persistenced", "nvidia-cuda-mps-server", "nvidia-cuda-mps-control", "Xorg"])
def test_nvidia_daemons_and_display_servers_are_never_offered(procs, name):
    daemon = procs.named(name)
    judged = holders.judge(daemon.pid, 0, 500.0)
    assert judged.action == NEVER and judged.kind in ("NVIDIA daemon", "display server"), judged


def test_kernel_threads_are_never_offered():
    threads = [p.pid for p in psutil.process_iter() if p.pid > 1 and holders.is_kernel_thread(p.pid)]
    if not threads:
        pytest.skip("no kernel thread is visible in this pid namespace")
    assert holders.judge(threads[0], 0, 1.0).action == NEVER
    assert holders.judge(threads[0], 0, 1.0).kind == "kernel thread"


@pytest.mark.skipif(os.geteuid() != 0, reason="starting another user's process needs root")
def test_another_users_process_is_reported_with_the_command_for_someone_with_rights(procs):
    other = procs.start(["sleep", "600"], preexec_fn=lambda: os.setuid(65534))
    time.sleep(0.1)
    judged = holders.judge(other.pid, 1, 2000.0)
    assert (judged.action, judged.kind) == (NEVER, "another user's")
    assert f"sudo kill -TERM {other.pid}" in judged.advice
    assert holders.stop(judged)[0] is False and alive(other.pid)


def test_a_live_yolosafe_run_is_never_stopped_an_orphaned_rank_is_proven_stale(procs, tmp_path):
    worker = procs.yolosafe_worker(tmp_path / "run")
    time.sleep(0.2)
    live = holders.judge(worker.pid, 0, 9000.0)
    assert (live.action, live.kind, live.run_dir) == (NEVER, "yolosafe run", str(tmp_path / "run"))
    orphan = procs.orphaned_rank(tmp_path / "old")
    if psutil.Process(orphan).ppid() != 1:
        pytest.skip("a subreaper adopted the orphan; its name is not one yolosafe knows")
    stale = holders.judge(orphan, 0, 9000.0)
    assert (stale.action, stale.kind) == (PROVEN, "stale yolosafe"), stale
    assert holders.stop(stale, 5.0) == (True, f"pid {orphan} exited")
    assert not alive(orphan)


def test_a_reused_pid_is_not_signalled(procs):
    sleeper = procs.sleep()
    judged = holders.judge(sleeper.pid, 0, 1.0)
    older = holders.Holder(**{**judged.as_dict(), "started": judged.started - 100})
    ok, message = holders.stop(older)
    assert not ok and "another process" in message and alive(sleeper.pid)


def test_kernel_thread_flag_is_read_from_proc_stat():
    assert holders.is_kernel_thread(os.getpid()) is False


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"),
                    reason="needs root, unshare and nsenter")
def test_fix_yes_inside_a_container_entered_like_docker_exec_never_signals_pid_1(tmp_path):
    """pid 1 of a new pid namespace is named like a Jupyter kernel; the fix runs in that namespace through nsenter,
    so its shell's parent is pid 0 (outside), exactly as after ``docker exec``."""
    init = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
                             "import time; time.sleep(600)", "-m", "ipykernel_launcher"], stdin=subprocess.DEVNULL)
    try:
        inner = _namespace_init(init.pid)
        env = {**os.environ, "YOLOSAFE_FAKE_GPUS": fake_gpus([(1, 13000.0)]), "HOME": str(tmp_path)}
        cmd = ["nsenter", "-t", str(inner), "--pid", "--mount", sys.executable, "-m", "yolosafe", "fix", "--yes"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert "pid 1 is the init of this pid namespace" in out.stdout, out.stdout + out.stderr
        assert "stop pid 1" not in out.stdout
        assert alive(inner)
        probe = ["nsenter", "-t", str(inner), "--pid", "--mount", sys.executable, "-c",
                 "import os; from yolosafe.readers import holders; print(os.getppid(), sorted(holders.ancestors()))"]
        ppid, chain = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.split(" ", 1)
        assert ppid == "0" and "1," not in chain and "[1]" not in chain
    finally:
        init.kill()
        init.wait()


def _namespace_init(unshare_pid: int) -> int:
    """The host pid of the namespace's pid 1 (the child unshare forked)."""
    for _ in range(100):
        children = psutil.Process(unshare_pid).children()
        if children:
            return children[0].pid
        time.sleep(0.05)
    raise AssertionError("unshare started no child")


def judged_inside(unshare_pid: int) -> str:
    """``holders.judge`` of pid 2 (the worker) as seen from inside the namespace whose pid 1 unshare forked, once
    pid 1 has started it: "ACTION | reason"."""
    inner = _namespace_init(unshare_pid)
    for _ in range(100):
        if psutil.Process(inner).children():
            break
        time.sleep(0.05)
    probe = ["nsenter", "-t", str(inner), "--pid", "--mount", sys.executable, "-c",
             "from yolosafe.readers import holders; h = holders.judge(2, 0, 1.0); print(h.action, '|', h.reason)"]
    return subprocess.run(probe, capture_output=True, text=True, check=True, timeout=60).stdout


def test_judge_gpus_reads_the_fake_inventory(procs, monkeypatch):
    from yolosafe import gpus

    sleeper = procs.sleep()
    monkeypatch.setenv("YOLOSAFE_FAKE_GPUS", fake_gpus([], [(sleeper.pid, 2000.0), (os.getpid(), 100.0)]))
    judged = holders.judge_gpus(gpus.read_inventory().gpus)
    assert [(h.gpu, h.pid, h.action) for h in judged] == [(1, sleeper.pid, ASK), (1, os.getpid(), NEVER)]



SUPERVISOR = """
import os, subprocess, sys, time
from pathlib import Path
from tests.standins import asleep, stale_run
run, node = sys.argv[1], int(sys.argv[3]) if len(sys.argv) > 3 else 0
name = "train.log" if node == 0 else f"train-node{node}.log"
log = open(os.path.join(run, name), "ab") if sys.argv[2] == "writes" else None
spec = stale_run(Path(run), node)
env = {**asleep(Path(run)), "YOLOSAFE_RUN_DIR": run}
worker = subprocess.Popen([sys.executable, "-m", "yolosafe.training.worker", str(spec)], env=env)
time.sleep(600)
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"),
                    reason="needs root, unshare and nsenter")
@pytest.mark.parametrize("log, action", [("writes", NEVER), ("gone", PROVEN)])
def test_a_supervisor_that_is_a_containers_pid_1_is_alive_while_it_writes_the_log(tmp_path, log, action):
    """``docker run IMAGE yolosafe train``: the supervisor is pid 1 and the worker's parent. It is alive; a pid 1
    that does not write the run's log only adopted the worker."""
    (tmp_path / "run").mkdir()
    init = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", SUPERVISOR,
                             str(tmp_path / "run"), log], stdin=subprocess.DEVNULL)
    try:
        out = judged_inside(init.pid)
        assert out.startswith(f"{action} |"), out
    finally:
        init.kill()
        init.wait()
