"""What ``yolosafe train`` shows on the terminal, besides Ultralytics' own progress.

At start, a few lines that say how the run is spread (what Ultralytics prints does not: with fake GPUs it shows
``device=cpu`` and ``0G`` for a plan made for four GPUs). While it runs, the worker's output goes to the terminal
live, except Python tracebacks: they go to ``train.log`` only, and the supervisor ends with one line naming the
cause. The user sees progress and a sentence, not 40 lines of Ultralytics internals.
"""

from __future__ import annotations

import re
import sys
from typing import IO

from yolosafe import oom, proc
from yolosafe.planning import allocator
from yolosafe.planning.trainplan import TrainPlan

HEADER = "Traceback (most recent call last):"
CHAINED = ("During handling of the above exception", "The above exception was the direct cause")
TEE_PREFIX = re.compile(rb"\[rank(\d+)\]: ?")  # the launcher's line prefix (launchcmd), and torch's own in a rank
PARTIAL_PREFIX = re.compile(rb"\[(?:r(?:a(?:n(?:k\d*(?:\])?)?)?)?)?")
RANK_PREFIX = re.compile(r"^\[(?:rank|default)\d+\]:\s?")  # torch.distributed.run's per-rank line prefix
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colours and cursor moves (Ultralytics colours its messages)
# Lines for train.log only: torch DDP's warning about find_unused_parameters (Ultralytics' DDP sets it; the warning's
# source line follows it), torch.distributed.run's lines as it stops the ranks yolosafe ends.
LOG_ONLY = re.compile(r"find_unused_parameters=True( was specified|$)|Warning: find_unused_parameters=True"
                      r"|death signal, shutting down workers|Sending process \d+ closing signal SIG")
TORCH_LOG_LINE = re.compile(r"\[?W(?:\d|$)|\[$")  # a line torch's logging begins (W1201 ..., [W1201 ...]): held whole
WARNING_SOURCE = re.compile(r"^\s+\S.*run_backward\(")  # the source line Python prints under that warning
CUT_SHORT = oom.BAR_CUT_SHORT  # a worker's line after a bar an OOM cut short (training.cutbars): train.log only
CLEAR_LINE = b"\r\x1b[K"  # to the line's start, the line cleared (how Ultralytics' bar begins each frame)
BAR = re.compile(r"(\d+)% \S* (\d+)/(\d+)(?!\S)")  # Ultralytics' bar: percent, bar, images or batches done/total


def say(message: str) -> None:
    """One line of yolosafe's own on stderr, prefixed so it stands out from Ultralytics' output."""
    try:
        print(f"yolosafe: {message}", file=sys.stderr, flush=True)
    except OSError:  # the terminal was closed (EIO) or stderr is a full device: the story says it all
        proc.silence(sys.stderr)


def start_lines(plan: TrainPlan, env: dict[str, str], simulated: bool) -> list[str]:
    """How the run is spread: GPUs and per-GPU batch, accumulation, validation batch, allocator."""
    if plan.gpus:
        plural = "s" if len(plan.gpus) > 1 else ""
        where = f"GPU{plural} {plan.device}: batch {plan.batch} = {plan.per_gpu_batch} per GPU"
        if plan.nnodes > 1:  # --batch is the total over every node's GPUs
            where = (f"{plan.nnodes} nodes x GPU{plural} {plan.device}: batch {plan.batch} = {plan.per_gpu_batch} "
                     f"per GPU over {plan.world_size} ranks")
    else:
        where = f"CPU: batch {plan.batch}"
    if simulated:
        where += "; fake GPUs, so the training runs on the CPU (Ultralytics shows device=cpu and 0G)"
    return [
        where,
        f"effective batch {plan.real_effective_batch} = batch {plan.batch} x accumulate {plan.accumulate} "
        f"(nbs {plan.ultralytics_args()['nbs']})",
        f"validation batch {plan.val_batch}{' per GPU' if plan.gpus else ''}",
        f"allocator {allocator.ENV_VARS[0]}={env.get(allocator.ENV_VARS[0], '')}",
    ]


class TracebackFilter:
    """A byte stream to the terminal that drops Python tracebacks (the log gets everything, unfiltered).

    Output passes through as it comes, partial lines included, so progress bars stay live; only a partial line that
    could still become a traceback's first line (or another line for the log only) is held until it is complete. A
    traceback is its header, the indented frame lines, the exception line that ends it and the rest of its message
    (up to the next blank line), and chained tracebacks after it.

    A progress bar that ends short of its total may have been cut short by an OOM: its line end is held until the
    next line that shows. When that is the worker's :data:`CUT_SHORT` line (:mod:`yolosafe.training.cutbars`), the
    bar's line is cleared instead, so no dead bar stays above the retry's or the relaunch's; else the line end goes
    out first. :meth:`end` closes what the attempt's output left open.
    """

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.line = b""  # the current line, so far
        self.shown = 0  # how much of it is on the terminal already
        self.state = "text"  # text | frames (in a traceback) | after (its exception message) | gap (blank after it)
        # | warned (after a LOG_ONLY warning: its source line goes too)
        self.held = b""  # the line end of a bar that ended short, until the next line shown (or a CUT_SHORT line)

    def write(self, chunk: bytes) -> int:
        for piece in chunk.splitlines(keepends=True):
            self.line += piece
            if piece.endswith((b"\n", b"\r")):  # a line, or a progress bar's redraw
                if self._show(self.line):
                    self._show_line(self.line)
                self.line, self.shown = b"", 0
            elif self.state == "text" and not _may_be_held(_core(self.line)):
                self._emit(self.line[self.shown:])
                self.shown = len(self.line)
        return len(chunk)

    def flush(self) -> None:
        self.out.flush()

    def end(self) -> None:
        """The attempt's output is over: a line end still held goes out; a line its process left unfinished (stopped
        mid-line by the failure that ends the attempt) is ended there, or cleared when it is a bar cut short (the log
        keeps it), so the next line starts on a line of its own."""
        if self.shown:
            self.out.write(CLEAR_LINE if ended_short(_core(self.line)) else b"\n")
        else:
            self._emit(b"", force=True)
        self.line, self.shown, self.held, self.state = b"", 0, b"", "text"
        self.out.flush()

    def _emit(self, data: bytes, force: bool = False) -> None:
        if (data or force) and self.held:
            self.out.write(self.held)
            self.held = b""
        if data:
            self.out.write(data)

    def _show_line(self, line: bytes) -> None:
        rest = line[self.shown:]
        if line.endswith(b"\n") and ended_short(_core(line)):
            self._emit(rest[:-1], force=True)
            self.held = b"\n"
        else:
            self._emit(rest)

    def _show(self, line: bytes) -> bool:
        core = _core(line)
        if self.state == "text" and core.startswith(CUT_SHORT):
            self.held = b""  # the cut bar's line end (or, from a bar still open, the mark's own "\r")
            self.out.write(CLEAR_LINE)  # the bar's frames on that line go too
            return False
        if self.state == "text" and LOG_ONLY.search(core):
            self.state = "warned" if "find_unused_parameters" in core else "text"
            if self.shown:  # the start of the line (a progress bar the message is glued to) is out: end it
                self._emit(b"\n")
            return False
        if self.state == "warned":
            self.state = "text"
            if WARNING_SOURCE.match(core):
                return False
        if core.startswith(HEADER):
            self.state = "frames"
            return False
        if self.state == "frames":
            if not core or core[0].isspace():
                return False
            self.state = "after"  # the exception line: the supervisor names the cause in its own line
            return False
        if self.state == "after":  # the exception message's further lines, up to a blank line
            if not core.strip():
                self.state = "gap"
            return False
        if core.startswith(CHAINED) or (self.state == "gap" and not core.strip()):
            return False
        self.state = "text"
        return True


class RankStream:
    """The terminal's share of a rank launcher's output: one rank's stream, as if it ran alone.

    The launcher's output is every rank's lines, each begun with ``[rankN]: `` (torch.distributed.run's tee, with
    the launcher's line prefix) and the launcher's own lines. Passed on: the ``shown`` rank's bytes with the prefixes
    taken off (progress bars' ``\r`` redraws included) and the launcher's ``yolosafe:`` lines. Dropped: the other
    ranks' output and the rest of the launcher's (torch.distributed.run's warnings and failure dump); the log keeps
    all of it. A prefix in the middle of a line starts a piece of that rank's output (two ranks' partial lines meet
    in one line of the launcher's output; torch's own messages of a rank carry a second prefix).
    """

    def __init__(self, out: IO[bytes], shown: int = 0) -> None:
        self.out = out
        self.shown = shown
        self.pending = b""  # the end of the last chunk, which may still become a prefix
        self.source: int | str | None = None  # a rank, OWN (a launcher line shown), LAUNCHER; None: a line begins

    def write(self, chunk: bytes) -> int:
        data, self.pending = self.pending + chunk, b""
        while data:
            data = self._step(data)
        return len(chunk)

    def flush(self) -> None:
        self.out.flush()

    def end(self) -> None:
        """The attempt's output is over (:meth:`TracebackFilter.end` of the stream under it)."""
        end(self.out)

    def _step(self, data: bytes) -> bytes:
        """Pass on or drop the first piece of ``data``; returns what is left of it."""
        match = TEE_PREFIX.match(data)
        if match and match.end() == len(data) and not data.endswith(b" "):
            self.pending = data  # its space may come in the next chunk
            return b""
        if match:
            self.source = int(match.group(1))
            rest = data[match.end():]
            if self.source != self.shown and rest.startswith(OWN_LINE):  # yolosafe's own line, from any rank
                self.source = OWN
            return rest
        if self.source is None:  # a line of the launcher's output begins: whose is it?
            if _may_become_prefix(data) or (len(data) < len(OWN_LINE) and OWN_LINE.startswith(data)):
                self.pending = data  # too short to tell
                return b""
            self.source = OWN if data.startswith(OWN_LINE) else LAUNCHER
        piece, rest = _first_piece(data)
        if not rest and not piece.endswith((b"\n", b"\r")):
            bracket = piece.rfind(b"[")
            if bracket >= 0 and _may_become_prefix(piece[bracket:]):
                piece, self.pending = piece[:bracket], piece[bracket:]
        if self.source in (self.shown, OWN):
            self.out.write(piece)
        if piece.endswith((b"\n", b"\r")):
            self.source = None
        return rest


def end(stream: IO[bytes]) -> None:
    """An attempt's output to ``stream`` is over: what a filter still holds goes out (a plain stream: flushed)."""
    ending = getattr(stream, "end", None)
    (ending or stream.flush)()


OWN, LAUNCHER = "yolosafe", "launcher"  # RankStream's sources besides the ranks
OWN_LINE = b"yolosafe: "


def _first_piece(data: bytes) -> tuple[bytes, bytes]:
    """``data`` split after its first line end, or before a ``[rankN]: `` prefix, whichever comes first."""
    ends = [i + 1 for i in (data.find(b"\n"), data.find(b"\r")) if i >= 0]
    prefix = TEE_PREFIX.search(data, 1)
    if prefix:
        ends.append(prefix.start())
    end = min(ends) if ends else len(data)
    return data[:end], data[end:]


def _may_become_prefix(data: bytes) -> bool:
    """Whether ``data`` is the start of a ``[rankN]:`` prefix cut by the end of a chunk."""
    return PARTIAL_PREFIX.fullmatch(data) is not None


def ended_short(core: str) -> bool:
    """Whether a line (its core) ends in a progress bar's frame short of its total."""
    frame = ANSI.sub("", core).rsplit("\r", 1)[-1]
    found = BAR.search(frame)
    return found is not None and found.group(2) != found.group(3)


def _may_be_held(core: str) -> bool:
    """Whether a partial line (its core) could still become a line the terminal must not show from its start."""
    return (HEADER.startswith(core) or TORCH_LOG_LINE.match(core) is not None or CUT_SHORT.startswith(core)
            or core.startswith(CUT_SHORT))


def _core(line: bytes) -> str:
    return RANK_PREFIX.sub("", line.decode(errors="replace").rstrip("\r\n"))


def plain(text: str) -> str:
    """One line for the user: no colour codes, no rank prefix, no ``yolosafe:`` of a message that is quoted."""
    return RANK_PREFIX.sub("", ANSI.sub("", text)).strip().removeprefix("yolosafe: ")


def exception_line(log_text: str) -> str | None:
    """The exception line of the last traceback in ``log_text`` (``FileNotFoundError: ...``), if there is one."""
    found, inside = None, False
    for raw in log_text.splitlines():
        line = RANK_PREFIX.sub("", ANSI.sub("", raw)).rstrip()
        if line.startswith(HEADER):
            inside = True
        elif inside and line and not line[0].isspace():
            found, inside = plain(line), False
    return found
