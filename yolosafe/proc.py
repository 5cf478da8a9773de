"""Process control: the supervised child in its own session, its whole process tree, signals, and parent death.

The supervisor starts one child per attempt (the worker, or the rank launcher); the launcher starts the DDP ranks.
torch.distributed.run starts every rank in a session of its own, so a signal to a process group never reaches them
and a rank whose launcher died is re-parented and no longer findable: the supervisor keeps the tree's processes as
``psutil.Process`` objects, refreshed in the background, and signals each one it saw.

Every process yolosafe starts (worker, launcher, rank) also watches its own parent (:func:`exit_with_parent`): when
the supervisor is SIGKILLed, nobody is left to stop the tree, so each level ends itself when its parent is gone.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from yolosafe import bench
from yolosafe.exits import Exit

PARENT_ENV = "YOLOSAFE_PARENT_PID"  # the pid a started process must have as its parent (set by whoever starts it)
STRAY_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")
STOP_GRACE_S = 8.0  # after a Ctrl-C, the tree gets this long to end on its own before SIGKILL
# A preemption (a cluster's SIGTERM, SLURM's --signal=USR1): the ranks first get the chance to save where they are
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PARENT_POLL_S = 0.25


class Stopped(KeyboardInterrupt):
    """A stop by SIGTERM or SIGHUP (a closed terminal), raised where Python raises ``KeyboardInterrupt`` for
    Ctrl-C: whatever catches a Ctrl-C (the check's child ended, one line, exit 130) catches these too."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_signals() -> tuple[int, ...]:
    """The signals that stop yolosafe: Ctrl-C, SIGTERM and a closed terminal's SIGHUP, unless the user asked for the
    hang-up to be ignored (``nohup`` sets SIGHUP to "ignore": the run goes on)."""
    hangup = () if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else (signal.SIGHUP,)
    return (signal.SIGINT, signal.SIGTERM, *hangup, *PREEMPT_SIGNALS[1:])


def stop_name(exc: BaseException) -> str:
    """The signal a stop came by: SIGTERM, SIGHUP, or SIGINT for a plain ``KeyboardInterrupt``."""
    return signal.Signals(exc.signum).name if isinstance(exc, Stopped) else "SIGINT"


def handle_stops() -> None:
    """The first thing the ``yolosafe`` command does: a stop at any moment (option resolution, the input check's
    child) is a :class:`Stopped` (or a ``KeyboardInterrupt``) in the main thread, whatever the parent ignored
    (``yolosafe train ... &`` in a script inherits SIGINT ignored), instead of a silent death by the default action.
    From the run's first attempt on, the supervisor's own handlers take over (:func:`run_child`, the attempt loop)."""

    def stop(signum: int, _frame: Any) -> None:
        raise Stopped(signum)

    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in stop_signals()[1:]:
        signal.signal(signum, stop)


class ProcessTree:
    """The descendants of one process, refreshed in the background so none is lost when its parent dies.

    Processes are kept as ``psutil.Process`` objects, which know their start time: a pid reused by an unrelated
    process after ours exited is never signalled.
    """

    def __init__(self, root: int, interval: float = 0.5) -> None:
        import psutil

        self.root = root
        self._known: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            self._known[root] = psutil.Process(root)
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="yolosafe-tree", daemon=True)

    def start(self) -> ProcessTree:
        if not bench.bench_off("tree"):
            self._thread.start()
        return self

    def refresh(self) -> set[int]:
        """Look for new descendants now (of every known process: the root may be gone, its ranks not), forget the
        ones that ended (a long run starts thousands of dataloader workers); returns the pids still alive."""
        for pid, proc in list(self._known.items()):
            if not _alive(proc):
                self._known.pop(pid, None)  # the background thread may prune it too
        children = _children_by_parent()  # one pass over the system's processes, however many are known
        todo = list(self._known)
        while todo:
            for child in children.get(todo.pop(), ()):
                if child.pid not in self._known:
                    self._known[child.pid] = child
                    todo.append(child.pid)
        return self.pids()

    def pids(self) -> set[int]:
        return {pid for pid, proc in list(self._known.items()) if _alive(proc)}

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()

    def signal_all(self, signum: int) -> None:
        import psutil

        self.refresh()
        for proc in list(self._known.values()):
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signum)  # checks the process is still the one we saw


def _children_by_parent() -> dict[int, list[Any]]:
    """Every process of the system as a ``psutil.Process``, by its parent's pid (``children(recursive=True)``
    reads the whole process table once per call: once per known process would cost a core's tenth with 30 known)."""
    import psutil

    found: dict[int, list[Any]] = {}
    for proc in psutil.process_iter(["ppid"]):
        ppid = proc.info.get("ppid")
        if ppid is not None:
            found.setdefault(ppid, []).append(proc)
    return found


def _alive(proc: Any) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class AttemptResult:
    exit_code: int
    duration_s: float
    interrupted: int | None = None  # the signal that made yolosafe stop the child


def child_env(base: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """``base`` without inherited rank variables (they silently turn Ultralytics into a DDP rank), plus ``extra``."""
    env = {k: v for k, v in base.items() if k not in STRAY_DIST_VARS}
    env.update(extra)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env[PARENT_ENV] = str(os.getpid())
    return env


def run_child(
    cmd: Sequence[str],
    env: dict[str, str],
    log: IO[bytes],
    on_start: Callable[[ProcessTree], None] | None = None,
    out: IO[bytes] | None = None,
    preempt: Callable[[], None] | None = None,
) -> AttemptResult:
    """Run ``cmd`` in its own session, tee its output, and stop its whole tree on SIGINT/SIGTERM/SIGHUP
    (:func:`stop_signals`), or on a KeyboardInterrupt raised in this thread (a notebook kernel's interrupt, a handler
    that is not ours). A stream that cannot be written (a full disk under ``log``, a closed terminal under ``out``)
    is dropped, once, with a line on the other: the child and its story go on. ``preempt``: on a first
    :data:`PREEMPT_SIGNALS`, called in a thread before the stop (it returns once the ranks saved, or its bounded grace
    ran out)."""
    out = out or byte_stream(sys.stdout)
    started = time.monotonic()
    piped = not bench.bench_off("tee")  # switched off: the child writes to this process's stdout itself, no log
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE if piped else None,
                            stderr=subprocess.STDOUT if piped else None, start_new_session=True)
    tree = ProcessTree(proc.pid).start()
    received: list[int] = []
    killer = threading.Timer(STOP_GRACE_S, tree.signal_all, args=(signal.SIGKILL,))

    def stop(signum: int, _frame: Any) -> None:
        if received:
            tree.signal_all(signal.SIGKILL)  # second Ctrl-C: no more waiting
            return
        received.append(signum)

        def then_stop() -> None:
            if preempt is not None and signum in PREEMPT_SIGNALS:
                preempt()
            tree.signal_all(signal.SIGINT)  # every rank, the launcher and the worker: each stops cleanly
            killer.start()

        if preempt is not None and signum in PREEMPT_SIGNALS:
            threading.Thread(target=then_stop, name="yolosafe-preempt", daemon=True).start()
        else:
            then_stop()

    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, stop) for s in stop_signals()} if in_main else {}
    try:
        if on_start:
            on_start(tree)
        _until_done(proc, (out, log), lambda: stop(signal.SIGINT, None))
        if received or tree.refresh() - {proc.pid}:  # nothing of the tree outlives the attempt
            tree.signal_all(signal.SIGKILL)
    finally:
        killer.cancel()
        tree.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return AttemptResult(proc.returncode, time.monotonic() - started, received[0] if received else None)


def _until_done(proc: subprocess.Popen[bytes], streams: Sequence[IO[bytes]], interrupted: Callable[[], None]) -> None:
    """Tee the child's output until it ended; a KeyboardInterrupt meanwhile stops the tree as SIGINT does (a second
    one kills it), and the output of its stopping still reaches the streams."""
    while True:
        try:
            _tee(proc, streams)
            proc.wait()
            return
        except KeyboardInterrupt:
            interrupted()


def _tee(proc: subprocess.Popen[bytes], streams: Sequence[IO[bytes]]) -> None:
    """Copy the child's output, byte for byte (progress bars stay live), until every writer closed the pipe."""
    if proc.stdout is None:  # not piped (a benchmark's switch): the child writes to the terminal itself
        return
    fd = proc.stdout.fileno()
    live = list(streams)
    while chunk := os.read(fd, 65536):
        for stream in list(live):
            try:
                stream.write(chunk)
                stream.flush()
            except OSError as exc:  # ENOSPC under the log, EIO of a hung-up terminal: the others go on
                live.remove(stream)
                _dropped(stream, exc, live)
            except ValueError:  # closed by its owner
                live.remove(stream)


def _dropped(stream: IO[bytes], exc: OSError, live: Sequence[IO[bytes]]) -> None:
    """One line on the streams still written, naming the one that failed and why."""
    name = getattr(stream, "name", None)
    what = name if isinstance(name, str) else "the terminal"
    if not isinstance(name, str):
        silence(sys.stdout)
    line = f"\nyolosafe: cannot write to {what} ({exc.strerror or exc}); its output goes on elsewhere\n".encode()
    for other in live:
        with contextlib.suppress(OSError, ValueError):
            other.write(line)
            other.flush()


class TextSink:
    """Bytes written to a text stream that has no ``.buffer`` (a notebook's ``OutStream``, ``io.StringIO``):
    decoded as UTF-8 as they come (a character split between two writes is kept for the next), ``\r`` kept."""

    def __init__(self, stream: IO[str]) -> None:
        import codecs

        self.stream = stream
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, chunk: bytes) -> int:
        text = self.decoder.decode(bytes(chunk))
        if text:
            self.stream.write(text)
        return len(chunk)

    def flush(self) -> None:
        with contextlib.suppress(AttributeError, ValueError):
            self.stream.flush()


def silence(stream: Any) -> None:
    """Point a stream whose terminal is gone (a hang-up: EIO; a full device: ENOSPC) at /dev/null, so that later
    writes and the interpreter's last flush succeed instead of ending the process with a traceback."""
    with contextlib.suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)


def byte_stream(stream: Any) -> IO[bytes]:
    """Where bytes for ``stream`` go: its binary buffer when it has one (a terminal, a file), else a
    :class:`TextSink` over it."""
    buffer = getattr(stream, "buffer", None)
    return buffer if buffer is not None and hasattr(buffer, "write") else TextSink(stream)  # type: ignore[return-value]


OFFLINE_ENV = "YOLO_OFFLINE"  # Ultralytics' own switch: is_online() answers False at once, without a name lookup


def offline_env(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` with Ultralytics offline unless it says otherwise: the children that train, check or measure without
    being asked to download (``import ultralytics`` otherwise looks two DNS names up, a wait on an offline
    machine whose resolver never answers)."""
    return {**base, OFFLINE_ENV: base.get(OFFLINE_ENV, "1")}


def run_module(module: str, args: Sequence[str], timeout: float,
               env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` in a throw-away child of this interpreter, its output captured as text."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else dict(env))


def reset_inherited_signals() -> None:
    """Handle Ctrl-C and SIGTERM whatever the parent ignored: a shell that starts ``yolosafe train ... &`` without
    job control sets SIGINT to "ignore", and every process inherits it, so the stop yolosafe sends would wait out
    its grace period and end in SIGKILL. The first thing every process yolosafe starts does."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def exit_with_parent() -> None:
    """End this process soon after its parent is gone (the parent SIGKILLed: nobody else will stop us).

    A daemon thread polls ``getppid``; once the process is re-parented it leaves with ``os._exit``. The chain ends
    level by level: the supervisor dies, its launcher notices and exits, the launcher's ranks notice and exit.
    Polling rather than ``PR_SET_PDEATHSIG``: that fires when the parent *thread* that forked us ends, and torch's
    launcher may start ranks from any thread; polling is also portable. The expected parent comes from
    ``YOLOSAFE_PARENT_PID`` where the starter set it, so a parent that died before this call counts too; this process
    sets it in turn for the processes it starts (the launcher's ranks inherit its environment).
    """
    parent = int(os.environ.get(PARENT_ENV) or os.getppid())
    os.environ[PARENT_ENV] = str(os.getpid())

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        with contextlib.suppress(OSError):  # the output pipe may have died with the parent
            print(f"yolosafe: parent process {parent} is gone; pid {os.getpid()} exits", file=sys.stderr, flush=True)
        os._exit(Exit.FAILED)

    threading.Thread(target=watch, name="yolosafe-parent-watch", daemon=True).start()


def identity(pid: int) -> dict[str, Any]:
    """What names a process beyond its pid: its start time (a reused pid has another)."""
    import psutil

    try:
        return {"pid": pid, "create_time": psutil.Process(pid).create_time()}
    except psutil.Error:
        return {"pid": pid, "create_time": None}


def is_alive(ident: dict[str, Any]) -> bool:
    """Whether the process recorded by :func:`identity` still runs (same pid and start time, not a zombie)."""
    import psutil

    try:
        proc = psutil.Process(int(ident["pid"]))
        same = ident.get("create_time") is None or abs(proc.create_time() - float(ident["create_time"])) < 0.01
        return same and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False
