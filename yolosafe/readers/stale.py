"""The proof that a process carrying yolosafe's run marker is a stale process of that run, as ``fix --yes`` needs
it before it may stop anything without asking.

The marker (``YOLOSAFE_RUN_DIR`` in the environment) is only a lead: any child of a marked process inherits it, a
shell that exported it marks everything it starts, and it names a directory that may be gone. A process is proven
stale only when all of these hold:

- the directory it names exists and is a yolosafe run (its story is there);
- nobody holds the run's lock on any node (``.lock``, ``.lock-nodeR``): no live supervisor here;
- no process that could be its supervisor has a node's log open (``train.log``, ``train-nodeR.log``): a supervisor
  that is a container's pid 1 on a node is alive while it writes its log;
- it is a worker, launcher or rank of that run by its command line (``-m yolosafe.training.worker`` or
  ``-m yolosafe.training.launcher`` with one of the run's run specs, ``RUN_DIR/spec-N[-nodeR].json``) and by its
  start time (not before that run spec was written: a pid or a command line of an older run does not count).
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil

from yolosafe.rundir import files as rundir
from yolosafe.rundir.layout import RunDir

MODULES = ("yolosafe.training.worker", "yolosafe.training.launcher")
SPEC_SLACK_S = 2.0  # the run spec is written right before its process starts; clocks of a shared disk differ a bit


def lock_holder(run_dir: Path) -> str | None:
    """The pid holding the lock of any node of the run, or None when every lock is free."""
    for node in RunDir(run_dir).locked_nodes():
        pid = node.holder()
        if pid is not None:
            return pid
    return None


def writes_a_log(proc: psutil.Process, run_dir: Path) -> bool:
    """Whether ``proc`` has any node's log of the run open (as a live supervisor does)."""
    logs = {os.path.realpath(p) for p in RunDir(run_dir).copies(rundir.LOG)}
    try:
        return any(os.path.realpath(f.path) in logs for f in proc.open_files())
    except psutil.Error:
        return False


def _spec_of(cmdline: list[str], run_dir: Path) -> Path | None:
    """The run spec of ``run_dir`` a worker, launcher or rank command line names, else None."""
    if not any(module in cmdline for module in MODULES):
        return None
    run = RunDir(run_dir)
    for arg in cmdline:
        path = Path(arg)
        if run.is_spec(path):
            return path
    return None


def prove(proc: psutil.Process, run: str) -> tuple[bool, str]:
    """(proven, why): whether ``proc`` is provably a stale process of the run ``run``; ``why`` says what failed
    otherwise (the supervisor's own liveness is judged by the caller, which walks the process tree)."""
    run_dir = Path(run)
    if not run_dir.is_dir():
        return False, f"its run directory {run} does not exist"
    if not RunDir(run_dir).is_run():
        return False, f"{run} is not a yolosafe run (no {rundir.STORY})"
    try:
        cmdline, started = proc.cmdline(), proc.create_time()
    except psutil.Error:
        return False, "its command line cannot be read"
    spec = _spec_of(cmdline, run_dir)
    if spec is None:
        return False, f"it carries the marker of {run} but is not one of its workers, launchers or ranks"
    try:
        written = spec.stat().st_mtime
    except OSError:
        return False, f"its run spec {spec.name} is not in {run}"
    if started < written - SPEC_SLACK_S:
        return False, f"it started before its run spec {spec.name} was written: not that run's process"
    return True, f"a {'launcher' if MODULES[1] in cmdline else 'worker or rank'} of {run} ({spec.name})"


def live_supervisor(run: str) -> str | None:
    """Why the run has a live supervisor on this machine (its lock held, pid 1 writing one of its logs), or None."""
    run_dir = Path(run)
    pid = lock_holder(run_dir) if run_dir.is_dir() else None
    if pid is not None:
        return f"its lock is held by pid {pid}"
    try:
        init = psutil.Process(1)
    except psutil.Error:
        return None
    return "pid 1 writes its log" if writes_a_log(init, run_dir) else None
