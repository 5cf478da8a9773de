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

from tests.standins import SLEEPER, Processes, alive, asleep, fake_gpus, stale_run
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
        init.kill()
        init.wait()


# --- a process proven by its own argv -------------------------------------------------------------------------------

FORGED = [
    ('{py} -c "{sleeper}" -m yolosafe.training.worker {spec}', "not one of its workers"),  # -c runs, -m is an arg
    ("{py} {script} -m yolosafe.training.worker {spec}", "not one of its workers"),  # a script runs
    ("{py} -m json.tool -m yolosafe.training.worker {spec}", "not one of its workers"),  # another module runs
    ("{py} -m yolosafe.training.worker {spec} extra", "not one of its workers"),  # not the worker's argv
    ("{py} -m yolosafe.training.launcher {spec}", "not one of its workers"),  # a launcher without its ranks' module
]


@pytest.mark.parametrize(("command", "words"), FORGED)
def test_a_module_name_anywhere_but_where_python_reads_it_proves_nothing(procs, tmp_path, command, words):
    run = tmp_path / "run"
    script = tmp_path / "script.py"
    script.write_text("")
    spec = rundir.spec_path(run, 1)
    pid = procs.orphaned_rank(run, command=command.format(py=sys.executable, sleeper=SLEEPER, script=script,
                                                          spec=spec))
    judged = holders.judge(pid, 0, 1.0)
    assert judged.action == ASK and words in judged.reason, judged


@pytest.mark.parametrize(("story", "spec", "words"), [
    ("{}", "{}", "does not parse"),  # a forged directory: a story and a spec holding {}
    ('{"attempts": []}', None, "which the run's story does not record"),  # the story records no such attempt
    (None, "elsewhere", "names another run"),  # the spec names another run's directory
])
def test_a_forged_run_directory_proves_nothing(procs, tmp_path, story, spec, words):
    import json

    run = tmp_path / "run"
    pid = procs.orphaned_rank(run)
    if story is not None:
        (run / rundir.STORY).write_text(story)
    path = rundir.spec_path(run, 1)
    if spec == "elsewhere":
        (path.write_text(json.dumps({**json.loads(path.read_text()), "run_dir": str(tmp_path / "other")})))
    elif spec is not None:
        path.write_text(spec)
    judged = holders.judge(pid, 0, 1.0)
    assert judged.action == ASK and words in judged.reason, judged


@pytest.mark.parametrize("options", ["-u", "-um", "-W ignore -X dev -B", "-mWORKER"])
def test_a_worker_started_with_python_options_is_still_proven(procs, tmp_path, options):
    run = tmp_path / "run"
    spec = rundir.spec_path(run, 1)
    module = "yolosafe.training.worker"
    argv = f"{options.replace('WORKER', module)} {spec}" if "WORKER" in options else \
        f"{options}{'' if options.endswith('m') else ' -m'} {module} {spec}"
    pid = procs.orphaned_rank(run, command=f"{sys.executable} {argv}")
    if not adopted(pid):
        pytest.skip("the orphan was not re-parented")
    assert holders.judge(pid, 0, 1.0).action == PROVEN


SPAWNER = ("import os, subprocess, sys, time; p = subprocess.Popen([sys.executable, '-m', 'yolosafe.training.worker', "
           "sys.argv[1]], env={**os.environ, 'PYTHONPATH': sys.argv[2]}); print(p.pid, flush=True); time.sleep(600)")


def test_a_live_marked_supervisor_whose_lock_was_deleted_keeps_its_worker(procs, tmp_path):
    """The supervisor (marked, adopted by init, its lock file deleted) is alive: the walk up from its worker stops at
    it, the first ancestor that is no worker, launcher or rank of the run, and the worker is never stopped."""
    run = tmp_path / "run"
    spec = stale_run(run)
    stub = asleep(tmp_path)["PYTHONPATH"]
    pidfile = tmp_path / "worker.pid"
    # Every stream away from this test's pipes: a background child holding them would keep the shell's run waiting.
    out = subprocess.run(["sh", "-c", f"{sys.executable} -c \"{SPAWNER}\" {spec} {stub} >{pidfile} 2>/dev/null "
                          "</dev/null & echo $!"], env={**os.environ, rundir.RUN_DIR_ENV: str(run)},
                         capture_output=True, text=True, check=True, timeout=60)
    supervisor = int(out.stdout)
    procs.orphans.append(supervisor)
    deadline = time.monotonic() + 60
    while not pidfile.read_text().endswith("\n") and time.monotonic() < deadline:
        time.sleep(0.05)
    worker = int(pidfile.read_text())
    procs.orphans.append(worker)
    (run / ".lock").unlink(missing_ok=True)
    judged = holders.judge(worker, 0, 1.0)
    assert judged.action == NEVER and f"supervised by pid {supervisor}" in judged.reason, judged
    assert alive(worker)


def test_the_rc_file_is_edited_through_its_symlink(tmp_path):
    from tests.test_fix import fix_env, run_fix

    (tmp_path / "dotfiles").mkdir()
    (tmp_path / "dotfiles" / "bashrc").write_text("# mine\n")
    (tmp_path / ".bashrc").symlink_to(tmp_path / "dotfiles" / "bashrc")
    out = run_fix(tmp_path, fix_env(tmp_path, fake_gpus([])), "--yes")
    assert (tmp_path / ".bashrc").is_symlink(), out.stdout
    assert "expandable_segments" in (tmp_path / "dotfiles" / "bashrc").read_text(), out.stdout
