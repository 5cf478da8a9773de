"""``fix --yes`` stops only what it proves is a stale process of a yolosafe run. Each way of making it stop the
wrong process, on real stand-in processes: the marker naming a directory that is gone or is no run, a run whose
lock another node's supervisor holds, a supervisor that is a container's pid 1 writing node 1's log, a child of a
marked process that is no worker, a process older than the run spec it names."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from tests.standins import SLEEPER, Processes, alive, fake_gpus, stale_run
from tests.test_holders import SUPERVISOR, judged_inside
from yolosafe.readers import holders
from yolosafe.readers.holders import ASK, NEVER, PROVEN
from yolosafe.rundir import files as rundir


@pytest.fixture
def procs(tmp_path):
    p = Processes(tmp_path)
    yield p
    p.stop()


def adopted(pid: int) -> bool:
    return psutil.Process(pid).ppid() != os.getpid()


def test_a_proper_stale_rank_is_proven(procs, tmp_path):
    orphan = procs.orphaned_rank(tmp_path / "run")
    if not adopted(orphan):
        pytest.skip("the orphan was not re-parented")
    judged = holders.judge(orphan, 0, 1.0)
    assert judged.action == PROVEN, judged


def test_the_marker_alone_proves_nothing(procs, tmp_path):
    gone = procs.orphaned_rank(tmp_path / "gone")
    shutil.rmtree(tmp_path / "gone")
    norun = procs.orphaned_rank(tmp_path / "norun")
    (tmp_path / "norun" / rundir.STORY).unlink()
    for pid, words in ((gone, "does not exist"), (norun, "is not a yolosafe run")):
        judged = holders.judge(pid, 0, 1.0)
        assert judged.action == ASK and words in judged.reason, judged


def test_a_run_whose_lock_another_node_holds_is_never_stopped(procs, tmp_path):
    run = tmp_path / "run"
    orphan = procs.orphaned_rank(run)
    stale_run(run, node=1)
    holder = procs.start([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                          "from yolosafe.rundir import files; files.lock(Path(sys.argv[1]), 1); time.sleep(600)",
                          str(run)])
    for _ in range(200):
        if rundir.holder(run, 1):
            break
        time.sleep(0.05)
    judged = holders.judge(orphan, 0, 1.0)
    assert judged.action == NEVER and f"lock is held by pid {holder.pid}" in judged.reason, judged


def test_a_child_of_a_marked_process_that_is_no_worker_is_never_stopped(procs, tmp_path):
    run = tmp_path / "run"
    child = procs.orphaned_rank(run, command=f'{sys.executable} -c "{SLEEPER}"')
    judged = holders.judge(child, 0, 1.0)
    assert judged.action == ASK and "not one of its workers" in judged.reason, judged
    env = {**os.environ, "YOLOSAFE_FAKE_GPUS": fake_gpus([(child, 1000.0)]), "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "yolosafe", "fix", "--yes"], cwd=tmp_path, env=env,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert alive(child) and "not provably safe" in out.stdout, out.stdout


def test_a_process_older_than_its_run_spec_is_not_proven(procs, tmp_path):
    run = tmp_path / "run"
    orphan = procs.orphaned_rank(run)
    later = time.time() + 60
    os.utime(rundir.spec_path(run, 1), (later, later))  # the spec of a later run of this name
    judged = holders.judge(orphan, 0, 1.0)
    assert judged.action == ASK and "started before its run spec" in judged.reason, judged


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"),
                    reason="needs root, unshare and nsenter")
def test_node_1s_supervisor_as_a_containers_pid_1_keeps_its_rank(tmp_path):
    """Node 1 of a two-node training in a container: the supervisor is pid 1 and writes train-node1.log."""
    (tmp_path / "run").mkdir()
    init = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", SUPERVISOR,
                             str(tmp_path / "run"), "writes", "1"], stdin=subprocess.DEVNULL)
    try:
        out = judged_inside(init.pid)
        assert out.startswith(f"{NEVER} |"), out
    finally:
        init.kill()
        init.wait()
