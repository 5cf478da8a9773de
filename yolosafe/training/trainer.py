"""yolosafe's Ultralytics trainers: the task trainers with the changes that callbacks alone cannot make.

Each change is one small mixin overriding one Ultralytics detail (training.compat checks that each detail still holds);
:func:`trainer_class` composes them over a task's trainer, bound to the process's run context
(:class:`yolosafe.training.context.RunContext`), in a single process and in every DDP rank alike.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ultralytics.engine.trainer import BaseTrainer
from ultralytics.models.yolo.model import YOLO

from yolosafe import bench, gpus
from yolosafe.rundir import files as rundir
from yolosafe.training import callbacks, cutbars, durable, heartbeat, offline, peakmetrics, stepckpt, valretry
from yolosafe.training import failure as failurerecord
from yolosafe.training.context import RunContext
from yolosafe.training.fake import cpuranks
from yolosafe.training.scoped import replaced

# Ultralytics' trainer of each task it trains (detect, segment, pose, obb, classify, semantic, depth, ...): its own
# task map, which YOLO.task_map builds without reading the instance.
TRAINERS: Mapping[str, type[BaseTrainer]] = MappingProxyType(
    {task: classes["trainer"] for task, classes in YOLO.task_map.fget(None).items()})


class _InContext:
    """What the mixins read: the process's run context, bound to the trainer class by :func:`trainer_class`."""

    run_context: RunContext


class LauncherWorldSize(_InContext):
    """``__init__``: yolosafe launches the DDP ranks itself (:mod:`yolosafe.supervisor.launchcmd`). In a rank the
    world size is the
    launcher's, never Ultralytics' count of the device string, and the trainer never launches ranks of its own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ddp = False  # Ultralytics' own launch (temp file, pickled trainer) is never used
        if self.run_context.rank.distributed:
            self.world_size = self.run_context.rank.world_size


class ValidationBatch(_InContext):
    """``get_dataloader(mode="val")``: ``--val-batch`` really sets the validation batch. Ultralytics builds the
    validation loader with twice the per-GPU train batch, and the final validation of best.pt reuses that loader;
    this is the one place both come from (a validation OOM recovered in place keeps this loader, and its shards:
    :mod:`yolosafe.training.valretry`)."""

    def get_dataloader(self, dataset_path: str, batch_size: int = 16, rank: int = 0, mode: str = "train") -> Any:
        if mode == "val":
            batch_size = self.run_context.spec.val_batch
        return super().get_dataloader(dataset_path, batch_size=batch_size, rank=rank, mode=mode)


class OomInjectionPoint(_InContext):
    """``preprocess_batch``: the training step's injection point (``YOLOSAFE_INJECT_OOM``), inside the try block
    where a real OOM surfaces and Ultralytics' own handler looks, so tests prove its in-process halving stays off."""

    def preprocess_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        callbacks.maybe_inject(self.run_context, "train")
        return super().preprocess_batch(batch)


class HangPoints(_InContext):
    """``preprocess_batch``, ``save_model``: where a hang is injected in a training step and in the epoch's
    checkpoint save (``YOLOSAFE_INJECT_HANG``, :mod:`yolosafe.training.heartbeat`; not in the save of the state kept
    before validation, ``weights/unvalidated.pt``), and the beat that says rank 0 is writing checkpoints (a save has
    no callback before it; the next beat is ``on_fit_epoch_end``'s or the validation's); ``final_eval``: the end of
    training (what follows, rank 0's plots, beats nothing)."""

    def preprocess_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        heartbeat.maybe_hang(self.run_context, "train")
        return super().preprocess_batch(batch)

    def save_model(self) -> bool:
        heartbeat.beat(self.run_context, "save")
        if self.last.name == rundir.LAST:  # the epoch's save: not unvalidated.pt's, not a step checkpoint's
            heartbeat.maybe_hang(self.run_context, "save")
        return super().save_model()

    def final_eval(self) -> None:
        super().final_eval()
        heartbeat.beat(self.run_context, "end")  # rank 0's plots and the loaders' teardown beat nothing


class FailureRecord(_InContext):
    """``_do_train``: a rank that fails writes its failure record (:mod:`yolosafe.training.failure`) before it dies, so
    the supervisor can tell an OOM on rank 3 from the NCCL errors it causes on ranks 0-2; the progress bar the failure
    cut short goes to train.log only (:mod:`yolosafe.training.cutbars`): the relaunch's bars follow, not a dead one."""

    def _do_train(self) -> None:
        try:
            super()._do_train()
        except BaseException as exc:
            batch = self.batch_size // max(self.world_size, 1)
            failurerecord.write_failure(self.run_context, exc, batch, self.device)
            cutbars.cut_short(exc)
            raise


class AtomicCheckpoints:
    """``save_model``: Ultralytics writes last.pt/best.pt in place, so a rank killed mid-write (SIGKILL, the host's
    OOM killer) would leave the very checkpoint a retry resumes from truncated. Written beside, then renamed: all or
    nothing. A save that fails (a full disk, a stop) removes what it had written: the last good checkpoints stay,
    and the space their partial copies took is free again for the records of the failure. The checkpoint a retry
    reads is fsynced and renamed beside the training (:class:`yolosafe.training.durable.Pending`): the next save,
    the final evaluation and the end of training wait for it; what a new checkpoint supersedes goes once it is in
    place (:meth:`when_durable`)."""

    _durable: durable.Pending | None = None

    def save_model(self) -> bool:
        if bench.bench_off("checkpoint"):
            return super().save_model()
        self.checkpoints_durable()  # one at a time, in order: the previous save's rename before this one's
        final = {"last": self.last, "best": self.best}
        partial = {name: path.with_name(f".{path.name}.partial") for name, path in final.items()}
        for path in partial.values():  # a killed rank's leftover: promote only what this save writes
            path.unlink(missing_ok=True)
        self.last, self.best = partial["last"], partial["best"]
        try:
            saved = super().save_model()
        except BaseException:
            for path in partial.values():
                path.unlink(missing_ok=True)
            raise
        finally:
            self.last, self.best = final["last"], final["best"]
        try:
            if partial["best"].exists():
                durable.durable_replace(partial["best"], final["best"], sync=False)
        finally:
            partial["best"].unlink(missing_ok=True)
        if partial["last"].exists():
            self._durable = durable.Pending(partial["last"], final["last"])
        return saved

    def when_durable(self, action: Callable[[], None]) -> None:
        """``action`` (removing what the newest checkpoint supersedes) once that checkpoint is in place."""
        pending = self._durable
        if pending is None:
            action()
        else:
            pending.then(action)

    def checkpoints_durable(self, raise_error: bool = True) -> None:
        """Until the newest checkpoint is on disk and in place; the error of its sync (a full disk) raised here."""
        pending, self._durable = self._durable, None
        if pending is not None:
            pending.wait(raise_error)

    def final_eval(self) -> None:
        """Ultralytics' final evaluation strips last.pt and best.pt in place: one the supervisor kept by a hard link
        (``last-before-attemptN.pt``) is made a file of its own first, so the kept checkpoint stays as it was."""
        from ultralytics.utils import RANK

        self.checkpoints_durable()
        if RANK in {-1, 0} and not bench.bench_off("checkpoint"):
            for path in (self.last, self.best):
                unlink_shared(path)
        super().final_eval()

    def _do_train(self) -> None:
        try:
            super()._do_train()
        except BaseException:
            self.checkpoints_durable(raise_error=False)  # the failure in flight is the one to say
            raise
        self.checkpoints_durable()


def unlink_shared(path: Path) -> None:
    """``path`` as a file of its own when it shares its data with another name (a hard link), so writing it in
    place leaves the other name's data untouched."""
    try:
        if path.stat().st_nlink < 2:
            return
    except FileNotFoundError:
        return
    partial = path.with_name(f".{path.name}.partial")
    try:
        shutil.copy2(path, partial)
        durable.durable_replace(partial, path, sync=True)
    finally:
        partial.unlink(missing_ok=True)


class ResumeNbs:
    """``check_resume``: Ultralytics resumes with the checkpoint's ``nbs`` and ``weight_decay``; a retry at half the
    batch passes the ones that keep the first attempt's step and weight decay
    (:meth:`yolosafe.planning.trainplan.TrainPlan.ultralytics_args`), a resume with another ``--effective-batch``
    its own: they must win."""

    OWN = ("nbs", "weight_decay")

    def check_resume(self, overrides: dict[str, Any]) -> None:
        own = {k: overrides[k] for k in self.OWN if overrides.get(k) is not None}
        super().check_resume({k: v for k, v in overrides.items() if k not in self.OWN})
        if self.resume:
            for key, value in own.items():
                setattr(self.args, key, value)


class EpochPeakMetrics(_InContext):
    """``validate``, ``save_metrics``: each epoch's torch memory peaks of every GPU go into Ultralytics' metrics
    (results.csv, its loggers), where users already look: :mod:`yolosafe.training.peakmetrics`."""

    def validate(self) -> tuple[Any, Any]:
        metrics, fitness = super().validate()
        if bench.bench_off("peaks"):
            return metrics, fitness
        peaks = peakmetrics.epoch_peaks(self, self.run_context)  # every rank takes part: it gathers every GPU's
        return (None if metrics is None else {**metrics, **peaks}), fitness

    def save_metrics(self, metrics: dict[str, Any]) -> None:
        super().save_metrics(metrics if bench.bench_off("peaks") else peakmetrics.ordered(metrics, self.run_context))


class FinalValidationMarked(_InContext):
    """``final_eval``: the validation of best.pt after the last epoch is marked in the progress, so its events and
    failure records say ``final`` (an OOM there re-runs only that validation)."""

    def final_eval(self) -> None:
        self.run_context.progress.final = True
        super().final_eval()


class InPlaceValidationRetry(_InContext):
    """``get_validator``: the validator catches an OOM inside its validation loop and validates this rank's shard
    again at half the batch, in place (:mod:`yolosafe.training.valretry`); off with ``--val-oom relaunch``."""

    def get_validator(self) -> Any:
        validator = super().get_validator()
        if self.run_context.spec.val_oom != valretry.IN_PLACE:
            return validator
        return valretry.retrying(validator, self, self.run_context)


class ValidateFirst(_InContext):
    """``validate``, ``save_model``, ``resume_training``, ``_setup_train``, ``_do_train``: no epoch is trained twice
    after a validation OOM that needed a relaunch. Rank 0 keeps each epoch's trained state right before its
    validation (``weights/unvalidated.pt``, gone once the epoch's last.pt is written) where it is worth its save
    (:meth:`~yolosafe.planning.saveevery.SaveEvery.keeps_unvalidated`: under ``--save-every auto``, an epoch shorter
    than 200 saves is trained again instead, every save of it timed); a run resumed from it validates
    that epoch first, then trains on from the next (or, after the last epoch, runs only the final validation).
    Off with ``--val-oom relaunch``. Inside :class:`FailureRecord`: its end of the run is no failure."""

    validation_pending: dict[str, Any] | None = None
    _newest_save_at: float | None = None  # time.monotonic() when the newest checkpoint was written (None: none yet)
    _newest_save_s: float | None = None  # how long it took (every save: the epoch's, a step's, unvalidated.pt's)

    def validate(self) -> tuple[Any, Any]:
        if (self.run_context.rank.leads and self.run_context.spec.val_oom == valretry.IN_PLACE
                and self.validation_pending is None and self._keeps_unvalidated()):
            valretry.save_unvalidated(self)
            callbacks.append_event(self.run_context, "unvalidated_saved", self,
                                   seconds=round(self._newest_save_s or 0.0, 4))
        return super().validate()

    def _keeps_unvalidated(self) -> bool:
        at = self._newest_save_at
        trained = time.monotonic() - at if at is not None else 0.0  # no save yet: none timed, kept
        return self.run_context.save_every.keeps_unvalidated(trained, self._newest_save_s)

    def save_model(self) -> bool:
        started = time.monotonic()
        saved = super().save_model()
        self._newest_save_at = time.monotonic()
        self._newest_save_s = self._newest_save_at - started
        if self.last.name == rundir.LAST:  # this epoch is validated and kept: the unvalidated state is old
            self.when_durable(lambda: (self.wdir / valretry.UNVALIDATED).unlink(missing_ok=True))
        return saved

    def resume_training(self, ckpt: Any) -> None:
        mark = valretry.pending(ckpt) if self.resume else None
        if mark is None:
            return super().resume_training(ckpt)
        self.validation_pending, epochs = mark, self.epochs
        self.epochs = max(epochs, int(mark["epoch"]) + 2)  # Ultralytics refuses to resume after the last epoch
        try:
            super().resume_training(ckpt)
        finally:
            self.epochs = epochs

    def _setup_train(self) -> None:
        super()._setup_train()
        if self.validation_pending is not None:
            valretry.validate_pending(self, self.validation_pending)
            self.validation_pending = None

    def _do_train(self) -> None:
        try:
            super()._do_train()
        except valretry.TrainingDone:
            self.validation_pending = None
            valretry.finish(self)


class AmpCheckOffline:
    """``_setup_train``: the AMP check rank 0 runs there never waits on the network of an offline machine
    (:mod:`yolosafe.training.offline`): Ultralytics' ``check_amp`` when its weights are on disk or Ultralytics says
    it is online, else its own offline answer without the download. :meth:`amp_check` is what ``_setup_train`` calls
    (the fake GPUs' CPU ranks answer as a GPU decides: :class:`yolosafe.training.fake.cpuranks.AmpCheckAsOnAGpu`)."""

    def _setup_train(self) -> None:
        from ultralytics.engine import trainer as engine

        with replaced(engine, "check_amp", self.amp_check):
            super()._setup_train()  # type: ignore[misc]

    def amp_check(self, model: Any) -> bool:
        return offline.check_amp(model)


MIXINS = (LauncherWorldSize, stepckpt.StepCheckpoints, AmpCheckOffline, ValidationBatch, InPlaceValidationRetry,
          OomInjectionPoint, HangPoints, FailureRecord, ValidateFirst, AtomicCheckpoints, ResumeNbs, EpochPeakMetrics,
          FinalValidationMarked)


def trainer_class(task: str, context: RunContext, base: type[BaseTrainer] | None = None) -> type[BaseTrainer]:
    """yolosafe's trainer for ``task`` in this process: :data:`MIXINS` over Ultralytics' task trainer, bound to
    ``context`` (a class per process is safe: yolosafe launches the ranks itself, nothing pickles it). In a CPU rank
    of fake GPUs the changes that run Ultralytics' DDP path on the CPU go in front
    (:mod:`yolosafe.training.fake.cpuranks`). ``base``: the loaded model's own trainer (its task map: RT-DETR's,
    YOLO-World's), else :data:`TRAINERS`'s."""
    base = base or TRAINERS[task]
    cpu_ranks = context.spec.fake_gpus and context.rank.distributed
    if cpu_ranks and gpus.blocking_collectives(os.environ):  # inside the failure record: a waiting peer writes none
        base = cpuranks.blocking(base)
    trainer = type(f"Safe{base.__name__}", (*MIXINS, base), {"run_context": context})
    if context.spec.fake_gpus:
        trainer = cpuranks.amp_as_on_a_gpu(trainer)
    return cpuranks.on_cpu(trainer) if cpu_ranks else trainer
