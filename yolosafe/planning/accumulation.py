"""Ultralytics' gradient accumulation, step by step: ``round(nbs / batch)``, capped at the run's iterations, ramped
up from 1 during warm-up. Pure; ``yolosafe.training.compat`` checks each step against Ultralytics' own source, so the
plan and
the dry run show what really runs.
"""

from __future__ import annotations

ULTRALYTICS_DEFAULT_NBS = 64
ULTRALYTICS_DEFAULT_WARMUP_EPOCHS = 3.0


def batches_per_epoch(images: int, per_gpu_batch: int, world_size: int) -> int:
    """``len(train_loader)`` per rank: ``build_dataloader`` splits the images over the ranks (rounding up, like
    ``DistributedSampler``), shrinks the batch to the shard, and keeps the last partial batch."""
    samples = -(-images // world_size)
    batch = min(per_gpu_batch, samples)
    return -(-samples // batch) if batch > 0 else 0


def nominal_accumulate(nbs: int, batch: int, iterations: int | None = None) -> int:
    """``BaseTrainer._build_train_pipeline``: ``max(round(nbs / batch), 1)``, at most the run's iterations
    (``len(train_loader) * epochs``, not capped in ``time`` mode, ``iterations`` None)."""
    accumulate = max(round(nbs / batch), 1)
    return accumulate if iterations is None else min(accumulate, iterations)


def warmup_iterations(warmup_epochs: float, epochs: int, batches: int) -> int:
    """``BaseTrainer._get_warmup_iterations``: warm-up leaves at least the last epoch alone."""
    warmup = min(warmup_epochs, max(epochs - 1, 0))
    return round(warmup * batches) if warmup > 0 else 0


def warmup_accumulate(iteration: int, warmup: int, accumulate: int) -> int:
    """The accumulation at global iteration ``iteration`` (``BaseTrainer._do_train``:
    ``max(1, int(np.interp(ni, [0, nw], [1, acc0]).round()))`` while ``ni <= nw``), without numpy."""
    if not warmup or iteration >= warmup:
        return accumulate
    return max(1, round((accumulate - 1) / warmup * iteration + 1))
