"""What a phase event of ``events.jsonl`` says: which GPUs it speaks for, and the phase they are in after it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from yolosafe.gpus.inventory import nvml_index


def event_gpus(event: Mapping[str, Any], plan_gpus: Sequence[int]) -> tuple[int, ...]:
    """The GPUs (NVML indices) an event speaks for: the plan's GPU at the rank's CUDA device index, or every GPU of
    the plan for a process on the CPU (fake GPUs: the one simulated process stands for all ranks)."""
    index = event.get("gpu")
    if index is None:
        return tuple(plan_gpus)
    gpu = nvml_index(plan_gpus, index)
    return () if gpu is None else (gpu,)


def phase_after(event: Mapping[str, Any]) -> str:
    """The phase a GPU is in after an event: the one a ``*_start`` event opens, else ``other``."""
    started = str(event.get("event", "")).endswith("_start")
    return str(event.get("phase") or "other") if started else "other"
