"""A name of an Ultralytics or torch module replaced for the duration of one call, in this process only (every rank
is a process of its own): how a trainer mixin changes what one of Ultralytics' long methods calls without a copy of
the method."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name`` is ``value`` for the duration, then what it was."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)
