"""``--gpus``: which of the GPUs this process may use a run trains on (``cpu``, ``all``, ids), one line when the
choice is not there."""

from __future__ import annotations

from collections.abc import Sequence

from yolosafe.planning.trainplan import PlanError


def parse_gpus(text: str | None, available: Sequence[int], problem: str | None = None) -> tuple[int, ...]:
    """``--gpus``: ``cpu``, ``all``, or comma-separated ids that exist and are unique. None picks GPU 0 or CPU."""
    if text is None:
        return (available[0],) if available else ()
    text = text.strip().lower()
    if text == "cpu":
        return ()
    if not available:
        why = f": {problem}" if problem else ""
        raise PlanError(f"--gpus {text}: this machine has no GPU{why}; use --gpus cpu")
    if text == "all":
        return tuple(available)
    ids: list[int] = []
    for word in text.split(","):
        word = word.strip()
        if not (word.isascii() and word.isdecimal()):
            raise PlanError(f"--gpus {text}: {word!r} is not a GPU id (use e.g. --gpus 0,1 or --gpus cpu)")
        gpu = int(word)
        if gpu in ids:
            raise PlanError(f"--gpus {text}: GPU {gpu} is listed twice")
        if gpu not in available:
            raise PlanError(f"--gpus {text}: no GPU {gpu}; available: {', '.join(map(str, available)) or 'none'}")
        ids.append(gpu)
    return tuple(ids)
