"""Step checkpoints: a checkpoint inside the epoch every ``--save-every``, and a resume from that iteration.

Rank 0 writes ``weights/step.pt`` (:data:`yolosafe.rundir.files.STEP`, at most one, removed once the epoch's last.pt
is written) through Ultralytics' own ``save_model`` (so Ultralytics' resume reads its arguments, optimizer, EMA and
scaler), with what an exact continuation needs on top, in its ``train_metrics`` under :data:`STATE`: the model and
EMA at full precision, the optimizer, the epoch and the iterations done in it, the accumulation state
(``last_opt_step``), the epoch's running train losses (``tloss``), and of every rank its RNG states and the sample
order of that epoch as its sampler drew it.

A resume from it (every resume: the supervisor picks the newest of unvalidated.pt, step.pt and last.pt) starts at
that epoch and lets ``BaseTrainer._do_train`` run its loop as it is: the iterations already trained come as empty
batches that load nothing, train nothing and step nothing, while the loop's own warm-up, learning rates and
accumulation boundaries advance over them as in the uninterrupted run; each rank's loader then draws the samples
of that epoch it has not trained (the order its sampler drew, saved), at the attempt's batch. With another number of
ranks the samples left cannot be known: the epoch restarts from last.pt (the supervisor says so in its one line).

A preemption (SIGTERM or SIGUSR1 to the supervisor: ``supervisor.child.preempt``) leaves a request in the run
directory (``RunDir.preempt_request``); at the next step boundary where rank 0's view is shared (every
:data:`SYNC_EVERY` iterations over DDP, every iteration in one process) the ranks write the step checkpoint, rank 0
removes the request, and every rank waits for the stop.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from yolosafe import bench
from yolosafe.rundir import files as rundir
from yolosafe.training import callbacks, durable
from yolosafe.training.context import RunContext

STATE = "yolosafe/step"  # in the step checkpoint's train_metrics
RECORD_SAMPLES_ENV = "YOLOSAFE_RECORD_SAMPLES"  # drills: each rank records the dataset indices of every batch
PREEMPT_GRACE_S = 60.0  # after the step checkpoint a stop asked for, the most a rank waits for the stop itself
SYNC_EVERY = 8  # DDP: rank 0's clock and a stop's request reach every rank every this many iterations


class Skipped(dict):
    """A batch already trained before the resume: nothing loaded (a 1-pixel image for the progress bar)."""


class _NoForward:
    """The model for a skipped batch: no forward, no gradient, no collective; its loss items keep the epoch's
    running train losses where they were (``(tloss * i + tloss) / (i + 1)``)."""

    def __init__(self, loss_items: dict[str, Any], device: Any) -> None:
        self.loss_items, self.device = loss_items, device

    def __call__(self, batch: Any) -> tuple[Any, dict[str, Any]]:
        import torch

        return torch.zeros(1, device=self.device, requires_grad=True), dict(self.loss_items)


class RecordingSampler:
    """Ultralytics' train sampler (RandomSampler or DistributedSampler) as its BatchSampler iterates it: each epoch's
    order drawn whole and kept (the last few draws: the loader's workers may draw the next epoch early), and, once,
    a given order instead (the samples left of the resumed epoch)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.draws: deque[list[int]] = deque(maxlen=4)
        self.given: list[int] | None = None

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[int]:
        order, self.given = (self.given, None) if self.given is not None else (list(iter(self.inner)), None)
        self.draws.append(order)
        return iter(order)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)


class SkippingLoader:
    """The train loader of the resumed epoch: ``skip`` empty batches, then the rest drawn from the loader's
    persistent iterator (whose sampler yields only the samples left), ``len(loader)`` batches in all."""

    def __init__(self, loader: Any, skip: int, sentinel: Skipped, before_real: Any) -> None:
        self.loader, self.skip, self.sentinel, self.before_real = loader, skip, sentinel, before_real

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for _ in range(self.skip):
            yield self.sentinel
        self.before_real()
        loader = self.loader
        if loader.iterator is None:
            loader.iterator = loader._get_iterator()
        for _ in range(len(loader) - self.skip):
            yield next(loader.iterator)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["loader"], name)


def rng_states() -> dict[str, Any]:
    import numpy as np
    import torch

    states = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(states["random"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def step_state(ckpt: Any) -> dict[str, Any] | None:
    """The step state of a checkpoint; None for an epoch checkpoint."""
    state = ((ckpt or {}).get("train_metrics") or {}).get(STATE) if isinstance(ckpt, dict) else None
    return state if isinstance(state, dict) else None


def skipped_iterations(order_len: int, done_samples: int, batch: int) -> int:
    """The iterations at ``batch`` that stand for the ``done_samples`` first samples of a rank's epoch of
    ``order_len``: the epoch keeps its ``ceil(order_len / batch)`` iterations, the samples left fill the last ones."""
    return math.ceil(order_len / batch) - math.ceil((order_len - done_samples) / batch)


class StepCheckpoints:
    """``__init__``, ``resume_training``, ``_setup_train``, ``preprocess_batch``, ``optimizer_step``,
    ``_handle_nan_recovery``, ``plot_training_samples``, ``save_model``: the step checkpoint and the resume from it
    (module docstring). Ahead of :class:`yolosafe.training.trainer.OomInjectionPoint`: a skipped batch is never
    trained, so no fault is injected there."""

    run_context: RunContext
    step_resume: dict[str, Any] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._every = self.run_context.save_every
        self._i = -1  # the iteration of the epoch (0-based), counted here
        self._last_step = -1  # last_opt_step as the uninterrupted run has it
        self._loop_last = -1  # last_opt_step as this attempt's loop has it (-1 at its start)
        self._true_acc: int | None = None  # the accumulate of the iteration, while this mixin shifts it
        self._skip = 0
        self._order: list[int] | None = None  # this rank's order of the current epoch
        self._saved_at = time.monotonic()
        self._since_save = 0
        self._save_s: float | None = None
        self._files: dict[str, int] | None = None
        self._record = os.environ.get(RECORD_SAMPLES_ENV) == "1"
        self._samples: list[int] | None = None
        self.add_callback("on_train_epoch_start", self._epoch_start)
        self.add_callback("on_train_batch_start", self._batch_start)
        self.add_callback("on_train_batch_end", self._batch_end)
        self.add_callback("on_train_epoch_end", self._epoch_end)

    # --- resume ---------------------------------------------------------------------------------------------------

    def resume_training(self, ckpt: Any) -> None:
        state = step_state(ckpt) if self.resume else None
        if state is None:
            return super().resume_training(ckpt)
        epoch = int(state["epoch"])
        if int(state["world"]) != max(self.world_size, 1):
            return self._restart_epoch(state)
        if epoch >= 1:
            super().resume_training({**ckpt, "epoch": epoch - 1})
        else:
            self._load_checkpoint_state(ckpt)
            self.start_epoch = 0
        self._load_exact(state)
        self.step_resume = state

    def _load_exact(self, state: dict[str, Any]) -> None:
        from ultralytics.utils.torch_utils import unwrap_model

        unwrap_model(self.model).load_state_dict(state["model"])
        self.ema.ema.load_state_dict(state["ema"])
        self.ema.updates = state["updates"]
        optimizer = state["optimizer"]
        for saved, group in zip(optimizer["param_groups"], self.optimizer.param_groups, strict=True):
            saved["fused"] = group.get("fused")  # the device, not the checkpoint, picks the kernel (as Ultralytics)
        self.optimizer.load_state_dict(optimizer)

    def _restart_epoch(self, state: dict[str, Any]) -> None:
        """Another number of ranks: which samples each rank has left cannot be known; from last.pt, the epoch anew."""
        from ultralytics.nn.tasks import load_checkpoint
        from ultralytics.utils.torch_utils import unwrap_model

        last = self.wdir / rundir.LAST
        if self.run_context.rank.leads:  # the supervisor said it in its line (rundir.steps.words)
            callbacks.append_event(self.run_context, "step_restart", self, epoch=int(state["epoch"]),
                                   saved_world=int(state["world"]), world=max(self.world_size, 1))
        if not last.is_file():
            raise FileNotFoundError(f"{last}: no epoch checkpoint to restart epoch {state['epoch'] + 1} from")
        _, ckpt = load_checkpoint(last)
        unwrap_model(self.model).load_state_dict(ckpt["ema"].float().state_dict())
        super().resume_training(ckpt)

    def _setup_train(self) -> None:
        super()._setup_train()
        self._nb = len(self.train_loader)
        self._nw = self._get_warmup_iterations(self._nb)
        self._recording = self._install_recording()
        state = self.step_resume
        if state is None or self._recording is None:
            return
        rank = max(self.run_context.rank.index, 0)
        order = list(state["orders"][rank])
        batch = self.train_loader.batch_size
        done = int(state["done_samples"][rank])
        self._skip = skipped_iterations(len(order), done, batch)
        self._recording.given = order[done:]
        self._resume_order = order
        old = int(state["nb"])
        self._last_step = _rescale(int(state["last_opt_step"]), int(state["epoch"]), old, self._nb, self._skip,
                                   int(state["iteration"]))
        self._save_s = state.get("save_s")
        if self.run_context.rank.leads:
            callbacks.append_event(self.run_context, "step_resume", self, epoch=int(state["epoch"]),
                                   iteration=self._skip, of=self._nb, saved_iteration=int(state["iteration"]),
                                   saved_of=old, done_samples=done)

    def _install_recording(self) -> RecordingSampler | None:
        batch_sampler = getattr(getattr(self.train_loader, "batch_sampler", None), "sampler", None)
        inner = getattr(batch_sampler, "sampler", None)
        if inner is None or not hasattr(getattr(self.train_loader, "dataset", None), "im_files"):
            return None  # a loader or dataset of another shape: epoch checkpoints only
        if not isinstance(inner, RecordingSampler):
            batch_sampler.sampler = RecordingSampler(inner)
        return batch_sampler.sampler

    # --- the loop -------------------------------------------------------------------------------------------------

    def _epoch_start(self, trainer: Any) -> None:
        self._i, self._order = -1, None
        self._saved_at, self._since_save = time.monotonic(), 0  # the epoch's last.pt is the last save
        state = self.step_resume
        if state is not None and self.epoch == int(state["epoch"]):
            self._real_loader = self.train_loader
            items = {k: v for k, v in (state["tloss"] or {}).items()}
            self._no_forward = _NoForward(items, self.device)
            import torch

            sentinel = Skipped(img=torch.zeros(1, 3, 1, 1))
            self.train_loader = SkippingLoader(self._real_loader, self._skip, sentinel,
                                               lambda: set_rng_states(state["rng"][max(self.run_context.rank.index,
                                                                                       0)]))
            self._order = self._resume_order

    def _batch_start(self, trainer: Any) -> None:
        self._i += 1

    def _epoch_end(self, trainer: Any) -> None:
        if isinstance(self.train_loader, SkippingLoader):
            self.train_loader = self._real_loader
            self.step_resume = None

    def preprocess_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        ni = self._i + self._nb * self.epoch
        warm = bool(self._nw) and ni <= self._nw  # the loop has just set accumulate itself
        if self._true_acc is not None and not warm:
            self.accumulate = self._true_acc
        true_acc = self.accumulate
        if isinstance(batch, Skipped):
            if not isinstance(self.model, _NoForward):
                self._model_kept, self.model = self.model, self._no_forward
            self._true_acc, self.accumulate = true_acc, sys.maxsize // 4  # the loop steps nothing here
            return batch
        if isinstance(self.model, _NoForward):  # the first batch trained after the resume
            self.model = self._model_kept
            self.tloss = dict(self._no_forward.loss_items) or None
        shift = self._last_step - self._loop_last  # the loop's last_opt_step is -1 after its start: shift its test
        self._true_acc = true_acc if shift else None
        self.accumulate = true_acc + shift
        batch = super().preprocess_batch(batch)  # the injection point may raise here: that batch is not trained
        self._note_batch(batch)
        return batch

    def optimizer_step(self) -> None:
        super().optimizer_step()
        ni = self._i + self._nb * self.epoch
        self._last_step = self._loop_last = ni
        if self._true_acc is not None:
            self.accumulate, self._true_acc = self._true_acc, None

    def _handle_nan_recovery(self, epoch: int) -> bool:
        redo = super()._handle_nan_recovery(epoch)
        if redo:
            self._last_step = self._loop_last = -1  # the loop sets last_opt_step = -1
        return redo

    def plot_training_samples(self, batch: Any, ni: int) -> None:
        if not isinstance(batch, Skipped):
            super().plot_training_samples(batch, ni)

    def _note_batch(self, batch: dict[str, Any]) -> None:
        """This rank's order of the epoch, found once per epoch among the sampler's draws (its first trained batch
        tells which), and, in drills, the dataset indices of the batch as an event."""
        files = batch.get("im_file") if isinstance(batch, dict) else None
        if files is None or self._recording is None:
            return
        if self._files is None:
            self._files = {f: n for n, f in enumerate(self.train_loader.dataset.im_files)}
        indices = [self._files.get(f, -1) for f in files]
        if self._order is None:
            size = self.train_loader.batch_size
            start = self._i * size
            self._order = next((d for d in reversed(self._recording.draws) if d[start:start + len(indices)] == indices),
                               None)
        self._samples = indices if self._record else None  # recorded once the step's backward is done

    # --- the save -------------------------------------------------------------------------------------------------

    def _batch_end(self, trainer: Any) -> None:
        if isinstance(self.model, _NoForward):  # a batch trained before the resume: already saved
            return
        if self._samples is not None:
            items = self.loss_items if isinstance(self.loss_items, dict) else {}
            losses = {k: float(v) for k, v in items.items()}
            callbacks.append_event(self.run_context, "batch_trained", self, iteration=self._i, samples=self._samples,
                                   losses=losses)
            self._samples = None
        self._since_save += 1
        done = self._i + 1
        if self._recording is None or done >= self._nb:  # the epoch's own save comes next
            return
        due, preempted = self._decide(done)
        if due or preempted:
            self.save_step(done, preempted)
        if preempted:
            self._await_stop()

    def _decide(self, done: int) -> tuple[bool, bool]:
        """(a save is due, a stop asked for one): every rank the same answer. Iterations count alike on every rank;
        the clock and the stop's request are rank 0's, shared every :data:`SYNC_EVERY` iterations (one small
        all_reduce), so a save by time or a preemption comes at most that many iterations late."""
        counted = bool(self._every.iterations) and self._since_save >= self._every.iterations
        if self.world_size > 1 and not counted and done % SYNC_EVERY:
            return False, False
        timed = preempted = False
        if self.run_context.rank.leads:
            interval = None if self._every.iterations else self._every.interval_s(self._save_s)
            timed = interval is not None and time.monotonic() - self._saved_at >= interval
            preempted = self.run_context.run.preempt_request.exists()
        if self.world_size > 1:
            timed, preempted = self._shared(timed, preempted)
        return counted or timed, preempted

    def _shared(self, *flags: bool) -> tuple[bool, ...]:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([int(f) for f in flags], device=_collective_device(self))
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in tensor.tolist())

    def _await_stop(self) -> None:
        """After the step checkpoint a stop asked for: wait for the stop (the supervisor's SIGINT, a
        KeyboardInterrupt here), at most :data:`PREEMPT_GRACE_S`; then stop as it would."""
        deadline = time.monotonic() + PREEMPT_GRACE_S
        while time.monotonic() < deadline:
            time.sleep(0.1)
        raise KeyboardInterrupt("preempted: the step checkpoint is written")

    def save_step(self, done: int, preempted: bool = False) -> None:
        """Every rank: its RNG states and its epoch's order gathered on rank 0, which writes step.pt (and, after a
        stop's request, removes the request: the supervisor then stops the ranks)."""
        started = time.monotonic()
        size = self.train_loader.batch_size
        mine = {"rng": rng_states(), "order": self._order, "done_samples": min(done * size, len(self._order or []))}
        if self.world_size > 1:
            import torch.distributed as dist

            every: list[Any] = [None] * self.world_size
            dist.all_gather_object(every, mine)
        else:
            every = [mine]
        # an order not found: no exact continuation, the epoch checkpoint stays the newest
        if self.run_context.rank.leads and not bench.bench_off("step") and all(r["order"] is not None for r in every):
            self._write(done, every)
            self._save_s = time.monotonic() - started
            callbacks.append_event(self.run_context, "step_saved", self, iteration=done, of=self._nb,
                                   seconds=round(self._save_s, 4), preempted=preempted, world=max(self.world_size, 1),
                                   shard=len(every[0]["order"]), done_samples=every[0]["done_samples"])
        if preempted and self.run_context.rank.leads:
            self.run_context.run.preempt_request.unlink(missing_ok=True)
        self._saved_at, self._since_save = time.monotonic(), 0

    def _write(self, done: int, every: list[dict[str, Any]]) -> None:
        from copy import deepcopy

        from ultralytics.utils.torch_utils import unwrap_model

        state = {
            "epoch": self.epoch, "iteration": done, "nb": self._nb, "world": max(self.world_size, 1),
            "batch": self.train_loader.batch_size, "last_opt_step": self._last_step,
            "tloss": {k: v.detach().clone() for k, v in (self.tloss or {}).items()},
            "model": {k: v.detach().clone() for k, v in unwrap_model(self.model).state_dict().items()},
            "ema": {k: v.detach().clone() for k, v in self.ema.ema.state_dict().items()}, "updates": self.ema.updates,
            "optimizer": deepcopy(self.optimizer.state_dict()),
            "orders": [r["order"] for r in every], "done_samples": [r["done_samples"] for r in every],
            "rng": [r["rng"] for r in every], "save_s": self._save_s, "time": time.time(),
        }
        durable.save_beside(self, rundir.STEP, STATE, state)

    def save_model(self) -> bool:
        saved = super().save_model()
        if self.last.name == rundir.LAST:  # the epoch is kept: its step checkpoint is old
            self.when_durable(lambda: (self.wdir / rundir.STEP).unlink(missing_ok=True))
        return saved


def _rescale(last: int, epoch: int, old_nb: int, nb: int, skip: int, done: int) -> int:
    """``last_opt_step`` of the saved run in this attempt's iterations: the same unless the batch changed, then the
    same share of the epoch's iterations done since that step."""
    if old_nb == nb:
        return last
    behind = (epoch * old_nb + done - 1) - last  # iterations since the last step, at the saved batch
    return epoch * nb + skip - 1 - round(behind * nb / old_nb)


def _collective_device(trainer: Any) -> Any:
    import torch.distributed as dist

    return trainer.device if dist.get_backend() == "nccl" else "cpu"
