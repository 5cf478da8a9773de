"""Train-arg building: from what the user asked for to the exact ``model.train(**kwargs)`` of Ultralytics.

Pure functions, no torch: the numbers that decide whether a run fits in memory are worked out and checked here,
before any process touches a GPU.

Ultralytics has no ``accumulate`` argument: it accumulates ``round(nbs / batch)`` steps, where ``batch`` is the total
batch over all GPUs, and scales the weight decay by ``batch × accumulate / nbs``. The first attempt passes the
``nbs`` of the user's command (``--effective-batch``/``nbs=``, else Ultralytics' own default): the optimizer, the
accumulation and ``args.yaml`` are those of ``yolo train`` with the same arguments. When a retry halves the batch,
that ``nbs`` would give another step (``round(nbs / batch)`` rounds differently) and another weight decay; the halved
attempt passes instead, as Ultralytics' own arguments, ``nbs`` = the first attempt's images per optimizer step
(the accumulation doubles) and the ``weight_decay`` that Ultralytics' scaling turns into the first attempt's
(:meth:`TrainPlan.ultralytics_args`).
Ultralytics also caps that at the run's iterations and ramps it up from 1 during warm-up:
:mod:`yolosafe.planning.accumulation`
has its formula (guarded against its source by ``yolosafe.training.compat``), so the dry run shows what really runs.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from yolosafe.errors import UsageError
from yolosafe.planning import yolowords
from yolosafe.planning.accumulation import (
    ULTRALYTICS_DEFAULT_NBS,
    ULTRALYTICS_DEFAULT_WARMUP_EPOCHS,
    batches_per_epoch,
    nominal_accumulate,
    warmup_iterations,
)

# Train arguments yolosafe owns: set through its own options, never as pass-through key=value.
OWNED_KEYS = MappingProxyType({
    "batch": "--batch",
    "nbs": "--effective-batch",
    "device": "--gpus",
    "data": "--data",
    "model": "--model",
    "epochs": "--epochs",
    "imgsz": "--imgsz",
    "project": "--project",
    "name": "--name",
    "exist_ok": "--project/--name (yolosafe never overwrites a run)",
    "resume": "--resume RUN_DIR",
    "mode": "the yolosafe subcommand",
    "task": "--model (the task follows the model)",
})


class PlanError(UsageError):
    """A usage error in the training request; ``str()`` is one line for the user."""


@dataclass(frozen=True)
class TrainPlan:
    """Everything that decides the memory of a run, resolved and checked."""

    model: str
    data: str
    gpus: tuple[int, ...]  # () means CPU
    batch: int  # total over all GPUs, Ultralytics' ``batch``
    effective_batch: int  # images per optimizer step asked for (``--effective-batch``; default what nbs=64 gives)
    val_batch: int  # per GPU, the batch of every validation forward pass
    imgsz: int
    epochs: int
    extra: dict[str, Any] = field(default_factory=dict)  # checked Ultralytics pass-through args
    train_images: int | None = None  # the training split's size, when known: it caps and times the accumulation
    nnodes: int = 1  # machines, each with these GPUs (--nnodes); ``batch`` is the total over all of them
    nbs: int | None = None  # the ``nbs`` of the user's command (None: ``effective_batch``)
    first_batch: int | None = None  # the first attempt's ``batch``, kept by :meth:`halved` (None: ``batch``)

    @property
    def device(self) -> str:
        return ",".join(map(str, self.gpus)) if self.gpus else "cpu"

    @property
    def world_size(self) -> int:
        """Ranks over all nodes: Ultralytics divides ``batch`` by this in every rank."""
        return self.nnodes * self.local_world_size

    @property
    def local_world_size(self) -> int:
        """Ranks on this machine (one per GPU of ``gpus``)."""
        return max(len(self.gpus), 1)

    @property
    def per_gpu_batch(self) -> int:
        return self.batch // self.world_size

    @property
    def batches_per_epoch(self) -> int | None:
        """``len(train_loader)`` on each rank, when the dataset size is known (``fraction=`` not worked out)."""
        if self.train_images is None or self.extra.get("fraction", 1.0) != 1.0:
            return None
        return batches_per_epoch(self.train_images, self.per_gpu_batch, self.world_size)

    @property
    def accumulate(self) -> int:
        """The accumulation after warm-up, capped like Ultralytics caps it (when the dataset size is known)."""
        nb = self.batches_per_epoch
        iterations = None if nb is None or self.extra.get("time") else nb * self.epochs
        return nominal_accumulate(self.ultralytics_args()["nbs"], self.batch, iterations)

    @property
    def user_nbs(self) -> int:
        """Ultralytics' ``nbs`` for the user's command."""
        return self.nbs or self.effective_batch

    @property
    def first_step(self) -> int:
        """Images per optimizer step of the first attempt, as Ultralytics computes it (before the cap at the run's
        iterations, as its weight-decay scaling is): ``first_batch × round(nbs / first_batch)``."""
        first = self.first_batch or self.batch
        return first * nominal_accumulate(self.user_nbs, first)

    def ultralytics_args(self) -> dict[str, Any]:
        """``nbs`` (and, after a halving, ``weight_decay``) for ``model.train()``: the user's ``nbs`` while it gives
        the first attempt's step at this batch; else the first attempt's step as ``nbs``, and the weight decay that
        Ultralytics' ``weight_decay × batch × accumulate / nbs`` turns into the first attempt's
        ``weight_decay × first_step / user_nbs``."""
        nbs = self.user_nbs
        if self.batch * nominal_accumulate(nbs, self.batch) == self.first_step:
            return {"nbs": nbs}
        step = self.first_step
        decay = float(self.extra.get("weight_decay", ultralytics_default("weight_decay")))
        scale = step / (self.batch * nominal_accumulate(step, self.batch))
        return {"nbs": step, "weight_decay": decay * step / nbs * scale}

    @property
    def warmup_iterations(self) -> int | None:
        """The iterations over which Ultralytics ramps the accumulation from 1 up to :attr:`accumulate`."""
        nb = self.batches_per_epoch
        warmup = float(self.extra.get("warmup_epochs", ULTRALYTICS_DEFAULT_WARMUP_EPOCHS))
        return None if nb is None else warmup_iterations(warmup, self.epochs, nb)

    @property
    def real_effective_batch(self) -> int:
        """The batch per optimizer step that really runs (differs from ``nbs`` when it is not a multiple)."""
        return self.batch * self.accumulate

    def train_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``YOLO(model).train()`` (project/name are added by the supervisor)."""
        return {
            **self.extra,
            "data": self.data,
            "epochs": self.epochs,
            "imgsz": self.imgsz,
            "batch": self.batch,
            **self.ultralytics_args(),
            "device": self.device,
        }

    def halved(self, min_per_gpu: int = 1) -> TrainPlan | None:
        """The plan with half the per-GPU batch and the same effective batch, or None below ``min_per_gpu``."""
        per_gpu = self.per_gpu_batch // 2
        if per_gpu < max(min_per_gpu, 1):
            return None
        return replace(self, batch=per_gpu * self.world_size, first_batch=self.first_batch or self.batch)

    def with_val_batch(self, val_batch: int) -> TrainPlan:
        return replace(self, val_batch=val_batch)

    def summary(self) -> dict[str, Any]:
        """What the dry run prints and yolosafe.json records."""
        return {
            **asdict(self),
            "gpus": list(self.gpus),
            "device": self.device,
            "per_gpu_batch": self.per_gpu_batch,
            "accumulate": self.accumulate,
            "real_effective_batch": self.real_effective_batch,
            "warmup_iterations": self.warmup_iterations,
        }


@functools.cache
def ultralytics_defaults() -> MappingProxyType[str, Any]:
    """Ultralytics' own default config (``DEFAULT_CFG_DICT``), read from its YAML without importing ultralytics."""
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or not spec.submodule_search_locations:
        raise PlanError("ultralytics is not installed: pip install -c constraints.txt -e .")
    path = Path(next(iter(spec.submodule_search_locations))) / "cfg" / "default.yaml"
    return MappingProxyType(yaml.safe_load(path.read_text()))


def ultralytics_train_keys() -> frozenset[str]:
    """The argument names of Ultralytics' own default config."""
    return frozenset(ultralytics_defaults())


def ultralytics_default(key: str) -> Any:
    """Ultralytics' default value of one train argument (``weight_decay``: 0.0005)."""
    return ultralytics_defaults()[key]


def read_words(items: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """The words of a ``yolo train`` command as Ultralytics' CLI types them (:mod:`yolosafe.planning.yolowords`):
    ``key=value`` pairs, bare flags, task and mode words, its spacing; and the notes it would warn."""
    try:
        return yolowords.parse(items, ultralytics_defaults())
    except yolowords.WordError as exc:
        raise PlanError(str(exc)) from None


def parse_passthrough(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` words to a dict, values typed the way Ultralytics' own CLI types them."""
    return read_words(items)[0]


def check_passthrough(args: Mapping[str, Any]) -> dict[str, Any]:
    """Reject keys Ultralytics does not know (``accumulate=4``, ``epoch=3``) and keys yolosafe owns."""
    import difflib

    known = ultralytics_train_keys()
    for key in args:
        if key in OWNED_KEYS:
            raise PlanError(f"'{key}' is set by yolosafe: use {OWNED_KEYS[key]}")
        if key not in known:
            hint = difflib.get_close_matches(key, sorted(known), n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            if key == "accumulate":
                extra = " (accumulation is round(nbs / batch): use --effective-batch)"
            raise PlanError(f"'{key}' is not an Ultralytics train argument{extra}")
    return dict(args)


def default_effective_batch(batch: int) -> int:
    """What Ultralytics really runs with its default ``nbs=64``: ``batch × round(64 / batch)``."""
    return batch * max(round(ULTRALYTICS_DEFAULT_NBS / batch), 1)


def _check_split(batch: int, gpus: int, nnodes: int) -> int:
    """The world size (ranks over every node); a batch that does not split evenly over it is a usage error."""
    world = max(gpus, 1) * nnodes
    if batch % world:
        lower, upper = batch // world * world, (batch // world + 1) * world
        options = " or ".join(str(b) for b in (lower, upper) if b > 0)
        over = f"{nnodes} nodes x {gpus} GPUs" if nnodes > 1 else f"{world} GPUs"
        raise PlanError(f"--batch {batch} does not split evenly over {over}; use a multiple of {world}: {options}")
    return world


def build_plan(
    *,
    model: str,
    data: str,
    gpus: tuple[int, ...],
    batch: int,
    effective_batch: int | None = None,
    val_batch: int | None = None,
    imgsz: int = 640,
    epochs: int = 100,
    extra: Mapping[str, Any] | None = None,
    train_images: int | None = None,
    nnodes: int = 1,
    first_batch: int | None = None,
) -> TrainPlan:
    """Resolve and check a training request. Raises :class:`PlanError` with one line for the user.

    ``batch`` is the total over every GPU of every node (``nnodes`` machines with ``gpus`` each);
    ``first_batch``, a halved plan's first attempt's batch."""
    for name, value in (("--batch", batch), ("--imgsz", imgsz), ("--epochs", epochs)):
        if value < 1:
            raise PlanError(f"{name} {value}: must be at least 1")
    world = _check_split(batch, len(gpus), nnodes)
    nbs = effective_batch or ULTRALYTICS_DEFAULT_NBS  # the user's nbs, else Ultralytics' default (64)
    if effective_batch is None:
        effective_batch = default_effective_batch(batch)
    if effective_batch < batch:
        raise PlanError(
            f"--effective-batch {effective_batch} is smaller than --batch {batch}: accumulation would be 1 and a "
            f"smaller batch after an OOM would change the effective batch; use --effective-batch {batch} or more"
        )
    per_gpu = batch // world
    if val_batch is None:
        val_batch = per_gpu  # Ultralytics uses 2x the train batch: the classic validation OOM
    if val_batch < 1:
        raise PlanError(f"--val-batch {val_batch}: must be at least 1")
    return TrainPlan(
        model=model,
        data=data,
        gpus=tuple(gpus),
        batch=batch,
        effective_batch=effective_batch,
        val_batch=val_batch,
        imgsz=imgsz,
        epochs=epochs,
        extra=check_passthrough(extra or {}),
        train_images=train_images,
        nnodes=nnodes,
        nbs=nbs,
        first_batch=first_batch if first_batch not in (None, batch) else None,
    )


def plan_warnings(plan: TrainPlan) -> list[str]:
    """Things that are allowed but probably not what the user meant."""
    if plan.real_effective_batch == plan.effective_batch:
        return []
    if plan.nbs == ULTRALYTICS_DEFAULT_NBS and plan.effective_batch == default_effective_batch(
            plan.first_batch or plan.batch):
        return []  # yolo train's own default on a small set: Ultralytics does the same, and says nothing
    why = "is not a multiple of" if plan.effective_batch % plan.batch else "is more than the run's iterations of"
    steps = f"{plan.accumulate} step{'s' if plan.accumulate != 1 else ''}"
    return [f"effective batch {plan.effective_batch} {why} batch {plan.batch}: Ultralytics will accumulate "
            f"{steps}, an effective batch of {plan.real_effective_batch}"]


def replan(summary: Mapping[str, Any], **changes: Any) -> TrainPlan:
    """A recorded plan (:meth:`TrainPlan.summary`, as ``yolosafe.json`` holds it) built again through
    :func:`build_plan`, with ``changes`` (``gpus``, ``batch``, ``effective_batch``, ``val_batch``, ``model``, ``extra``,
    ``nnodes``; ``None`` means what :func:`build_plan` makes of None) instead of the recorded values: a resume,
    ``fix`` and ``doctor`` get the same plan, dataset size included, as the new run they continue. Raises
    :class:`PlanError`, ``KeyError`` or ``TypeError`` for a recorded plan that is not one."""
    names = ("model", "data", "gpus", "batch", "effective_batch", "val_batch", "imgsz", "epochs", "extra",
             "train_images", "nnodes", "first_batch")
    values = {name: summary.get(name) for name in names} | changes
    if "batch" in changes:  # a new batch is a new first attempt
        values["first_batch"] = None
    first = summary.get("first_batch") or summary.get("batch")
    if ("effective_batch" not in changes and summary.get("nbs") == ULTRALYTICS_DEFAULT_NBS and isinstance(first, int)
            and summary.get("effective_batch") == default_effective_batch(first)):
        values["effective_batch"] = None  # the default, worked out again for the (new) batch
    values["gpus"] = tuple(values["gpus"] or ())
    values["extra"] = dict(values["extra"] or {})
    values["nnodes"] = int(values["nnodes"] or 1)
    for name in ("model", "data"):
        values[name] = str(values[name])
    return build_plan(**values)


def describe_accumulation(plan: TrainPlan) -> str:
    """The dry run's line: the accumulation that really runs, cap and warm-up ramp included."""
    nb, warmup = plan.batches_per_epoch, plan.warmup_iterations
    if nb is None:
        return f"at most {plan.accumulate}, ramped up from 1 during warm-up (dataset size unknown)"
    ramp = f"ramped 1 -> {plan.accumulate} over its first {warmup} (warm-up)" if warmup else "no warm-up ramp"
    return f"{plan.accumulate}, at most the run's {nb * plan.epochs} iterations ({nb} per epoch); {ramp}"
