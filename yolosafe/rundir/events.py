"""What a phase event of ``events.jsonl`` says: the phase its GPUs are in after it (which GPUs those are:
:func:`yolosafe.gpus.inventory.event_gpus`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def phase_after(event: Mapping[str, Any]) -> str:
    """The phase a GPU is in after an event: the one a ``*_start`` event opens, else ``other``."""
    started = str(event.get("event", "")).endswith("_start")
    return str(event.get("phase") or "other") if started else "other"
