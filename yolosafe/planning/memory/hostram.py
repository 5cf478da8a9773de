"""Host RAM of a run, estimated before it starts: DDP multiplies what each rank holds.

Every DDP rank is a process with its own dataloader workers and, with ``cache=ram`` (or ``cache=True``), its own
copy of the decoded training images (Ultralytics caches per dataset object, one per rank). A 4-GPU run with
``cache=ram`` needs four copies; the machine swaps or the OOM killer takes a rank. The figures per process are
assumptions (docs/memory-model.md); the image cache is the decoded size at ``imgsz`` (long side), uint8 RGB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MIB = 2**20
RANK_MIB = 2500.0  # one training process: torch, CUDA libraries, the model on the host (assumption)
WORKER_MIB = 400.0  # one dataloader worker: a forked copy, mostly shared, plus its batches (assumption)
ASPECT = 0.75  # the short side of an average photo over its long side (COCO: ~0.75)
ULTRALYTICS_WORKERS = 8


@dataclass(frozen=True)
class HostEstimate:
    ranks: int
    workers: int  # per rank
    cache_ram: bool
    images: int | None
    per_rank_cache_mib: float
    total_mib: float
    available_mib: float | None

    @property
    def fits(self) -> bool:
        return self.available_mib is None or self.total_mib <= self.available_mib


def available_mib() -> float | None:
    try:
        import psutil

        return psutil.virtual_memory().available / MIB
    except Exception:  # no psutil, or a container that hides /proc/meminfo
        return None


def estimate(args: dict[str, Any], ranks: int, imgsz: int, images: int | None,
             available: float | None) -> HostEstimate:
    """What the run will hold in host RAM: per rank a process, its workers, and its image cache."""
    workers = int(args.get("workers", ULTRALYTICS_WORKERS))
    cache_ram = args.get("cache") in (True, "ram", "True", "true")
    per_image = imgsz * imgsz * ASPECT * 3 / MIB
    cache = per_image * images if cache_ram and images else 0.0
    total = ranks * (RANK_MIB + workers * WORKER_MIB + cache)
    return HostEstimate(ranks, workers, cache_ram, images, cache, total, available)


def advice(est: HostEstimate) -> list[str]:
    """One line per problem, with what to change."""
    if est.fits:
        return []
    gib = 1024
    need, have = est.total_mib / gib, (est.available_mib or 0) / gib
    notes = [f"host RAM: the run needs about {need:.1f} GiB ({est.ranks} rank(s) x (process + {est.workers} "
             f"workers{' + a RAM image cache' if est.cache_ram else ''})) but {have:.1f} GiB is available"]
    if est.cache_ram:
        notes.append(f"use cache=disk: cache=ram keeps a copy per rank ({est.per_rank_cache_mib / gib:.1f} GiB each)")
    without_cache = est.total_mib - est.ranks * est.per_rank_cache_mib
    if est.workers > 2 and (not est.cache_ram or without_cache > (est.available_mib or 0)):
        spare = (est.available_mib or 0) - without_cache + est.ranks * est.workers * WORKER_MIB
        fit = max(int(spare / (est.ranks * WORKER_MIB)), 0)
        notes.append(f"use fewer dataloader workers: workers={min(fit, est.workers - 1)} (workers are per rank)")
    return notes
