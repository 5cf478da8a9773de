"""``yolosafe train``'s options parsed once into one typed object, :class:`TrainOptions`.

Its first fields are :data:`yolosafe.planning.options.DEFAULTS`' keys, with their defaults taken from there; the
others are what the steps before a run learn about it (the dataset's YAML, Ultralytics' task and runs' folder, the
training images, the nodes). Building one parses every field into its real type (:data:`PARSERS`: a whole number, a
share, seconds, a :class:`~yolosafe.planning.saveevery.SaveEvery`...) and refuses what is out of range in one line,
whether the value came from a flag, a ``--config`` file (untyped YAML), a Python keyword or a ``yolo`` word: parse,
don't validate. A later step sets fields with :meth:`TrainOptions.replace`, which parses them again; the checks after
it (:func:`check_min_batch`, the plan's) take a ``TrainOptions`` and never see a raw value.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from yolosafe.planning import inputs, saveevery
from yolosafe.planning.options import DEFAULTS, HANG_KEYS, WATCH_KEYS
from yolosafe.planning.validate import InputError
from yolosafe.rundir import records

AUTO = "auto"  # --batch auto: planner.resolve_auto sizes it
VAL_OOM = ("in-place", "relaunch")  # what a validation OOM does (yolosafe.training.valretry)
IMGSZ_MAX = 16384  # pixels a side: one 16384x16384 image is 3 GiB as a float tensor; past it nothing trains
COUNT_MAX = 1 << 24  # batches, epochs, retries: a number past this is a typo (10**30 overflows a C integer)
RUN_KEYS = ("max_retries", "min_batch", *WATCH_KEYS, *HANG_KEYS, "save_every")  # shapes the attempts, in the story


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _shown(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 20 else f"{text[:12]}... ({len(text)} digits)"


def whole(minimum: int, limit: int = COUNT_MAX, optional: bool = False,
          auto: bool = False) -> Callable[[str, Any], Any]:
    """A whole number from ``minimum`` to ``limit`` (``None`` too when ``optional``, the word ``auto`` when
    ``auto``); a float or text is refused (a YAML ``"16"`` is text: say 16)."""

    def parse(key: str, value: Any) -> Any:
        if value is None and optional:
            return None
        if auto and isinstance(value, str) and value.strip().lower() == AUTO:
            return AUTO
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{_flag(key)} {value!r}: must be a whole number")
        if value < minimum:
            raise InputError(f"{_flag(key)} {value}: must be at least {minimum}")
        if value > limit:
            raise InputError(f"{_flag(key)} {_shown(value)}: at most {limit}")
        return value

    return parse


def number(key: str, value: Any, optional: bool = False) -> float | None:
    """A finite number (numeric text too, as a ``--config`` file may hold it), as a float."""
    if value is None and optional:
        return None
    if not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            parsed = float(value)
        except ValueError:
            parsed = math.nan
        if math.isfinite(parsed):
            return parsed
    raise InputError(f"{_flag(key)} {value!r}: expected a number")


def text(optional: bool = True, numbers: bool = False) -> Callable[[str, Any], str | None]:
    """Text (``None`` too when ``optional``); with ``numbers``, a number is its text, as Ultralytics' ``get_cfg``
    reads ``project=`` and ``name=`` (``name=0`` is the run "0")."""

    def parse(key: str, value: Any) -> str | None:
        if value is None and optional:
            return None
        if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise InputError(f"{_flag(key)} {value!r}: must be text")
        return value

    return parse


def yes_no(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{key} {value!r}: must be true or false")
    return value


def watch_interval(key: str, value: Any) -> float:
    """--watch-interval 0 turns the watch off; faster than 100 Hz buys nothing and costs CPU."""
    interval = number(key, value)
    assert interval is not None
    if interval != 0 and not 0.01 <= interval <= 60:
        raise InputError(f"--watch-interval {interval:g}: give seconds between 0.01 and 60, or 0 to turn the memory "
                         "watch off")
    return interval


def share(message: str) -> Callable[[str, Any], float]:
    """A share above 0 and at most 1."""

    def parse(key: str, value: Any) -> float:
        parsed = number(key, value)
        assert parsed is not None
        if not 0 < parsed <= 1:
            raise InputError(f"{_flag(key)} {parsed:g}: {message}")
        return parsed

    return parse


def hang_timeout(key: str, value: Any) -> float | None:
    """Seconds without progress (0: no hang watch; None: learnt from the run)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0
                              or not math.isfinite(value)):
        raise InputError(f"--hang-timeout {value!r}: give seconds without progress (e.g. 600), or 0 to turn the "
                         "hang watch off")
    return None if value is None else float(value)


def save_every(key: str, value: Any) -> saveevery.SaveEvery:
    if isinstance(value, saveevery.SaveEvery):
        return value
    try:
        return saveevery.parse(value)
    except saveevery.SaveEveryError as exc:
        raise InputError(f"--save-every {value!r}: {exc}") from None


def val_oom(key: str, value: Any) -> str:
    if value not in VAL_OOM:
        raise InputError(f"val_oom {value!r}: must be one of {', '.join(VAL_OOM)}")
    return str(value)


def words(key: str, value: Any) -> tuple[str, ...]:
    """Ultralytics ``key=value`` words (their meaning: :func:`yolosafe.planning.trainplan.parse_passthrough`)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(isinstance(w, str)
                                                                                       for w in value):
        raise InputError(f"{key} {value!r}: give Ultralytics arguments as key=value words (e.g. [lr0=0.01])")
    return tuple(value)


def mapping(key: str, value: Any) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        raise InputError(f"{key} {value!r}: must be a mapping")
    return value


def command(key: str, value: Any) -> list[str] | None:
    if value is not None and (isinstance(value, (str, bytes)) or not isinstance(value, Sequence)):
        raise InputError(f"{key} {value!r}: must be the command's words")
    return None if value is None else [str(word) for word in value]


# Each field's parser, in the order a new run's input is checked (so one line names the first fault): the options,
# then the fields that resolving adds.
PARSERS: Mapping[str, Callable[[str, Any], Any]] = MappingProxyType({
    "watch_interval": watch_interval,
    "warn_at": share("give a share of GPU memory above 0 and at most 1 (e.g. 0.9)"),
    "hang_timeout": hang_timeout,
    "max_hang_restarts": whole(0),
    "batch": whole(1, auto=True),
    "effective_batch": whole(1, optional=True),
    "val_batch": whole(1, optional=True),
    "imgsz": whole(32, IMGSZ_MAX),
    "epochs": whole(1),
    "max_retries": whole(0),
    "min_batch": whole(1),
    "model": text(),
    "data": text(optional=False),
    "project": text(numbers=True),
    "name": text(optional=False, numbers=True),
    "alloc_conf": text(),
    "gpus": text(),
    "task": text(),
    "val_oom": val_oom,
    "save_every": save_every,
    "clear_before_val": yes_no,
    "download": yes_no,
    "memory_fraction": share("give a share above 0 and at most 1 (e.g. 0.85)"),
    "args": words,
    "data_yaml": text(), "dataset_name": text(), "data_hint": text(),
    "named": yes_no,
    "differences": words,
    "user_code": mapping,
    "nnodes": whole(1),
    "train_images": whole(0, limit=1 << 40, optional=True),
    "dataset_figures": mapping,
    "command": command,
})


def _default(key: str) -> Any:
    """The field's default: :data:`DEFAULTS`' value, parsed (a fresh copy of a list)."""
    return field(default_factory=lambda: PARSERS[key](key, copy.deepcopy(DEFAULTS[key])))


@dataclass(frozen=True)
class TrainOptions:
    """Every option of one run, parsed: the flags over ``--config`` over the dataset's defaults over DEFAULTS."""

    model: str | None = _default("model")  # weights or a model YAML; trainrun.resolve picks the default model
    data: str = _default("data")  # the dataset as given: a name in datasets.yaml, a YAML path, or shapes
    gpus: str | None = _default("gpus")  # '0,1', 'all', 'cpu', 'auto[:N]' (ids once planner.resolve_auto chose)
    batch: int | Literal["auto"] = _default("batch")  # the total over all GPUs; 'auto' until resolve_auto sizes it
    effective_batch: int | None = _default("effective_batch")  # images per optimizer step (Ultralytics' nbs)
    val_batch: int | None = _default("val_batch")  # the validation batch per GPU
    imgsz: int = _default("imgsz")  # the image size
    epochs: int = _default("epochs")  # the epochs to train
    alloc_conf: str | None = _default("alloc_conf")  # PYTORCH_CUDA_ALLOC_CONF items merged over the default
    project: str | None = _default("project")  # the runs' parent folder; Ultralytics' own for the task once checked
    task: str | None = _default("task")  # the model's task (detect, segment...), Ultralytics' once it checked
    download: bool = _default("download")  # let Ultralytics fetch the data and the weights before training
    name: str = _default("name")  # the run's folder name inside the project
    max_retries: int = _default("max_retries")  # relaunches after an OOM
    min_batch: int = _default("min_batch")  # the per-GPU batch an OOM never halves below
    watch_interval: float = _default("watch_interval")  # seconds between memory samples; 0 turns the watch off
    warn_at: float = _default("warn_at")  # the share of a GPU's memory that prints a warning
    clear_before_val: bool = _default("clear_before_val")  # empty the CUDA cache on every rank before validation
    save_every: saveevery.SaveEvery = _default("save_every")  # noqa: RUF009 (a field()) the step checkpoint
    val_oom: str = _default("val_oom")  # a validation OOM: 'in-place' or 'relaunch'
    hang_timeout: float | None = _default("hang_timeout")  # None: learnt; 0: no hang watch
    max_hang_restarts: int = _default("max_hang_restarts")  # relaunches after a hang
    memory_fraction: float = _default("memory_fraction")  # --batch auto: the share of free GPU memory to fill
    args: tuple[str, ...] = _default("args")  # Ultralytics key=value train arguments
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

    def __post_init__(self) -> None:
        """Every option parsed into its type, the first fault in one line (an :class:`InputError`)."""
        for key, parse in PARSERS.items():
            object.__setattr__(self, key, parse(key, getattr(self, key)))
        if self.nnodes > 1 and self.batch == AUTO:  # each node would size its own
            raise InputError(f"--batch auto with {self.nnodes} nodes: each node would pick its own; run yolosafe "
                             "plan --batch auto on one node without the node options, and give every node --batch = "
                             f"its per-GPU batch x GPUs per node x {self.nnodes}")
        if self.project is not None:
            check_run_names(self.project, self.name)

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
            **self.recorded(RUN_KEYS),
        }

    def recorded(self, keys: Sequence[str]) -> dict[str, Any]:
        """The fields ``keys`` as a JSON file holds them (``--save-every`` as its word), which they parse back from."""
        return {key: str(value) if isinstance(value, saveevery.SaveEvery) else copy.deepcopy(value)
                for key, value in ((key, getattr(self, key)) for key in keys)}

    def as_dict(self) -> dict[str, Any]:
        """Every field by name; :meth:`of` reads it back as the same options."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> TrainOptions:
        """These options with ``changes`` (a later step's: the task, the project, the chosen GPUs and batch...),
        parsed as the others."""
        return dataclasses.replace(self, **changes)


def field_names() -> tuple[str, ...]:
    """The fields' names: DEFAULTS' keys, then the resolved ones."""
    return tuple(f.name for f in dataclasses.fields(TrainOptions))


DERIVED = tuple(name for name in field_names() if name not in DEFAULTS)  # the fields resolving adds


def check_run_names(project: str, name: str) -> None:
    """``--name`` is one folder inside ``--project``, each in UTF-8 and of a size the file system takes (the place
    itself, once Ultralytics has said where it is: :func:`yolosafe.planning.inputs.check_run_place`)."""
    if not name or name in {".", ".."} or "/" in name or (os.sep != "/" and os.sep in name):
        raise InputError(f"--name {name!r}: give a single folder name (no '/'); use --project for the parent folder")
    name_bytes = inputs.utf8(name, "--name")
    if len(name_bytes) > inputs.NAME_MAX:
        raise InputError(f"--name {name[:40]}...: {len(name_bytes)} bytes, at most {inputs.NAME_MAX}")
    project_bytes = inputs.utf8(project, "--project")
    long = next((part for part in Path(project).parts if len(part.encode()) > inputs.NAME_MAX), None)
    if long is not None:
        raise InputError(f"--project: the folder name {long[:40]}... is {len(long.encode())} bytes, "
                         f"at most {inputs.NAME_MAX}")
    if len(project_bytes) + len(name_bytes) + 1 > inputs.PATH_MAX:
        raise InputError(f"--project: the run's path would be {len(project_bytes) + len(name_bytes) + 1} bytes, "
                         f"at most {inputs.PATH_MAX}")


def check_min_batch(options: TrainOptions, per_gpu_batch: int) -> None:
    """``--min-batch`` within the per-GPU batch of the plan, which it is a floor of."""
    if options.min_batch > per_gpu_batch:
        raise InputError(f"--min-batch {options.min_batch}: more than the per-GPU batch {per_gpu_batch}, which it "
                         f"is a floor of; give at most {per_gpu_batch}")
