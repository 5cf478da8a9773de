"""The progress bars an exception cut short: for ``train.log``, never a dead bar on the terminal.

Ultralytics' bars (``ultralytics.utils.tqdm.TQDM``) close when the loop over them ends, an exception's too: as the
exception leaves the loop's frame, the loop lets its iterator go, and the bar draws its last frame (``0% 0/4``) and
ends the line. The validation loop's bar at a validation OOM recovered in place, or the epoch's bar at a training OOM
the relaunch recovers, would stay on the terminal, dead, above the bar of the retry. :func:`cut_short`, in the
handler that recovers (or records) the failure, writes one line begun with :data:`yolosafe.oom.BAR_CUT_SHORT` for
each bar the exception cut short, on the bar's own stream right after the bar's line end; the supervisor's terminal
filter (:class:`yolosafe.supervisor.terminal.TracebackFilter`) holds a short bar's line end until it sees what
follows, and for that line takes the bar off the terminal: the log keeps both.

The bar's stream is the one to write to: under the rank launcher each rank's stdout and stderr are teed by threads of
their own, so only lines of one stream keep their order. yolosafe's line about the recovery goes there too.
"""

from __future__ import annotations

import io
from typing import Any

from yolosafe import oom


def cut_short(exc: BaseException) -> int:
    """One marked line per progress bar that ``exc`` cut short (short of its total, in the frames ``exc`` went
    through); a bar still open is closed first, its last frame kept off the stream. Returns how many. A stop
    (``KeyboardInterrupt``) cuts none: its bar stays where the user stopped it."""
    if isinstance(exc, KeyboardInterrupt):
        return 0
    from ultralytics.utils.tqdm import TQDM

    bars: dict[int, Any] = {}
    tb = exc.__traceback__
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if isinstance(value, TQDM) and not value.disable and (not value.closed or short(value)):
                bars.setdefault(id(value), value)
        tb = tb.tb_next
    for bar in bars.values():
        start = ""
        if not bar.closed:  # its frames so far are on the line: the mark ends that line, the filter clears it
            _close_quietly(bar)
            start = "\r"
        bar.file.write(f"{start}{oom.BAR_CUT_SHORT}{' '.join(str(bar.desc).split())} at {bar.n}/{bar.total}\n")
        bar.file.flush()
    return len(bars)


def short(bar: Any) -> bool:
    """Whether a bar stopped before its total (a bar without one never ends short)."""
    return bool(bar.total) and bar.n < bar.total


def _close_quietly(bar: Any) -> None:
    """Close ``bar`` as Ultralytics would, its last frame and line end kept off its stream."""
    shown = bar.file
    bar.file = io.StringIO()
    try:
        bar.close()
    finally:
        bar.file = shown
