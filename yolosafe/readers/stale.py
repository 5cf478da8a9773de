"""The proof that a process carrying yolosafe's run marker is a stale process of that run, as ``fix --yes`` needs
it before it may stop anything without asking.

The marker (``YOLOSAFE_RUN_DIR`` in the environment) is only a lead: any child of a marked process inherits it, a
shell that exported it marks everything it starts, and it names a directory that may be gone. A process is proven
stale only when all of these hold:

- the directory it names exists and is a yolosafe run (its story is there);
- nobody holds the run's lock on any node (``.lock``, ``.lock-nodeR``): no live supervisor here;
- no process that could be its supervisor has a node's log open (``train.log``, ``train-nodeR.log``): a supervisor
  that is a container's pid 1 on a node is alive while it writes its log;
- it is a worker, launcher or rank of that run by its own ``argv``, read as Python reads it (:func:`python_module`:
  the interpreter's ``-m yolosafe.training.worker SPEC``, or ``-m yolosafe.training.launcher ... -m
  yolosafe.training.worker SPEC``; a ``-c`` or a script before it runs something else), its run spec one of the run's
  (``RUN_DIR/spec-N[-nodeR].json``) that parses, names that run and an attempt its story records, and by its start
  time (not before that run spec was written: a pid or a command line of an older run does not count).
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil

from yolosafe.rundir import files as rundir
from yolosafe.rundir import records
from yolosafe.rundir.layout import RunDir
from yolosafe.rundir.runspec import RunSpec

WORKER, LAUNCHER = "yolosafe.training.worker", "yolosafe.training.launcher"
MODULES = (WORKER, LAUNCHER)
TAKES_VALUE = "WX"  # Python's one-letter options that take the next word (or the rest of theirs) as a value
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


def python_module(argv: list[str]) -> tuple[str, list[str]] | None:
    """``(module, its arguments)`` when ``argv`` runs ``python -m module``, read as the interpreter reads its options
    (``-u -m M``, ``-um M``, ``-mM``, ``-W arg``); None for ``-c``, a script, ``-`` (stdin) or anything else: a
    module name later in the command line is only an argument of what runs."""
    i = 1
    while i < len(argv):
        word = argv[i]
        if word == "--check-hash-based-pycs":
            i += 2
            continue
        if not word.startswith("-") or word in ("-", "--"):
            return None  # a script, stdin, or the end of the options without -m
        if word.startswith("--"):
            i += 1
            continue
        for j, flag in enumerate(word[1:], start=1):
            if flag == "c":
                return None
            if flag == "m":
                rest = word[j + 1:]
                if rest:
                    return rest, argv[i + 1:]
                return (argv[i + 1], argv[i + 2:]) if i + 1 < len(argv) else None
            if flag in TAKES_VALUE:
                i += 0 if word[j + 1:] else 1  # its value is the rest of the word, or the next word
                break
        i += 1
    return None


def _spec_of(cmdline: list[str], run_dir: Path, cwd: str | None = None) -> Path | None:
    """The run spec of ``run_dir`` a worker, launcher or rank command line runs with, else None: the worker's only
    argument, or the launcher's last, after ``-m yolosafe.training.worker`` (what torch.distributed.run starts)."""
    found = python_module(cmdline)
    if found is None:
        return None
    module, args = found
    if module == WORKER and len(args) == 1:
        named = args[0]
    elif module == LAUNCHER and len(args) >= 3 and args[-3:-1] == ["-m", WORKER]:
        named = args[-1]
    else:
        return None
    path = Path(named) if os.path.isabs(named) or cwd is None else Path(cwd) / named
    return path if RunDir(run_dir).is_spec(path) else None


def of_run(proc: psutil.Process, run_dir: Path) -> Path | None:
    """The run spec ``proc`` runs with, when it is a worker, launcher or rank of ``run_dir`` by its ``argv``."""
    try:
        cmdline = proc.cmdline()
        cwd = proc.cwd()
    except psutil.Error:
        return None
    return _spec_of(cmdline, run_dir, cwd)


def _names_an_attempt(spec: Path, run_dir: Path) -> str | None:
    """Why ``spec`` is not a run spec of an attempt of ``run_dir``'s story, or None when it is."""
    try:
        story = records.load_story(RunDir(run_dir))
        loaded = RunSpec.load(spec)
    except (OSError, ValueError, TypeError, KeyError, records.RecordError) as exc:
        return f"its story or run spec {spec.name} does not parse ({type(exc).__name__})"
    if os.path.realpath(loaded.run_dir) != os.path.realpath(run_dir):
        return f"its run spec {spec.name} names another run ({loaded.run_dir})"
    if loaded.attempt not in {a.attempt for a in story.attempts}:
        return f"its run spec {spec.name} names attempt {loaded.attempt}, which the run's story does not record"
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
        cmdline, started, cwd = proc.cmdline(), proc.create_time(), proc.cwd()
    except psutil.Error:
        return False, "its command line cannot be read"
    spec = _spec_of(cmdline, run_dir, cwd)
    if spec is None:
        return False, f"it carries the marker of {run} but is not one of its workers, launchers or ranks"
    wrong = _names_an_attempt(spec, run_dir)
    if wrong:
        return False, wrong
    try:
        written = spec.stat().st_mtime
    except OSError:
        return False, f"its run spec {spec.name} is not in {run}"
    if started < written - SPEC_SLACK_S:
        return False, f"it started before its run spec {spec.name} was written: not that run's process"
    launcher = (python_module(cmdline) or ("",))[0] == LAUNCHER
    return True, f"a {'launcher' if launcher else 'worker or rank'} of {run} ({spec.name})"


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
