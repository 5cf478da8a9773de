"""What a checkpoint says about its training, read without torch: the epoch it holds and the epochs it trains to.

An Ultralytics checkpoint is a zip whose ``data.pkl`` is the pickle of a dict: ``epoch`` (0-based, the last epoch
saved; ``-1`` once the final validation has stripped the optimizer from it) and ``train_args`` (with ``epochs``).
The pickle's opcodes are read, never executed (:mod:`pickletools`), so this is safe on any file and needs no torch.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path

_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_INT_OPS = {"BININT", "BININT1", "BININT2", "INT", "LONG", "LONG1", "LONG4"}


@dataclass(frozen=True)
class Progress:
    """``epoch``: the last epoch saved (0-based), or -1 when the training finished and was stripped."""

    epoch: int
    epochs: int | None

    @property
    def finished(self) -> bool:
        """Every epoch trained: only the final validation (of best.pt) may be left to do."""
        return self.epoch < 0 or (self.epochs is not None and self.epoch + 1 >= self.epochs)

    @property
    def epochs_saved(self) -> int | None:
        """How many epochs the checkpoint holds (its ``results.csv`` rows); None once stripped."""
        return None if self.epoch < 0 else self.epoch + 1


def _first_int_after(ops: list[tuple[str, object]], key: str) -> int | None:
    for i, (name, arg) in enumerate(ops):
        if arg != key or "UNICODE" not in name:
            continue
        for follow, value in ops[i + 1:i + 4]:
            if follow in _MEMO_OPS:
                continue
            if follow in _INT_OPS and isinstance(value, int) and not isinstance(value, bool):
                return value
            break
    return None


UNREADABLE = (zipfile.BadZipFile, OSError, KeyError, zipfile.LargeZipFile)  # what reading a file as a zip may raise


def pickle_of(path: Path) -> bytes | None:
    """The bytes of the checkpoint's ``data.pkl``; None when the zip has none; one of :data:`UNREADABLE` when the file
    is no readable zip."""
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        return archive.read(pickles[0]) if pickles else None


def progress(path: Path) -> Progress | None:
    """The checkpoint's progress; None when the file is not a checkpoint this can read (checked elsewhere)."""
    try:
        data = pickle_of(path) or b""
        ops = [(op.name, arg) for op, arg, _ in pickletools.genops(io.BytesIO(data))]
    except (*UNREADABLE, ValueError, EOFError):
        return None
    epoch = _first_int_after(ops, "epoch")
    return None if epoch is None else Progress(epoch, _first_int_after(ops, "epochs"))
