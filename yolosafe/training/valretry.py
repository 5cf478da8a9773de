"""A validation OOM recovered in place: the rank that runs out of memory inside its validation loop halves its own
forward batch and validates its shard again, inside the running training.

Ultralytics' validation loop (``BaseValidator.__call__``) has no collective per batch: every DDP rank validates its
own shard with its own loader, and the ranks meet only after the loop (``gather_stats``, the loss reduce). So a rank
can catch the OOM of one of its batches, let the traceback go (which frees the batch's tensors), empty its CUDA
cache and run its shard again from the start, while the other ranks wait at the gather.

What it runs again is the uninterrupted validation itself: the same loader (so the same shard: Ultralytics'
``ContiguousDistributedSampler`` cuts the shards from the loader's batch size, and a rank with a loader of its own at
another batch would validate other images than the other ranks left it), the same batches and letterboxed shapes.
Only the network's forward pass is split (:func:`split_forward`): each batch goes through the layers before the head
in pieces of the smaller batch, the head runs once on the joined features, and the loss, the postprocessing and the
metrics run on the whole batch as before, so every batch's loss is Ultralytics' own (its normalisation is per
batch), and ``len(dataloader)`` (the loss divisor) is unchanged. The result is the uninterrupted run's up to the
arithmetic of a smaller convolution batch. The forward pass is what grows with the batch in an inference pass; the
assigner of the loss has Ultralytics' own OOM fallback (one image at a time). Later validations of that rank (the
final validation of best.pt too) keep the forward batch that worked.

Not recovered here, left to the relaunch: an OOM at forward batch 1, a network that is not an Ultralytics one, and
any OOM outside the loop (model set-up, the gather, the loss reduce: the other ranks may already be past a
collective there). Each recovery writes a failure record
marked ``recovered`` (:func:`yolosafe.training.failure.write_failure`), a ``val_oom_recovered`` event and one line;
the loop's progress bar the OOM cut short goes to train.log only (:mod:`yolosafe.training.cutbars`).

With ``val_oom = relaunch`` in the run spec the validator is Ultralytics' own, and every validation OOM ends the
attempt as before.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yolosafe import oom
from yolosafe.errors import YolosafeError
from yolosafe.rundir import files as rundir
from yolosafe.rundir import results
from yolosafe.training import callbacks, cutbars, durable, torchmem
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
    validation loop is caught and the shard validated again with half the forward batch, down to 1."""

    val_retry: ValRetry  # set by retrying()
    _in_loop: bool = False  # between init_metrics and gather_stats: the loop, where no collective runs

    def init_metrics(self, model: Any) -> None:
        super().init_metrics(model)  # type: ignore[misc]
        self.val_retry.split(model)  # the model the loop runs (its network: the training's EMA, or best.pt's)
        self._in_loop = True

    def gather_stats(self) -> None:
        self._in_loop = False
        self.val_retry.unsplit()
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
            finally:
                self.val_retry.unsplit()
            # Outside the except block: the exception and its traceback (the failed batch's frames) are gone.
            self.val_retry.again(self, lost)
            again = True

    @property
    def forward_batch(self) -> int | None:
        """The batch the network's forward pass runs at, when a retry made it smaller than the loader's (the
        ``val_start`` event's batch)."""
        return self.val_retry.forward_batch


class ValRetry:
    """The trainer side of :class:`InPlaceValRetry`: the record of a caught OOM and the smaller forward batch."""

    def __init__(self, trainer: Any, context: RunContext) -> None:
        self.trainer = trainer
        self.context = context
        self.forward_batch: int | None = None  # None: the loader's batch, whole
        self._restore: Any = None
        self._splittable = False  # the validated model's network was found (split_forward can run it in pieces)

    def split(self, model: Any) -> None:
        """The network of ``model`` runs its forward pass in pieces of :attr:`forward_batch`, until :meth:`unsplit`."""
        self.unsplit()
        network = network_of(model)
        self._splittable = network is not None
        if self.forward_batch is not None and network is not None:
            self._restore = split_forward(network, self.forward_batch)

    def unsplit(self) -> None:
        restore, self._restore = self._restore, None
        if restore is not None:
            restore()

    def caught(self, validator: Any, exc: RuntimeError) -> Lost | None:
        """The OOM's record, marked recovered in place; None (re-raise) for anything else, at forward batch 1, or
        when the network cannot be split."""
        import torch

        if not (isinstance(exc, torch.OutOfMemoryError) or oom.is_oom_text(str(exc))):
            return None
        batch = self.forward_batch or int(getattr(validator.dataloader, "batch_size", 0) or 0)
        if batch <= 1 or not self._splittable:
            return None
        progress = self.context.progress
        lost = Lost(batch, progress.epoch, progress.final)
        failurerecord.write_failure(self.context, exc, self.trainer.batch_size // max(self.trainer.world_size, 1),
                                    validator.device, recovered={"val_batch": batch, "next_val_batch": batch // 2})
        cutbars.cut_short(exc)  # the loop's bar, left at the failed batch: train.log's, not the terminal's
        return lost

    def again(self, validator: Any, lost: Lost) -> None:
        """Free what the failed validation held; the next pass splits each batch's forward pass in halves of it."""
        cleared = torchmem.clear_cache(validator.device)
        smaller = self.forward_batch = lost.batch // 2
        callbacks.append_event(self.context, "val_oom_recovered", validator, batch=lost.batch,
                               next_batch=smaller, cleared_mib=cleared)
        # on stdout, the stream of the bar the OOM cut short: its mark comes first there (training.cutbars)
        print(f"yolosafe: {recovered_line(self.context, lost, smaller, self.trainer.epochs)}", file=sys.stdout,
              flush=True)


def network_of(model: Any) -> Any:
    """The Ultralytics network (``ultralytics.nn.tasks.BaseModel``, its head ``model[-1]``) a validation runs:
    the training's EMA itself, or, for best.pt, the one inside ``AutoBackend``; None for anything else."""
    from ultralytics.nn.tasks import BaseModel
    from ultralytics.utils.torch_utils import unwrap_model

    for _ in range(4):  # DDP / compile wrappers, AutoBackend, its PyTorch backend
        model = unwrap_model(model)
        if isinstance(model, BaseModel):
            return model
        model = getattr(model, "backend", None) or getattr(model, "model", None)
        if model is None:
            return None
    return None


class _HeadReached(YolosafeError):
    """Raised by the head's pre-hook: the head's inputs for one piece of the batch (control flow, never seen)."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__("head reached")
        self.inputs = (args, kwargs)


class _CannotJoin(YolosafeError):
    """The pieces' head inputs are not batch-first tensors (or shared values): the batch runs whole."""


def split_forward(network: Any, size: int) -> Any:
    """``network``'s forward pass in pieces of ``size`` images: for a larger batch each piece runs the layers
    before the head (Ultralytics' own ``predict``, stopped at the head by a pre-hook), the pieces' head inputs are
    joined along the batch, and the head runs once on them, so its output (what the validator's loss, postprocess
    and metrics read) is the whole batch's. Returns the function that undoes it (the class's forward again)."""
    whole = network.forward
    head = network.model[-1]

    def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
        if not hasattr(x, "split") or x.shape[0] <= size:
            return whole(x, *args, **kwargs)
        try:
            head_args, head_kwargs = _head_inputs(whole, head, pieces(x, size), args, kwargs)
        except _CannotJoin:
            return whole(x, *args, **kwargs)
        return head(*head_args, **head_kwargs)

    network.forward = forward  # the instance's: nn.Module.__call__ looks it up there first

    def restore() -> None:
        if vars(network).get("forward") is forward:
            del network.forward

    return restore


def _head_inputs(whole: Any, head: Any, pieces: tuple[Any, ...], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
    """The head's (args, kwargs) for the whole batch, from the forward pass of each piece stopped at the head."""
    handle = head.register_forward_pre_hook(_stop_at_head, with_kwargs=True)
    inputs = []
    try:
        for piece in pieces:
            try:
                whole(piece, *args, **kwargs)
            except _HeadReached as reached:  # its traceback (the piece's other activations) goes with it
                inputs.append(reached.inputs)
            else:
                raise _CannotJoin("the head was not reached")
    finally:
        handle.remove()
    return join_pieces(inputs, [len(piece) for piece in pieces])


def _stop_at_head(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    raise _HeadReached(args, kwargs)


def join_pieces(pieces: list[Any], sizes: list[int]) -> Any:
    """The pieces' values joined into the whole batch's: tensors whose first dimension is each piece's size are
    concatenated along it, lists, tuples and dicts element by element, anything else must be the same in every
    piece (:class:`_CannotJoin` otherwise)."""
    import torch

    first = pieces[0]
    if isinstance(first, torch.Tensor):
        if all(p is first for p in pieces):
            return first
        if all(isinstance(p, torch.Tensor) and p.dim() and p.shape[0] == n for p, n in zip(pieces, sizes, strict=True)):
            return torch.cat(pieces)
        raise _CannotJoin("a tensor that is not batch-first")
    if isinstance(first, (list, tuple)):
        if not all(type(p) is type(first) and len(p) == len(first) for p in pieces):
            raise _CannotJoin("pieces of different structure")
        joined = [join_pieces([p[i] for p in pieces], sizes) for i in range(len(first))]
        return joined if isinstance(first, list) else type(first)(joined)
    if isinstance(first, dict):
        if not all(isinstance(p, dict) and p.keys() == first.keys() for p in pieces):
            raise _CannotJoin("pieces of different structure")
        return {k: join_pieces([p[k] for p in pieces], sizes) for k in first}
    if all(p is first or p == first for p in pieces):
        return first
    raise _CannotJoin("values that differ between pieces")


def pieces(batch: Any, size: int) -> tuple[Any, ...]:
    """A batch (a tensor, batch-first) in the forward passes of a retry: consecutive pieces of ``size``, the last
    one smaller."""
    return batch.split(size)


def shard_batches(indices: list[int], batch: int, forward_batch: int | None) -> list[list[int]]:
    """The images of each forward pass of a rank that validates ``indices`` (its sampler's shard, in order) with a
    loader of ``batch``: the loader's batches (consecutive, the last one smaller, as torch's DataLoader cuts them),
    each cut by :func:`pieces` at ``forward_batch`` (a retry's halving)."""
    import torch

    loaded = [indices[i:i + batch] for i in range(0, len(indices), batch)]
    return [p.tolist() for b in loaded for p in pieces(torch.tensor(b, dtype=torch.long), forward_batch or batch)]


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
    durable.save_beside(trainer, UNVALIDATED, MARK, {
        "epoch": trainer.epoch, "train": trainer.label_loss_items(trainer.tloss), "lr": dict(trainer.lr),
        "loss_items": {k: v.detach().cpu().tolist() for k, v in trainer.loss_items.items()},
        "loss": float(trainer.loss.detach().cpu())})


def pending(ckpt: Any) -> dict[str, Any] | None:
    """The mark of a checkpoint written before its epoch's validation; None for any other."""
    mark = ((ckpt or {}).get("train_metrics") or {}).get(MARK) if isinstance(ckpt, dict) else None
    return mark if isinstance(mark, dict) and mark.get("epoch") == ckpt.get("epoch") else None


def validate_pending(trainer: Any, mark: dict[str, Any]) -> None:
    """Validate the resumed epoch and close it as ``BaseTrainer._do_train`` closes an epoch (metrics row, stopper,
    checkpoints, ``on_fit_epoch_end``, the stop shared by every rank); :class:`TrainingDone` when the run stops
    there."""

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
