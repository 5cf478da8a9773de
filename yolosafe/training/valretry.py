"""A validation OOM recovered in place: the rank that runs out of memory inside its validation loop halves its own
validation batch and validates its shard again, inside the running training.

Ultralytics' validation loop (``BaseValidator.__call__``) has no collective per batch: every DDP rank validates its
own shard with its own loader, and the ranks meet only after the loop (``gather_stats``, the loss reduce). So a rank
can catch the OOM of one of its batches, let the traceback go (which frees the batch's tensors), empty its CUDA
cache, rebuild its loader with half the batch and run its shard again from the start, while the other ranks wait at
the gather. Its metrics start afresh (``init_metrics`` and the loss are reset by ``__call__`` itself), so the result
is that of an uninterrupted validation at the smaller batch. Later validations of that rank keep the loader that
worked (the final validation of best.pt reuses it too).

Not recovered here, left to the relaunch: an OOM at batch 1, and any OOM outside the loop (model set-up, the gather,
the loss reduce: the other ranks may already be past a collective there). Each recovery writes a failure record
marked ``recovered`` (:func:`yolosafe.training.failure.write_failure`), a ``val_oom_recovered`` event and one line.

With ``val_oom = relaunch`` in the run spec the validator is Ultralytics' own, and every validation OOM ends the
attempt as before.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yolosafe import oom
from yolosafe.errors import YolosafeError
from yolosafe.rundir import files as rundir
from yolosafe.rundir import results
from yolosafe.training import callbacks, torchmem
from yolosafe.training import failure as failurerecord
from yolosafe.training.context import RunContext

IN_PLACE, RELAUNCH = "in-place", "relaunch"  # the run spec's val_oom


@dataclass(frozen=True)
class Lost:
    """What a caught validation OOM leaves behind once its exception is gone: the batch it failed at."""

    batch: int
    epoch: int
    final: bool


class InPlaceValRetry:
    """``__call__`` (a validator mixin, put in front of the task's validator by :func:`retrying`): an OOM inside the
    validation loop is caught and the shard validated again at half the batch, down to 1."""

    val_retry: ValRetry  # set by retrying()
    _in_loop: bool = False  # between init_metrics and gather_stats: the loop, where no collective runs

    def init_metrics(self, model: Any) -> None:
        super().init_metrics(model)  # type: ignore[misc]
        self._in_loop = True

    def gather_stats(self) -> None:
        self._in_loop = False
        super().gather_stats()  # type: ignore[misc]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        again = False
        while True:
            self._in_loop = False
            try:
                if not again:
                    return super().__call__(*args, **kwargs)  # type: ignore[misc]
                # Validated again by this rank alone: the set-up's once-per-node barrier (the final validation's
                # data check, save_txt's clean-up) would wait for ranks that wait at the gather.
                with no_barriers(type(self)):
                    return super().__call__(*args, **kwargs)  # type: ignore[misc]
            except RuntimeError as exc:
                lost = self.val_retry.caught(self, exc) if self._in_loop else None
                if lost is None:
                    raise
            # Outside the except block: the exception and its traceback (the failed batch's frames) are gone.
            self.val_retry.again(self, lost)
            again = True


class ValRetry:
    """The trainer side of :class:`InPlaceValRetry`: the record of a caught OOM and the smaller loader."""

    def __init__(self, trainer: Any, context: RunContext) -> None:
        self.trainer = trainer
        self.context = context

    def caught(self, validator: Any, exc: RuntimeError) -> Lost | None:
        """The OOM's record, marked recovered in place; None (re-raise) for anything else, or at batch 1."""
        import torch

        if not (isinstance(exc, torch.OutOfMemoryError) or oom.is_oom_text(str(exc))):
            return None
        batch = int(getattr(validator.dataloader, "batch_size", 0) or 0)
        if batch <= 1:
            return None
        progress = self.context.progress
        lost = Lost(batch, progress.epoch, progress.final)
        failurerecord.write_failure(self.context, exc, self.trainer.batch_size // max(self.trainer.world_size, 1),
                                    validator.device, recovered={"val_batch": batch, "next_val_batch": batch // 2})
        return lost

    def again(self, validator: Any, lost: Lost) -> None:
        """Free what the failed validation held, and give the validator (and the trainer) a loader at half the
        batch."""
        old, validator.dataloader = validator.dataloader, None
        if hasattr(old, "close"):
            old.close()
        del old
        cleared = torchmem.clear_cache(validator.device)
        smaller = lost.batch // 2
        loader = build_val_loader(self.trainer, smaller)
        validator.dataloader = self.trainer.test_loader = loader
        callbacks.append_event(self.context, "val_oom_recovered", validator, batch=lost.batch,
                               next_batch=smaller, cleared_mib=cleared)
        print(f"yolosafe: {recovered_line(self.context, lost, smaller, self.trainer.epochs)}", file=sys.stderr,
              flush=True)


def loader_module(trainer_class: type) -> Any:
    """The module of the Ultralytics task trainer's own ``get_dataloader`` (where its ``torch_distributed_zero_first``
    is looked up)."""
    for cls in trainer_class.__mro__:
        if "get_dataloader" in vars(cls) and cls.__module__.startswith("ultralytics."):
            return sys.modules[cls.__module__]
    raise LookupError(f"no Ultralytics get_dataloader in {trainer_class.__name__}")


@contextlib.contextmanager
def no_barriers(cls: type) -> Iterator[None]:
    """``torch_distributed_zero_first`` (Ultralytics' once-per-node barrier) a plain block in the Ultralytics modules
    of ``cls`` and its bases, for the duration (this process only: every rank is a process of its own)."""
    modules = {sys.modules[c.__module__] for c in cls.__mro__ if c.__module__.startswith("ultralytics.")}
    modules = {m for m in modules if hasattr(m, "torch_distributed_zero_first")}
    saved = {m: m.torch_distributed_zero_first for m in modules}
    try:
        for module in modules:
            module.torch_distributed_zero_first = _no_barrier
        yield
    finally:
        for module, barrier in saved.items():
            module.torch_distributed_zero_first = barrier


def build_val_loader(trainer: Any, batch: int) -> Any:
    """The rank's validation loader at ``batch``, built by the task trainer's own ``get_dataloader`` (same split,
    same shard; rect shapes follow the batch), without its dataset-cache barrier: the cache exists by now, and a
    barrier inside one rank's validation would wait for ranks that wait at the gather."""
    from ultralytics.utils import LOCAL_RANK

    trainer.val_batch_in_place = batch  # yolosafe.training.trainer.ValidationBatch reads it
    with no_barriers(type(trainer)):
        return trainer.get_dataloader(trainer.data[trainer.args.split], batch_size=batch, rank=LOCAL_RANK, mode="val")


def _no_barrier(_local_rank: int) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def recovered_line(context: RunContext, lost: Lost, smaller: int, epochs: int) -> str:
    """``OOM in validation at epoch 3/100 on rank 1, GPU 1: val batch 16 -> 8 on that rank, validated again in
    place`` (GPU in the plan's numbering)."""
    what = "the final validation" if lost.final else f"validation at epoch {lost.epoch + 1}/{epochs}"
    parts = [f"rank {context.rank.index}"] if context.rank.distributed else []
    gpus = context.spec.plan.get("gpus") or []
    index = context.rank.local if context.rank.distributed else 0
    if isinstance(gpus, list) and index < len(gpus):
        parts.append(f"GPU {gpus[index]}")
    where = f" on {', '.join(parts)}" if parts else ""
    that = " on that rank" if context.rank.distributed else ""
    return f"OOM in {what}{where}: val batch {lost.batch} -> {smaller}{that}, validated again in place"


def retrying(validator: Any, trainer: Any, context: RunContext) -> Any:
    """``validator`` (the task's own, built by Ultralytics) with :class:`InPlaceValRetry` in front of its class."""
    base = type(validator)
    validator.__class__ = type(f"Retrying{base.__name__}", (InPlaceValRetry, base), {})
    validator.val_retry = ValRetry(trainer, context)
    return validator


# A validation OOM that still needs a relaunch trains nothing again: rank 0 keeps each epoch's trained state right
# before its validation (weights/unvalidated.pt, marked in its train_metrics), the supervisor resumes from it, and the
# relaunched ranks validate that epoch first, writing its results.csv row, last.pt and best.pt as Ultralytics would.
UNVALIDATED = rundir.UNVALIDATED
MARK = "yolosafe/unvalidated"  # in the checkpoint's train_metrics: the epoch, its train losses and learning rates


class TrainingDone(YolosafeError):
    """The validated epoch was the last one (or early stopping ended the run): only the final validation is left."""


def save_unvalidated(trainer: Any) -> None:
    """Rank 0, right before an epoch's validation: its trained state through Ultralytics' own ``save_model``, into
    ``weights/unvalidated.pt`` (never best.pt or epochN.pt)."""
    saved = trainer.last, trainer.best, trainer.save_period, trainer.metrics
    trainer.last, trainer.best = trainer.wdir / UNVALIDATED, trainer.wdir / f".{UNVALIDATED}.best"
    trainer.save_period = -1
    trainer.metrics = {**(trainer.metrics or {}), MARK: {
        "epoch": trainer.epoch, "train": trainer.label_loss_items(trainer.tloss), "lr": dict(trainer.lr),
        "loss_items": {k: v.detach().cpu().tolist() for k, v in trainer.loss_items.items()},
        "loss": float(trainer.loss.detach().cpu())}}
    try:
        trainer.save_model()
    finally:
        trainer.best.unlink(missing_ok=True)
        trainer.last, trainer.best, trainer.save_period, trainer.metrics = saved


def pending(ckpt: Any) -> dict[str, Any] | None:
    """The mark of a checkpoint written before its epoch's validation; None for any other."""
    mark = ((ckpt or {}).get("train_metrics") or {}).get(MARK) if isinstance(ckpt, dict) else None
    return mark if isinstance(mark, dict) and mark.get("epoch") == ckpt.get("epoch") else None


def validate_pending(trainer: Any, mark: dict[str, Any]) -> None:
    """Validate the resumed epoch and close it as ``BaseTrainer._do_train`` closes an epoch (metrics row, stopper,
    checkpoints, ``on_fit_epoch_end``, the stop shared by every rank); :class:`TrainingDone` when the run stops
    there."""
    import time

    import torch
    import torch.distributed as dist
    from ultralytics.utils import RANK

    epoch = trainer.epoch = trainer.run_context.progress.epoch = int(mark["epoch"])
    trainer.train_time_start = getattr(trainer, "train_time_start", None) or time.time()
    trainer.lr = dict(mark.get("lr") or {})
    # what the first training step would have set: the validator's loss accumulators take their keys and shapes
    trainer.loss_items = {k: torch.tensor(v, device=trainer.device) for k, v in mark["loss_items"].items()}
    trainer.loss_names = trainer.loss_names or tuple(trainer.loss_items)
    trainer.loss = torch.tensor(mark["loss"], device=trainer.device)  # the fitness of a task without one
    final_epoch = epoch + 1 >= trainer.epochs
    trainer.metrics, trainer.fitness = trainer.validate()
    if RANK in {-1, 0}:
        results.trim(Path(trainer.csv).parent, epoch)  # a row of this epoch written before a stop goes: once each
        trainer.save_metrics(metrics={**mark.get("train", {}), **trainer.metrics, **trainer.lr})
        trainer.stop |= trainer.stopper(epoch + 1, trainer.fitness) or final_epoch
        if (trainer.args.save or final_epoch) and trainer.save_model():
            trainer.run_callbacks("on_model_save")
    trainer.run_callbacks("on_fit_epoch_end")
    if RANK != -1:
        shared = [trainer.stop if RANK == 0 else None]
        dist.broadcast_object_list(shared, 0)
        trainer.stop = shared[0]
    if trainer.stop:
        raise TrainingDone


def finish(trainer: Any) -> None:
    """What ``BaseTrainer._do_train`` does after its last epoch: the final validation of best.pt, the plots,
    ``on_train_end``."""
    from ultralytics.utils import RANK

    trainer.final_eval()
    if RANK in {-1, 0}:
        if trainer.args.plots:
            trainer.plot_metrics()
        trainer.run_callbacks("on_train_end")
    trainer._clear_memory()
