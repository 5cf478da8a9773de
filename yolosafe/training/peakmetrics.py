"""Each epoch's torch memory peaks, per GPU and phase, as Ultralytics metrics: they land in ``results.csv`` and in
every logger Ultralytics feeds (TensorBoard, MLflow, W&B, ...), where users already look.

Every rank knows only its own GPU's peaks (the callbacks reset them at each phase start and keep the epoch's training
peaks in the rank's context), so right after each validation all ranks exchange theirs (``all_gather_object``, one
small collective per epoch) and rank 0 reports the peaks of every GPU. The keys are fixed by the plan's GPUs,
``memory/gpu{N}_{train|val}_{allocated|reserved}_mib`` (NVML numbering), and are NaN where torch has no figure (the
CPU), so results.csv keeps the same columns every epoch. A multi-node run names each GPU by its node and its position
on it (``memory/node1_gpu0_train_reserved_mib``): node 0 cannot know the other nodes' NVML numbers, and the same
number on two nodes is two GPUs.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any

from yolosafe.gpus import nvml_index
from yolosafe.training import torchmem
from yolosafe.training.context import RunContext

PREFIX = "memory/"
KINDS = MappingProxyType({"allocated": "max_allocated_mib", "reserved": "max_reserved_mib"})


def plan_gpus(context: RunContext) -> list[int | str]:
    """The plan's GPUs as NVML indices; over several nodes, ``node{N}_gpu{i}`` labels for every GPU of every node."""
    gpus, nnodes = list(context.spec.plan.get("gpus", [])), int(context.spec.plan.get("nnodes") or 1)
    if nnodes > 1:
        return [f"node{n}_gpu{i}" for n in range(nnodes) for i in range(len(gpus))]
    return gpus


def _label(gpu: int | str) -> str:
    return gpu if isinstance(gpu, str) else f"gpu{gpu}"


def keys(gpus: list[int | str]) -> list[str]:
    return [f"{PREFIX}{_label(gpu)}_{phase}_{kind}_mib" for gpu in gpus for phase in ("train", "val") for kind in KINDS]


def _mine(trainer: Any, context: RunContext) -> tuple[int | str | None, dict[str, dict[str, float | None]]]:
    """This process's GPU (NVML index, or its node label over several nodes; a single process on the CPU stands for
    a plan's only GPU) and its peaks."""
    gpus = plan_gpus(context)
    index = context.gpu_index(getattr(trainer, "device", None))
    if gpus and isinstance(gpus[0], str):  # multi-node
        gpu: int | str | None = None if index is None else f"node{context.node}_gpu{index}"
    else:
        gpu = nvml_index(gpus, index) if index is not None else (gpus[0] if len(gpus) == 1 else None)
    return gpu, {"train": context.progress.train_peaks, "val": torchmem.peaks(getattr(trainer, "device", None))}


def epoch_peaks(trainer: Any, context: RunContext) -> dict[str, float]:
    """This epoch's peaks of every GPU of the plan; to be called by every rank at the same point (a collective)."""
    mine = _mine(trainer, context)
    everyone = [mine]
    if trainer.world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            everyone = [None] * trainer.world_size
            dist.all_gather_object(everyone, mine)
    found = dict.fromkeys(keys(plan_gpus(context)), math.nan)
    for gpu, phases in (item for item in everyone if item is not None):
        for phase, peaks in phases.items():
            for kind, field in KINDS.items():
                key = f"{PREFIX}{_label(gpu)}_{phase}_{kind}_mib"
                if key in found and (peaks or {}).get(field) is not None:
                    found[key] = float(peaks[field])
    return found


def ordered(metrics: dict[str, Any], context: RunContext) -> dict[str, Any]:
    """``metrics`` with the peak columns last and always present (NaN when this epoch had no validation)."""
    rest = {k: v for k, v in metrics.items() if not k.startswith(PREFIX)}
    return {**rest, **{key: metrics.get(key, math.nan) for key in keys(plan_gpus(context))}}
