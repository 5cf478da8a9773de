"""``yolosafe train``'s options resolved once into one typed object, :class:`TrainOptions`.

Its first fields are :data:`yolosafe.planning.options.DEFAULTS`' keys, with their defaults taken from there; the
others are what the steps before a run learn about it (the dataset's YAML, Ultralytics' task and runs' folder, the
training images, the nodes). A later step sets them with :func:`dataclasses.replace`. Values from a ``--config`` file
arrive untyped: :func:`yolosafe.planning.validate.check_options` checks them, in the order a new run checks its input.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from yolosafe.planning.options import DEFAULTS, HANG_KEYS, WATCH_KEYS
from yolosafe.planning.validate import InputError
from yolosafe.rundir import records

RUN_KEYS = ("max_retries", "min_batch", *WATCH_KEYS, *HANG_KEYS, "save_every")  # shapes the attempts, in the story


def _default(key: str) -> Any:
    """The field's default: :data:`DEFAULTS`' value (a fresh copy of a list)."""
    return field(default_factory=lambda: copy.deepcopy(DEFAULTS[key]))


@dataclass(frozen=True)
class TrainOptions:
    """Every option of one run, resolved: the flags over ``--config`` over the dataset's defaults over DEFAULTS."""

    model: str | None = _default("model")  # weights or a model YAML; trainrun.resolve picks the default model
    data: str = _default("data")  # the dataset as given: a name in datasets.yaml, a YAML path, or shapes
    gpus: str | None = _default("gpus")  # '0,1', 'all', 'cpu', 'auto[:N]' (ids once planner.resolve_auto chose)
    batch: int | str = _default("batch")  # the total over all GPUs, or 'auto' until planner.resolve_auto sizes it
    effective_batch: int | None = _default("effective_batch")  # images per optimizer step (Ultralytics' nbs)
    val_batch: int | None = _default("val_batch")  # the validation batch per GPU
    imgsz: int = _default("imgsz")  # the image size
    epochs: int = _default("epochs")  # the epochs to train
    alloc_conf: str | None = _default("alloc_conf")  # PYTORCH_CUDA_ALLOC_CONF items merged over the default
    project: str = _default("project")  # the runs' parent folder; Ultralytics' own for the task once it checked
    task: str | None = _default("task")  # the model's task (detect, segment...), Ultralytics' once it checked
    download: bool = _default("download")  # let Ultralytics fetch the data and the weights before training
    name: str = _default("name")  # the run's folder name inside the project
    max_retries: int = _default("max_retries")  # relaunches after an OOM
    min_batch: int = _default("min_batch")  # the per-GPU batch an OOM never halves below
    watch_interval: float = _default("watch_interval")  # seconds between memory samples; 0 turns the watch off
    warn_at: float = _default("warn_at")  # the share of a GPU's memory that prints a warning
    clear_before_val: bool = _default("clear_before_val")  # empty the CUDA cache on every rank before validation
    save_every: str = _default("save_every")  # the step checkpoint inside the epoch (planning/saveevery.py)
    val_oom: str = _default("val_oom")  # a validation OOM: 'in-place' or 'relaunch'
    hang_timeout: float | None = _default("hang_timeout")  # None: learnt; 0: no hang watch
    max_hang_restarts: int = _default("max_hang_restarts")  # relaunches after a hang
    memory_fraction: float = _default("memory_fraction")  # --batch auto: the share of free GPU memory to fill
    args: Sequence[str] = _default("args")  # Ultralytics key=value train arguments
    data_yaml: str | None = None  # the dataset's YAML (datasets.resolve)
    dataset_name: str | None = None  # the dataset's name in the registry (or the YAML's)
    data_hint: str | None = None  # what to say when Ultralytics cannot read the dataset
    named: bool = False  # the user named the run (flag or config): a live run of that name is refused
    differences: tuple[str, ...] = ()  # where yolosafe does what yolo would not (exist_ok, its default model): said
    user_code: dict[str, Any] | None = None  # the user's callbacks and trainer class for every rank (usercode.refs)
    nnodes: int = 1  # machines in the run: the batch is the total over every node's GPUs
    train_images: int | None = None  # the training images as Ultralytics counts them, once it checked
    dataset_figures: dict[str, Any] | None = None  # the dataset's label figures Ultralytics' check measured
    command: list[str] | None = None  # the call that started the run (None: this process's command line)

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> TrainOptions:
        """The options of the merged mapping ``values``; a key that is no field is refused in one line."""
        names = field_names()
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise InputError(f"unknown option(s) {', '.join(map(str, unknown))}; allowed: {', '.join(names)}")
        return cls(**values)

    @classmethod
    def from_story(cls, story: records.Story) -> TrainOptions:
        """The options ``yolosafe.json`` records (:meth:`to_story`), DEFAULTS' where it holds none (the run's plan
        is the story's ``plan``; the other fields keep their defaults)."""
        dataset = story.dataset if isinstance(story.dataset, dict) else {}
        values = {key: getattr(story, key) for key in RUN_KEYS if getattr(story, key) is not None}
        return cls(**values, command=story.command, dataset_name=dataset.get("name"), data_yaml=dataset.get("yaml"))

    def to_story(self) -> dict[str, Any]:
        """What ``yolosafe.json`` records of the options (``records.Story``'s fields of that name)."""
        return {
            "command": list(self.command or sys.argv),
            "dataset": {"name": self.dataset_name, "yaml": self.data_yaml},
            **{key: getattr(self, key) for key in RUN_KEYS},
        }

    def as_dict(self) -> dict[str, Any]:
        """Every field by name; :meth:`of` reads it back as the same options."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> TrainOptions:
        """These options with ``changes`` (a later step's: the task, the project, the chosen GPUs and batch...)."""
        return dataclasses.replace(self, **changes)


def field_names() -> tuple[str, ...]:
    """The fields' names: DEFAULTS' keys, then the resolved ones."""
    return tuple(f.name for f in dataclasses.fields(TrainOptions))


DERIVED = tuple(name for name in field_names() if name not in DEFAULTS)  # the fields resolving adds


def check_watch(options: TrainOptions) -> None:
    """--watch-interval 0 turns the watch off; faster than 100 Hz buys nothing and costs CPU."""
    try:
        interval, warn_at = float(options.watch_interval), float(options.warn_at)
    except (TypeError, ValueError):
        raise InputError(f"watch-interval {options.watch_interval!r} / warn-at {options.warn_at!r}: "
                         "expected numbers") from None
    if interval != 0 and not 0.01 <= interval <= 60:
        raise InputError(f"--watch-interval {interval:g}: give seconds between 0.01 and 60, or 0 to turn the memory "
                         "watch off")
    if not 0 < warn_at <= 1:
        raise InputError(f"--warn-at {warn_at:g}: give a share of GPU memory above 0 and at most 1 (e.g. 0.9)")


def check_hangs(options: TrainOptions) -> None:
    """--hang-timeout: seconds (0 = no hang watch); --max-hang-restarts: a count."""
    timeout, restarts = options.hang_timeout, options.max_hang_restarts
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0):
        raise InputError(f"--hang-timeout {timeout!r}: give seconds without progress (e.g. 600), or 0 to turn the "
                         "hang watch off")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
        raise InputError(f"--max-hang-restarts {restarts!r}: give a whole number >= 0")


IMGSZ_MAX = 16384  # pixels a side: one 16384x16384 image is 3 GiB as a float tensor; past it nothing trains
COUNT_MAX = 1 << 24  # batches, epochs, retries: a number past this is a typo (10**30 overflows a C integer)


def check_ranges(options: TrainOptions, per_gpu_batch: int | None = None) -> None:
    """The upper bounds of yolosafe's whole-number options (their lower bounds and types: ``validate.check_options``),
    and ``--min-batch`` within the per-GPU batch it may never be halved below, before a run directory exists."""
    for key in ("batch", "effective_batch", "val_batch", "imgsz", "epochs", "max_retries", "min_batch"):
        value = getattr(options, key)
        if not isinstance(value, int) or isinstance(value, bool):
            continue  # "auto", or a wrong type: said by the type checks
        limit = IMGSZ_MAX if key == "imgsz" else COUNT_MAX
        if value > limit:
            shown = str(value) if len(str(value)) <= 20 else f"{str(value)[:12]}... ({len(str(value))} digits)"
            raise InputError(f"--{key.replace('_', '-')} {shown}: at most {limit}")
    min_batch = options.min_batch
    if per_gpu_batch is not None and isinstance(min_batch, int) and min_batch > per_gpu_batch:
        raise InputError(f"--min-batch {min_batch}: more than the per-GPU batch {per_gpu_batch}, which it is a floor "
                         f"of; give at most {per_gpu_batch}")
