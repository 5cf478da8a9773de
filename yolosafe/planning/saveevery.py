"""``--save-every``: how often rank 0 writes the step checkpoint inside an epoch (:mod:`yolosafe.training.stepckpt`).

``10m``, ``90s``, ``1h`` (a duration), ``500it`` (iterations), ``0`` (off: only Ultralytics' per-epoch saves), or
``auto`` (the default): a duration chosen from the run's own save times, so that saving costs under
:data:`AUTO_SHARE` of the training time, and never more often than :data:`AUTO_FLOOR_S`. Parsed here, without torch:
the supervisor checks the word before any run directory exists; the ranks read the parsed value from their run spec.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from yolosafe.errors import UsageError

AUTO = "auto"
AUTO_SHARE = 0.005  # auto: the interval is at least the last save's seconds / AUTO_SHARE (0.5 % of training time)
AUTO_FLOOR_S = 600.0  # auto: at most one step checkpoint every 10 minutes
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_WORD = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(it|s|m|h)\s*$")


class SaveEveryError(UsageError):
    """A ``--save-every`` word that is none of the forms; ``str()`` says which forms are."""


@dataclass(frozen=True)
class SaveEvery:
    """Every ``iterations`` iterations, or every ``seconds``; ``auto`` measures; neither: off."""

    iterations: int | None = None
    seconds: float | None = None
    auto: bool = False
    word: str = field(default="", compare=False)  # as given (10m), what the story and the run spec say

    def __str__(self) -> str:
        if self.word:
            return self.word
        if self.auto:
            return AUTO
        if self.iterations is not None:
            return f"{self.iterations}it"
        return "0" if self.seconds is None else f"{self.seconds:g}s"

    @property
    def off(self) -> bool:
        return self.iterations is None and self.seconds is None and not self.auto

    def interval_s(self, last_save_s: float | None) -> float | None:
        """The seconds between two saves (None: counted in iterations, or off)."""
        if self.auto:
            return max(AUTO_FLOOR_S, (last_save_s or 0.0) / AUTO_SHARE)
        return self.seconds

    def keeps_unvalidated(self, trained_s: float, last_save_s: float | None) -> bool:
        """Whether rank 0 keeps an epoch's trained state right before its validation (``weights/unvalidated.pt``,
        what a relaunch after a validation OOM or hang resumes from), ``trained_s`` seconds of training after the
        newest checkpoint, the last save having taken ``last_save_s``. ``auto``: when the save costs at most
        :data:`AUTO_SHARE` of the training it keeps (and while no save has been timed), so a short epoch is trained
        again rather than paid for at every epoch; any other ``--save-every`` (``0`` included): before every
        validation."""
        if not self.auto:
            return True
        return last_save_s is None or last_save_s <= AUTO_SHARE * trained_s


def parse(word: object) -> SaveEvery:
    """The ``--save-every`` word; :class:`SaveEveryError` with the reason."""
    text = str(word).strip().lower() if word is not None else AUTO
    if text == AUTO:
        return SaveEvery(auto=True, word=text)
    if text in {"0", "0it", "0s", "0m", "off", "false"}:
        return SaveEvery(word=text)
    match = _WORD.match(text)
    if not match:
        raise SaveEveryError("must be a duration (10m, 90s, 1h), iterations (500it), 0 (off) or auto")
    number, unit = float(match[1]), match[2]
    if unit == "it":
        if number != int(number) or number < 1:
            raise SaveEveryError("iterations must be a whole number of at least 1")
        return SaveEvery(iterations=int(number), word=text)
    if number <= 0:
        return SaveEvery(word=text)
    return SaveEvery(seconds=number * _UNITS[unit], word=text)
