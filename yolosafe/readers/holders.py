"""Who holds a GPU's memory, and whether yolosafe may ever stop it.

The judgement errs on the side of leaving a process alone: ``yolosafe fix --yes`` stops only what yolosafe can prove
is its own and stale (a worker, launcher or DDP rank of a yolosafe run whose supervisor is gone on every node,
proven by :mod:`yolosafe.readers.stale`, not by its run marker alone), and asks a person about anything else.
Some processes are never offered at all: pid 0 and 1 (in a container entered with ``docker exec`` or ``nsenter``
the shell's parent is pid 0 and pid 1 is the container's init, which stops the container if it takes SIGTERM),
this process and its ancestors, kernel threads, NVIDIA's daemons and display servers, and other users' processes
(the command a person with the rights would run is given instead).

The run marker is ``YOLOSAFE_RUN_DIR``: the supervisor sets it, in one place, in the environment of every process it
starts for a run (the worker, or the launcher and through it every rank), and nothing reads it but this judgement
(in ``/proc/PID/environ``); the processes of a run learn their run directory from their run spec.

Every process is identified by pid *and* start time (``psutil``): a pid reused after the judgement is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from yolosafe.gpus import GPU, foreign_pids
from yolosafe.readers import stale
from yolosafe.rundir import files as rundir

NEVER, PROVEN, ASK = "never", "proven stale", "ask"
PF_KTHREAD = 0x00200000  # /proc/PID/stat flags: a kernel thread
NVIDIA_DAEMONS = ("nvidia-persistenced", "nvidia-cuda-mps-server", "nvidia-cuda-mps-control", "nv-hostengine",
                  "nvidia-smi", "dcgm")
DISPLAY_SERVERS = ("Xorg", "X", "Xwayland", "gnome-shell", "kwin_x11", "kwin_wayland", "sway", "weston", "mutter")
# Processes that adopt orphans: a yolosafe worker whose parent is one of these has lost its supervisor.
REAPERS = ("init", "systemd", "tini", "dumb-init", "docker-init", "catatonit", "s6-svscan", "runit")
JUPYTER_WORDS = ("ipykernel", "jupyter", "colab_kernel")
RUN_MARKER = rundir.RUN_DIR_ENV  # the run directory, in the environment of every process of a run
COMM_LEN = 15  # the kernel truncates a process name to 15 characters


@dataclass(frozen=True)
class Holder:
    """A process holding memory on a GPU, judged. ``action``: never, proven stale (``--yes`` may stop it), ask."""

    pid: int
    gpu: int
    used_mib: float | None
    kind: str
    reason: str
    action: str
    user: str | None = None
    command: str | None = None
    started: float | None = None  # psutil create_time: the identity checked before any signal
    run_dir: str | None = None  # the yolosafe run it belongs to, for yolosafe's own processes
    advice: str | None = None  # what a person should do instead, when yolosafe will not

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ancestors(pid: int | None = None) -> set[int]:
    """This process and every ancestor, through a parent pid of 0 (the parent outside a container's namespace)."""
    found: set[int] = set()
    current: int | None = os.getpid() if pid is None else pid
    while current is not None and current not in found:
        found.add(current)
        if current <= 1:
            break
        try:
            current = psutil.Process(current).ppid()
        except psutil.Error:
            break
    return found


def is_kernel_thread(pid: int) -> bool:
    """The kernel's own flag (PF_KTHREAD in /proc/PID/stat), else the kthreadd family (pid 2 and its children)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return bool(int(stat.rsplit(")", 1)[1].split()[6]) & PF_KTHREAD)
    except (OSError, IndexError, ValueError):
        with contextlib.suppress(psutil.Error):
            return pid == 2 or psutil.Process(pid).ppid() == 2
    return False


def _names(proc: psutil.Process) -> set[str]:
    names = {proc.name()}
    with contextlib.suppress(psutil.Error, IndexError):
        names.add(os.path.basename(proc.cmdline()[0]))
    return names


def named(proc: psutil.Process, candidates: tuple[str, ...]) -> str | None:
    """The candidate this process is (by its name, truncated by the kernel, or its program's file name)."""
    for name in _names(proc):
        for candidate in candidates:
            if name == candidate or (len(name) == COMM_LEN and candidate.startswith(name)):
                return candidate
    return None


def _run_marker(proc: psutil.Process) -> str | None:
    """The run directory of the yolosafe run ``proc`` belongs to; None for any other process."""
    try:
        return proc.environ().get(RUN_MARKER) or None
    except psutil.Error:
        return None


def _writes_log(proc: psutil.Process, run_dir: str) -> bool:
    """Whether ``proc`` has a log of the run open (``train.log``, or node R's ``train-nodeR.log``): the supervisor
    does while an attempt runs."""
    return stale.writes_a_log(proc, Path(run_dir))


def supervisor_gone(proc: psutil.Process, run_dir: str) -> tuple[bool, str]:
    """Walk up through the processes of the same run (same run marker, and a worker, launcher or rank of it by its
    own ``argv``: :func:`yolosafe.readers.stale.of_run`) to the worker; its parent, the first ancestor that is none
    of these, is the supervisor (a marked process that is no worker, a supervisor whose lock was deleted, counts as
    one). Gone when the worker has no parent, or was adopted by pid 1 or a reaper that is not itself the supervisor
    (a supervisor running as a container's pid 1 has the run's train.log open)."""
    top = proc
    while True:
        try:
            parent = top.parent()
        except psutil.Error:
            parent = None
        if parent is None or parent.pid <= 1 or _run_marker(parent) != run_dir:
            break
        if stale.of_run(parent, Path(run_dir)) is None:
            break
        top = parent
    if parent is None:
        return True, f"its worker (pid {top.pid}) has no parent any more"
    adopted = parent.pid <= 1 or named(parent, REAPERS)
    if adopted and not _writes_log(parent, run_dir):
        return True, f"its worker (pid {top.pid}) was adopted by pid {parent.pid} ({parent.name()})"
    return False, f"supervised by pid {parent.pid} ({parent.name()})"


def _protected(pid: int, proc: psutil.Process, mine: set[int]) -> tuple[str, str] | None:
    """(kind, reason) for the processes that are never offered, whoever asks."""
    if pid in mine:
        return "this shell", "this process or one of its parents"
    if is_kernel_thread(pid):
        return "kernel thread", "a kernel thread"
    daemon = named(proc, NVIDIA_DAEMONS)
    if daemon:
        return "NVIDIA daemon", f"NVIDIA's {daemon}"
    display = named(proc, DISPLAY_SERVERS)
    if display:
        return "display server", f"the display server {display}"
    if proc.status() == psutil.STATUS_ZOMBIE:
        return "exited", "it exited (a zombie holds no memory)"
    return None


def _other_user(pid: int, user: str | None) -> tuple[str, str, str, str]:
    advice = f"ask {user or 'its owner'} to stop it; someone with the rights would run: sudo kill -TERM {pid}"
    return "another user's", f"not yours (owner {user or '?'})", NEVER, advice


def _classify(pid: int, proc: psutil.Process, mine: set[int]) -> tuple[str, str, str, str | None, str | None]:
    """(kind, reason, action, run_dir, advice) of a live process."""
    protected = _protected(pid, proc, mine)
    if protected:
        return protected[0], f"{protected[1]}: never stopped", NEVER, None, None
    if proc.uids().real != os.getuid():
        kind, reason, action, advice = _other_user(pid, _user(proc))
        return kind, reason, action, None, advice
    run = _run_marker(proc)
    if run:
        return _judge_marked(proc, run)
    command = " ".join(proc.cmdline()) or proc.name()
    if any(word in command for word in JUPYTER_WORDS):
        return "Jupyter kernel", "LIKELY STALE: a Jupyter/IPython kernel keeps its CUDA memory until it is shut " \
            "down", ASK, None, None
    if "python" in proc.name().lower():
        return "Python process", "a Python process, not yolosafe (possibly your own training: check)", ASK, None, None
    return "program", "another program, not yolosafe: stop it only if you know it", ASK, None, None


def _judge_marked(proc: psutil.Process, run: str) -> tuple[str, str, str, str | None, str | None]:
    """A process with yolosafe's run marker: never stopped while its run lives (on any node); proven stale only by
    :func:`yolosafe.readers.stale.prove`; else a person decides."""
    live = stale.live_supervisor(run)
    gone, how = supervisor_gone(proc, run)
    if live or not gone:
        return "yolosafe run", f"a running yolosafe run ({run}), {live or how}: never stopped", NEVER, run, \
            "wait for it, or train on other GPUs (--gpus)"
    proven, why = stale.prove(proc, run)
    if proven:
        return "stale yolosafe", f"{why} whose supervisor is gone ({how})", PROVEN, run, None
    return "marked process", f"carries yolosafe's run marker but {why}: not provably stale, check it", ASK, \
        run, None


def _user(proc: psutil.Process) -> str | None:
    try:
        return proc.username()
    except (psutil.Error, KeyError):
        with contextlib.suppress(psutil.Error):
            return str(proc.uids().real)
    return None


def judge(pid: int, gpu: int, used_mib: float | None, mine: set[int] | None = None) -> Holder:
    """The judgement of one GPU process (``mine``: the ancestors of the judge, computed once per call site)."""
    mine = ancestors() if mine is None else mine
    if pid <= 1:
        return Holder(pid, gpu, used_mib, "init", f"pid {pid} is the init of this pid namespace or the kernel: "
                      "never stopped", NEVER)
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            started, user = proc.create_time(), _user(proc)
            command = " ".join(proc.cmdline()) or proc.name()
            kind, reason, action, run, advice = _classify(pid, proc, mine)
    except psutil.NoSuchProcess:
        return Holder(pid, gpu, used_mib, "not visible", "no such process here (it exited, or lives in another pid "
                      "namespace: look on the host)", NEVER)
    except psutil.AccessDenied:
        return Holder(pid, gpu, used_mib, "not readable", "cannot read this process: not yours", NEVER,
                      advice=f"someone with the rights would run: sudo kill -TERM {pid}")
    return Holder(pid, gpu, used_mib, kind, reason, action, user, command, started, run, advice)


OTHER_NAMESPACE = ("NVML names it by a pid of another PID namespace (a container: none of NVML's pids is a process "
                   "here): never judged or stopped by that pid")


def judge_gpus(gpus: tuple[GPU, ...]) -> list[Holder]:
    """Every process on every GPU, judged; none by pid when NVML's pids are another PID namespace's (none of them is
    a process here: a local process with such a pid is somebody else)."""
    if foreign_pids(p.pid for g in gpus for p in g.processes):
        return [Holder(p.pid, g.index, p.used_mib, "another pid namespace", OTHER_NAMESPACE, NEVER,
                       advice="look on the host (nvidia-smi there names these pids)")
                for g in gpus for p in g.processes]
    mine = ancestors()
    return [judge(p.pid, g.index, p.used_mib, mine) for g in gpus for p in g.processes]


def stop(holder: Holder, timeout_s: float = 10.0) -> tuple[bool, str]:
    """SIGTERM to a holder, after checking it is still the process judged (same pid and start time)."""
    if holder.action == NEVER or holder.started is None:
        return False, f"pid {holder.pid} is not stopped by yolosafe ({holder.reason})"
    try:
        proc = psutil.Process(holder.pid)
        if proc.create_time() != holder.started:
            return False, f"pid {holder.pid} is now another process (started later): not signalled"
        proc.terminate()  # psutil checks the start time again right before the signal
    except psutil.NoSuchProcess:
        return True, f"pid {holder.pid} had already exited"
    except psutil.AccessDenied:
        return False, f"pid {holder.pid}: not allowed to signal it"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:  # exited; its parent has not collected it yet
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    else:
        return False, f"pid {holder.pid} still runs {timeout_s:g} s after SIGTERM: kill -KILL {holder.pid} if you must"
    return True, f"pid {holder.pid} exited"
