"""A checkpoint made durable beside the training, not in its way.

The checkpoint a retry and ``--resume`` read (``last.pt``, ``step.pt``, ``unvalidated.pt``) must survive a power loss:
its data on disk before the rename that puts it in place, the rename on disk after it (:func:`durable_replace`).
The ``fsync`` waits on the disk, tens of milliseconds for a small model and seconds for a large one on a slow disk,
while the CPU and the GPU have nothing to do with it. :class:`Pending` does it on a thread of its own: the training
goes on at once, and until the sync ends the previous checkpoint stays in place (so a rank killed meanwhile resumes
from that one, as when it is killed during a synchronous fsync). What must follow the new checkpoint (removing the
step checkpoint it supersedes) is handed to :meth:`Pending.then` and runs right after its rename, in that order.
One is pending at a time: the next save, the final evaluation and the end of training wait for it
(:meth:`Pending.wait`), and an error of the sync (a full disk) is raised there.

yolosafe's own checkpoints (the step checkpoint, the state kept before validation) are written by
:func:`save_beside`, through Ultralytics' own ``save_model``: the same file, the same safety, a resume Ultralytics
reads as its own.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any


def durable_replace(partial: Path, final: Path, sync: bool) -> None:
    """``partial`` renamed over ``final``; with ``sync``, through a power loss too: its data on disk before the
    rename, the rename itself after it. A killed process needs neither (the page cache outlives it, the rename is
    atomic); a crashed machine could otherwise come back with a last.pt of zeros."""
    if sync:
        fsync(partial)
    os.replace(partial, final)
    if sync:
        fsync(final.parent)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Pending:
    """``partial`` made durable and renamed over ``final`` on a thread; :meth:`then` queues what must follow it.

    ``then``'s actions run on that thread right after the rename, or at once on the caller's when the rename is
    already done; never when the sync failed (the previous checkpoint, still in place, keeps what it supersedes).
    ``partial`` is gone when the thread ends, renamed or removed."""

    def __init__(self, partial: Path, final: Path) -> None:
        self.partial, self.final = partial, final
        self._lock = threading.Lock()
        self._after: list[Callable[[], None]] = []
        self._done = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"yolosafe-sync-{final.name}", daemon=False)
        self._thread.start()

    def _run(self) -> None:
        try:
            durable_replace(self.partial, self.final, sync=True)
            with self._lock:
                self._done, after = True, list(self._after)
            for action in after:
                action()
        except BaseException as exc:  # raised on the training's thread, by wait()
            self._error = exc
        finally:
            self.partial.unlink(missing_ok=True)

    def then(self, action: Callable[[], None]) -> None:
        """``action`` once ``final`` is in place and durable (now, if it is)."""
        with self._lock:
            if not self._done:
                self._after.append(action)
                return
        action()

    def wait(self, raise_error: bool = True) -> None:
        """Until the sync, the rename and the actions after it are done; their error raised (once) with
        ``raise_error``."""
        self._thread.join()
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error


def save_beside(trainer: Any, name: str, key: str, value: Any) -> None:
    """The trainer's state through Ultralytics' own ``save_model`` into ``weights/NAME`` (never last.pt, best.pt or
    epochN.pt), with ``value`` under ``key`` in its ``train_metrics``; the trainer's paths and metrics as they were
    after."""
    saved = trainer.last, trainer.best, trainer.save_period, trainer.metrics
    trainer.last, trainer.best = trainer.wdir / name, trainer.wdir / f".{name}.best"
    trainer.save_period = -1
    trainer.metrics = {**(trainer.metrics or {}), key: value}
    try:
        trainer.save_model()
    finally:
        trainer.best.unlink(missing_ok=True)
        trainer.last, trainer.best, trainer.save_period, trainer.metrics = saved
