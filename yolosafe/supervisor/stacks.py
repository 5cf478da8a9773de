"""Every rank's stack at a hang: asked of each rank (its faulthandler, registered for
:data:`yolosafe.hang.STACK_SIGNAL`), py-spy's native frames where py-spy is installed, and what the stacks say: the
frame each rank's main thread is in, and whether that is a wait inside a collective.

A stopped process (SIGSTOP, state ``T``) cannot run its signal handler: the signal is sent first, then SIGCONT, so
the kernel delivers it before the process runs one more instruction of its own and the dump shows where it was
stopped. Only pids of the attempt's process tree that wrote a heartbeat are ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from yolosafe import hang

DUMP_WAIT_S = 5.0  # how long the ranks get to write their stacks
PYSPY_TIMEOUT_S = 20.0
# Where a main thread waits for the other ranks: torch.distributed's collectives (broadcast_object_list, barrier,
# all_reduce, gather), autograd's backward (DDP's gradient all-reduce runs inside it), DDP's forward.
COLLECTIVE = re.compile(r"torch/distributed/|torch/autograd/|torch/_tensor\.py\", line \d+ in backward"
                        r"|torch/nn/parallel/distributed\.py")
_THREAD = re.compile(r"^(?:Current thread|Thread) (0x[0-9a-f]+) \(most recent call first\):", re.MULTILINE)
_HEADER = re.compile(r"main thread (0x[0-9a-f]+)")


@dataclass(frozen=True)
class RankStack:
    """What one rank's dump says."""

    rank: int
    frame: str | None  # the innermost frame of its main thread, as faulthandler wrote it
    collective: bool  # that frame waits for other ranks
    path: Path
    native: Path | None = None


def is_stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (``T``: SIGSTOP, ``t``: a tracer's stop), from ``/proc/PID/stat``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] in (["T"], ["t"])


def dump(pids: Mapping[int, int], paths: Mapping[int, Path], native: Mapping[int, Path]) -> dict[int, RankStack]:
    """Ask every rank (``{rank: pid}``) for its stacks; read back what each wrote to ``paths[rank]``; py-spy's
    native frames into ``native[rank]`` where py-spy is installed."""
    sizes = {rank: _size(paths[rank]) for rank in pids}
    for pid in pids.values():
        stopped = is_stopped(pid)
        with contextlib.suppress(OSError):
            os.kill(pid, hang.STACK_SIGNAL)
            if stopped:
                os.kill(pid, signal.SIGCONT)  # the pending dump runs first
    deadline = time.monotonic() + DUMP_WAIT_S
    while time.monotonic() < deadline and any(_size(paths[r]) <= sizes[r] for r in pids):
        time.sleep(0.1)
    time.sleep(0.2)  # a dump is written in pieces: let the last one finish
    spy = shutil.which("py-spy")
    found = {}
    for rank, pid in pids.items():
        text = _since(paths[rank], sizes[rank])
        frame = main_frame(text, _read_header(paths[rank]))
        spied = _py_spy(spy, pid, native[rank]) if spy else None
        found[rank] = RankStack(rank, frame, bool(frame and COLLECTIVE.search(frame)), paths[rank], spied)
    return found


def main_frame(dump_text: str, main_ident: str | None) -> str | None:
    """The innermost frame of the main thread in one faulthandler dump (the last thread listed when the main
    thread's id is unknown: faulthandler lists the newest thread first)."""
    blocks = list(_THREAD.finditer(dump_text))
    if not blocks:
        return None
    chosen = next((b for b in blocks if main_ident and int(b[1], 16) == int(main_ident, 16)), blocks[-1])
    body = dump_text[chosen.end():].lstrip("\n").splitlines()
    return body[0].strip() if body and body[0].strip().startswith("File") else None


def _read_header(path: Path) -> str | None:
    with contextlib.suppress(OSError), open(path) as fh:
        match = _HEADER.search(fh.readline())
        return match[1] if match else None
    return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _since(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _py_spy(spy: str, pid: int, out: Path) -> Path | None:
    try:
        done = subprocess.run([spy, "dump", "--native", "--pid", str(pid)], capture_output=True, text=True,
                              timeout=PYSPY_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out.write_text(done.stdout + done.stderr)
    return out if done.returncode == 0 else None
