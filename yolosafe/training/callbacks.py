"""yolosafe's Ultralytics callbacks: what runs inside the trainer and the validator, in the single training process
and in every DDP rank.

Every rank is a ``python -m yolosafe.training.worker SPEC`` process of its own (started by
:mod:`yolosafe.supervisor.launchcmd`) and adds
these callbacks to its model itself, bound to its :class:`~yolosafe.training.context.RunContext`: where to write,
which rank
and GPU it is, the injection. They keep the context's progress (phase, epoch, batch), which the failure record, the
peak metrics and the injection read.

They record phase events (train/val start and end, with epoch, rank and batch) as JSON lines in the run directory,
with torch's own peak allocated and reserved memory of the phase in each end event (the peaks are reset at each phase
start), and raise the injection (``YOLOSAFE_INJECT_OOM``) at validation batches; the training step's injection point
is in the trainer (:class:`yolosafe.training.trainer.OomInjectionPoint`). Right before validation they collect
garbage and
empty the allocator cache on every rank (run spec ``clear_before_val``, on by default): Ultralytics does it only
above 50 % use, and validation's differently shaped batches cannot reuse train's cached blocks.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from yolosafe import bench, oom
from yolosafe.rundir import files as rundir
from yolosafe.rundir.records import VAL_PHASES
from yolosafe.training import torchmem
from yolosafe.training.context import RunContext

Hook = Callable[[Any], None]  # an Ultralytics callback: called with the trainer or the validator


def maybe_inject(context: RunContext, phase: str) -> None:
    """Raise the injected fault here if the injection matches this point; counted across retries in the run
    directory (``.injected``), so ``times=1`` fires once, whichever attempt reaches it first."""
    injection, progress = context.injection, context.progress
    local = (context.node, context.rank.local)  # an injection that names a node means its local rank
    if injection is None or not injection.matches(phase, progress.epoch, progress.iteration, context.rank.index, local):
        return
    counter = context.run.injected
    done = int(counter.read_text()) if counter.is_file() else 0
    if injection.times and done >= injection.times:
        return
    counter.write_text(str(done + 1))
    raise injected_error(injection.error_at(done), context.rank.local)


def injected_error(error: str, gpu: int) -> BaseException:
    """The exception a real GPU raises for ``error`` (:data:`yolosafe.oom.ERRORS`), with its real text."""
    import torch
    import torch.distributed

    kinds = {"oom": torch.OutOfMemoryError, "accelerator": torch.AcceleratorError,
             "nccl": torch.distributed.DistBackendError, "cudnn": RuntimeError, "cublas-init": RuntimeError,
             "cudnn-internal": RuntimeError, "runtime": RuntimeError}
    return kinds[error](oom.injected_text(error, gpu))


def add_callbacks(model: Any, hooks: Mapping[str, Hook]) -> None:
    """Add ``hooks`` (event name to callback) to an Ultralytics ``Model`` (or trainer/validator), each once, after
    the callbacks it already has (Ultralytics runs an event's callbacks in the order they were added)."""
    for event, hook in hooks.items():
        if hook not in model.callbacks.get(event, []):
            model.add_callback(event, hook)


def append_event(context: RunContext, event: str, obj: Any, **fields: Any) -> None:
    """One line of ``events.jsonl``: ``event`` on this rank, at its progress, on the device of ``obj`` (a trainer or
    validator)."""
    progress = context.progress
    # multi-node: each node's ranks append to the node's own file (O_APPEND is atomic on one machine, not over NFS)
    rundir.append_jsonl(context.run.events, {
        "t": time.time(),
        "event": event,
        "phase": progress.phase,
        "epoch": progress.epoch,
        "final": progress.final,
        "rank": context.rank.index,
        "gpu": context.gpu_index(_device(obj)),
        "pid": os.getpid(),
        "attempt": context.attempt,
        **fields,
    })


# Ultralytics' TaskAlignedAssigner catches a CUDA OOM, warns once (this wording) and assigns one image at a time.
ASSIGNER_OOM = re.compile(r"CUDA out of memory in TaskAlignedAssigner with batch_size=(\d+) and max_num_obj=(\d+)")


class AssignerNearMiss(logging.Handler):
    """A near miss: the training step ran out of memory in Ultralytics' assigner and went on, slowly, one image at a
    time. Ultralytics only logs it (once per run and rank); this handler on its logger records it as an
    ``assigner_oom`` event with the batch and ``max_num_obj``."""

    def __init__(self, context: RunContext, trainer: Any) -> None:
        super().__init__(logging.WARNING)
        self.context, self.trainer = context, trainer

    def emit(self, record: logging.LogRecord) -> None:
        match = ASSIGNER_OOM.search(record.getMessage())
        if match:
            append_event(self.context, "assigner_oom", self.trainer, batch=int(match[1]), max_num_obj=int(match[2]),
                         iteration=self.context.progress.iteration)


def watch_assigner(context: RunContext, trainer: Any) -> None:
    """Record the assigner's near misses of this process (once: the handler stays for the process's life)."""
    logger = logging.getLogger("ultralytics")
    if not any(isinstance(h, AssignerNearMiss) for h in logger.handlers):
        logger.addHandler(AssignerNearMiss(context, trainer))


def _device(obj: Any) -> Any:
    """The device a trainer or validator runs on."""
    return getattr(obj, "device", None)


class TrainingCallbacks:
    """The callbacks of one process, bound to its context: :meth:`hooks` are what Ultralytics calls."""

    def __init__(self, context: RunContext) -> None:
        self.context = context
        self.progress = context.progress

    def hooks(self) -> dict[str, Hook]:
        return {
            "on_train_start": self.on_train_start,
            "on_train_epoch_start": self.on_train_epoch_start,
            "on_train_batch_start": self.on_train_batch_start,
            "on_train_epoch_end": self.on_train_epoch_end,
            "on_val_start": self.on_val_start,
            "on_val_batch_start": self.on_val_batch_start,
            "on_val_end": self.on_val_end,
            "on_fit_epoch_end": self.on_fit_epoch_end,
        }

    def register(self, model: Any) -> None:
        add_callbacks(model, self.hooks())

    def _record(self, event: str, obj: Any, **fields: Any) -> None:
        if bench.bench_off("events"):
            return
        append_event(self.context, event, obj, **fields)

    def on_train_start(self, trainer: Any) -> None:
        watch_assigner(self.context, trainer)

    def on_train_epoch_start(self, trainer: Any) -> None:
        # yolosafe owns OOM recovery: Ultralytics' in-process halving (first epoch, single GPU) would halve the batch
        # a second time for one OOM and keep a fragmented allocator; its counter at 3 makes the trainer re-raise.
        trainer._oom_retries = 3
        progress = self.progress
        progress.phase, progress.epoch, progress.iteration, progress.final = "train", trainer.epoch, -1, False
        torchmem.reset_peaks(_device(trainer))
        self._record("train_start", trainer, batch=trainer.batch_size // max(trainer.world_size, 1))

    def on_train_batch_start(self, trainer: Any) -> None:
        self.progress.iteration += 1  # the training step's own injection point is trainer.OomInjectionPoint

    def on_train_epoch_end(self, trainer: Any) -> None:
        self.progress.train_peaks = torchmem.peaks(_device(trainer))
        self._record("train_end", trainer, **self.progress.train_peaks)

    def on_val_start(self, validator: Any) -> None:
        self.progress.phase, self.progress.iteration = ("final" if self.progress.final else "val"), -1
        cleared = torchmem.clear_cache(_device(validator)) if self.context.spec.clear_before_val else None
        torchmem.reset_peaks(_device(validator))
        loader = getattr(validator, "dataloader", None)
        batch = getattr(validator, "forward_batch", None) or getattr(loader, "batch_size", None)  # after a retry: its
        self._record("val_start", validator, batch=batch, cleared_mib=cleared)

    def on_val_batch_start(self, validator: Any) -> None:
        # Counted here: Ultralytics sets validator.batch_i after this callback (None on the first batch, then the last).
        self.progress.iteration += 1
        maybe_inject(self.context, self.progress.phase or "val")

    def on_val_end(self, validator: Any) -> None:
        self._end_val(validator)

    def on_fit_epoch_end(self, trainer: Any) -> None:
        self._end_val(trainer)  # on_val_end fires on rank 0 only; the other ranks close their validation here

    def _end_val(self, obj: Any) -> None:
        if self.progress.phase in VAL_PHASES:
            self._record("val_end", obj, **torchmem.peaks(_device(obj)))
            self.progress.phase = None
