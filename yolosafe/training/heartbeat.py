"""Every rank's progress, for the supervisor's hang watch: a heartbeat at each training step and validation batch,
the stack dump registered for the watch's signal, and the hang injection (``YOLOSAFE_INJECT_HANG``).

A beat is one fixed-width ``pwrite`` into the rank's own small file (:mod:`yolosafe.rundir.heartbeat`): no
collective, no flush, no rename, a few microseconds (``benchmarks/heartbeat.py``). The state a beat names is the one
the rank enters: ``setup`` (the process started, the trainer set up), ``train`` (an epoch started, a step ended),
``val`` / ``final`` (a validation started, a batch ended), ``save`` (rank 0 writes the checkpoints), ``sync`` (the
epoch is over: the rank waits for rank 0's save in Ultralytics' broadcast), ``end`` (training and its final
validation are over: rank 0's plots), ``done``.

The stack dump is :func:`faulthandler.register` for :data:`yolosafe.hang.STACK_SIGNAL`, into the rank's stack file
(``stacks/attempt-N/rank-R.txt``), registered before the first beat: the watch only signals ranks that beat.
"""

from __future__ import annotations

import faulthandler
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from yolosafe import bench, hang
from yolosafe.rundir import files as rundir
from yolosafe.rundir import heartbeat as beats
from yolosafe.rundir.records import VAL_PHASES
from yolosafe.training.context import RunContext

Hook = Callable[[Any], None]


def open_heartbeat(context: RunContext) -> None:
    """This process's stack file with the dump registered for the watch's signal, then its heartbeat file."""
    files = context.heartbeat
    stack = context.run.stack(context.attempt, context.rank.index)
    stack.parent.mkdir(parents=True, exist_ok=True)
    files.stacks = open(stack, "a")  # noqa: SIM115 - faulthandler writes to it until the process ends
    files.stacks.write(f"yolosafe: stacks of rank {context.rank.index}, pid {os.getpid()}, main thread "
                       f"0x{threading.main_thread().ident:016x}\n")
    files.stacks.flush()
    faulthandler.register(hang.STACK_SIGNAL, file=files.stacks, all_threads=True, chain=False)
    files.writer = beats.Writer(context.run.heartbeat(context.attempt, context.rank.index))


def beat(context: RunContext, state: str) -> None:
    """One beat of this process: where it is now (its files are opened at the first)."""
    writer = context.heartbeat.writer
    if writer is None:
        if bench.bench_off("heartbeat"):
            return
        open_heartbeat(context)
        writer = context.heartbeat.writer
        assert writer is not None
    progress = context.progress
    writer.beat(state, progress.epoch, progress.iteration, time.time(), os.getpid(), context.rank.index)


def maybe_hang(context: RunContext, phase: str) -> None:
    """Sleep here if a hang injection matches this point (each fires once per run: ``.injected-hang``)."""
    if not context.hangs:
        return
    progress, local = context.progress, (context.node, context.rank.local)
    for index, injection in enumerate(context.hangs):
        if not injection.matches(phase, progress.epoch, progress.iteration, context.rank.index, local):
            continue
        counter = context.run.injected_hang
        fired = rundir.read_json(counter) if counter.is_file() else []
        if index in fired:
            continue
        rundir.write_json(counter, [*fired, index])
        print(f"yolosafe: injected hang on rank {max(context.rank.index, 0)} in {phase} at epoch "
              f"{progress.epoch + 1}, iteration {progress.iteration}"
              + (f" for {injection.seconds:g} s" if injection.seconds is not None else ""), flush=True)
        if injection.seconds is not None:
            time.sleep(injection.seconds)
            return
        while True:  # forever: the supervisor's hang watch stops this rank
            time.sleep(3600)


class HeartbeatCallbacks:
    """The beats Ultralytics' callbacks give (the training step's hang point and the save are the trainer's:
    :class:`yolosafe.training.trainer.HangPoints`). Registered after yolosafe's own callbacks, which keep the
    progress these beats carry."""

    def __init__(self, context: RunContext) -> None:
        self.context = context

    def hooks(self) -> dict[str, Hook]:
        return {
            "on_pretrain_routine_end": self.on_pretrain_routine_end,
            "on_train_start": self.on_train_start,
            "on_train_epoch_start": self.on_train_epoch_start,
            "on_train_batch_start": self.on_train_batch_start,
            "on_train_batch_end": self.on_train_batch_end,
            "on_train_epoch_end": self.on_train_epoch_end,
            "on_val_start": self.on_val_progress,
            "on_val_batch_start": self.on_val_batch_start,
            "on_val_batch_end": self.on_val_progress,
            "on_fit_epoch_end": self.on_fit_epoch_end,
        }

    def on_pretrain_routine_end(self, _: Any) -> None:
        self._beat("setup")

    def on_train_epoch_end(self, _: Any) -> None:
        self._beat("val")  # what follows leads to the validation

    def on_val_progress(self, _: Any) -> None:
        self._beat(self._val_state())

    def on_val_batch_start(self, _: Any) -> None:
        maybe_hang(self.context, "val")

    def on_fit_epoch_end(self, _: Any) -> None:
        self._beat("sync")

    def on_train_start(self, trainer: Any) -> None:
        """Time each step's forward: a forward hook on the trained module (inside DDP, once per step)."""
        from ultralytics.utils.torch_utils import unwrap_model

        files = self.context.heartbeat

        def ended(*_: Any) -> None:
            files.forward_end = time.time()

        unwrap_model(trainer.model).register_forward_hook(ended)

    def on_train_epoch_start(self, _: Any) -> None:
        self.context.heartbeat.step_from = None  # the epoch's first batch waits for the loader to start: not counted
        self._beat("train")

    def on_train_batch_start(self, _: Any) -> None:
        files = self.context.heartbeat
        files.forward_end = None
        if files.step_from is None:
            files.step_from = time.time()

    def on_train_batch_end(self, _: Any) -> None:
        """The rank's own part of the step, from the last step's end (its data wait) to its forward's end: a
        straggler's is longer; the others wait for it inside backward, which is not counted."""
        files = self.context.heartbeat
        writer = files.writer
        if writer is not None and files.step_from is not None and files.forward_end is not None:
            writer.own += files.forward_end - files.step_from
            writer.steps += 1
        self._beat("train")
        files.step_from = time.time()

    def _val_state(self) -> str:
        phase = self.context.progress.phase
        return phase if phase in VAL_PHASES else "val"

    def _beat(self, state: str) -> None:
        beat(self.context, state)
