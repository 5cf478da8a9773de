"""Typed run records: ``yolosafe.json`` (the story), its attempts, the failure records and the phase events,
with load and save in one place.

Each record is a dataclass whose known fields are typed and whose unknown keys are kept in ``extra``, so
``from_dict(d).to_dict() == d`` for the schema the supervisor and the trainer write today, and a record written by a
newer or older yolosafe still loads. Readers (report, doctor, fix) get a :class:`RecordError` with one line for a
damaged file instead of a traceback.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from yolosafe.rundir import files as rundir
from yolosafe.rundir.layout import RunDir

R = TypeVar("R", bound="Record")
_FAILURE_NAME = re.compile(r"failure-(\d+)-rank(\d+)\.json$")


_TYPES: Mapping[str, tuple[type, ...]] = MappingProxyType({
    "int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),), "dict": (dict,),
    "list": (list,),
})


def _check_type(key: str, value: Any, annotation: str) -> None:
    """``value`` against a field's annotation as written (``int | None``, ``dict[str, Any]``...)."""
    allowed = tuple(t for part in annotation.split(" | ") for t in _TYPES.get(part.split("[")[0].strip(), (object,)))
    if not isinstance(value, allowed):
        raise TypeError(f"{key!r} is {value!r}, expected {annotation}")


def _default(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


class Outcome(str, Enum):
    """How an attempt, or the whole run, ended (``outcome`` in ``yolosafe.json``); the values are the file's."""

    RUNNING = "running"  # the run's outcome while its supervisor lives
    COMPLETED = "completed"
    OOM = "oom"  # an attempt that ran out of GPU memory (the run goes on with a smaller batch)
    FAILED = "failed"  # not an OOM: not retried
    KILLED = "killed"  # a rank or the worker was killed by a signal (kill -9, the kernel's OOM killer)
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM to yolosafe
    OOM_EXHAUSTED = "oom_exhausted"  # the run's outcome when the retries or the minimum batch ran out
    ABANDONED = rundir.ORPHANED  # the run's supervisor died while it said "running" (marked by the next reader)

    def __str__(self) -> str:
        return self.value


def epoch_label(epoch: int | None, epochs: int | None = None) -> str:
    """A recorded epoch (0-based, as the trainer counts) as people read it, 1-based as Ultralytics prints it:
    "epoch 134/200", "epoch 134", or "an unknown epoch"; never a raw None."""
    if epoch is None:
        return "an unknown epoch"
    return f"epoch {epoch + 1}/{epochs}" if epochs else f"epoch {epoch + 1}"


VAL_PHASES = ("val", "final")  # the phases of a record that are validation: each epoch's, and best.pt's at the end


class RecordError(ValueError):
    """A run file that cannot be read; ``str()`` is one line naming the file and what is wrong."""


@dataclass
class Record:
    """Known keys as typed fields; every other key of the JSON object kept, in ``extra``, for the round trip."""

    extra: dict[str, Any] = field(default_factory=dict, kw_only=True)
    keys: tuple[str, ...] = field(default=(), kw_only=True, repr=False, compare=False)  # the source's key order

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        """Raises TypeError (one line) for a known key of the wrong type: readers can then trust the fields."""
        known = {f.name: f for f in fields(cls)}
        for name in ("extra", "keys", "name"):
            known.pop(name, None)
        values = {k: v for k, v in data.items() if k in known}
        for key, value in values.items():
            _check_type(key, value, str(known[key].type))
        return cls(**cls._convert(values), extra={k: v for k, v in data.items() if k not in known},
                   keys=tuple(data))

    @classmethod
    def _convert(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Nested records from their dicts (overridden where a field holds records)."""
        return values

    @classmethod
    def new(cls: type[R], **values: Any) -> R:
        """A record as yolosafe writes it: every field in the file, in field order, ``null`` for "not known"."""
        names = tuple(f.name for f in fields(cls) if f.name not in ("extra", "keys", "name"))
        return cls(**values, keys=names)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in the order they were read: a field is written when it was there or is not at its
        default."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("extra", "keys", "name"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, list):
                value = [v.to_dict() if isinstance(v, Record) else v for v in value]
            if f.name in self.keys or value != _default(f):
                out[f.name] = value
        out.update(self.extra)
        order = {key: i for i, key in enumerate(self.keys)}
        return dict(sorted(out.items(), key=lambda item: order.get(item[0], len(order))))


@dataclass
class Attempt(Record):
    """One entry of the story's ``attempts``: the batches it ran with and how it ended."""

    attempt: int
    mode: str = "train"
    started: str | None = None
    batch: int | None = None
    per_gpu_batch: int | None = None
    val_batch: int | None = None
    nbs: int | None = None
    accumulate: int | None = None
    resumed_from: str | None = None
    command: list[str] | None = None  # the worker's or the rank launcher's command line
    duration_s: float | None = None
    exit_code: int | None = None
    outcome: str | None = None  # an Outcome; None while it runs
    reason: str | None = None
    phase: str | None = None
    epoch: int | None = None
    rank: int | None = None
    gpu: int | None = None
    node: int | None = None  # multi-node: the node of the rank that ended the attempt
    resumed_from_epoch: int | None = None
    next: str | None = None  # what the next attempt changed


@dataclass
class Story(Record):
    """``yolosafe.json``: the plan, versions, every attempt and the outcome. Written by the supervisor (and a resume),
    read by report, doctor, fix and the next resume."""

    yolosafe: str | None = None  # the version that started the run
    command: list[str] | None = None
    run_dir: str | None = None  # where the run is now (a resume updates it)
    dataset: dict[str, Any] | None = None
    plan: dict[str, Any] = field(default_factory=dict)  # TrainPlan.summary() of the run's current plan
    allocator: dict[str, str] | None = None
    versions: dict[str, Any] | None = None
    gpu_backend: str | None = None  # nvml | fake
    gpus: list[dict[str, Any]] | None = None  # the plan's GPUs at launch (GPU.as_dict), with their processes
    simulated_on_cpu: bool | None = None
    max_retries: int | None = None
    min_batch: int | None = None
    watch_interval: float | None = None
    warn_at: float | None = None
    clear_before_val: bool | None = None
    batch_auto: dict[str, Any] | None = None  # --batch auto: the choice and its reasons
    memory_plan: dict[str, Any] | None = None  # the memory model's prediction for the plan
    nodes: dict[str, Any] | None = None  # a multi-node run: nodes.Nodes.summary() of this node
    supervisor: dict[str, Any] | None = None  # proc.identity of the supervisor: tells a dead run from a live one
    attempts: list[Attempt] = field(default_factory=list)
    outcome: str | None = None  # an Outcome
    memory_watch: dict[str, Any] | None = None
    weights: dict[str, str] | None = None
    final_metrics: dict[str, Any] | None = None
    resumes: list[dict[str, Any]] | None = None

    @classmethod
    def _convert(cls, values: dict[str, Any]) -> dict[str, Any]:
        attempts = values.get("attempts") or []
        if not isinstance(attempts, list) or not all(isinstance(a, dict) for a in attempts):
            raise TypeError("'attempts' is not a list of objects")
        return {**values, "attempts": [Attempt.from_dict(a) for a in attempts]}

    @property
    def plan_gpus(self) -> list[int]:
        gpus = self.plan.get("gpus")
        return [g for g in gpus if isinstance(g, int)] if isinstance(gpus, list) else []


@dataclass
class Failure(Record):
    """``failure-N-rankR.json``: what killed one rank (an OOM record when ``oom`` is true).

    The one type of the file: the rank writes it as it dies (``by="rank"``, :mod:`yolosafe.training.failure`), the
    rank launcher for a rank that could not (``by="launcher"``: killed by a signal, :mod:`yolosafe.training.launcher`),
    both through :func:`save_failure`; the retry policy, the multi-node agreement, report, doctor and fix read it
    through :func:`load_failures`.
    """

    attempt: int | None = None
    rank: int | None = None
    oom: bool | None = None
    phase: str | None = None
    epoch: int | None = None  # 0-based, as the trainer counts (people read epoch + 1)
    iteration: int | None = None
    batch: int | None = None  # per GPU
    val_batch: int | None = None
    gpu: int | None = None  # the rank's CUDA device index (position in the plan's gpus)
    pid: int | None = None
    t: float | None = None
    error: str | None = None
    message: str | None = None
    figures: dict[str, Any] | None = None
    traceback: list[str] | None = None
    signal: str | None = None  # a rank killed by a signal (launcher's record)
    exit_code: int | None = None
    error_file: str | None = None
    by: str | None = None  # "rank" or "launcher"
    max_allocated_mib: float | None = None  # torch's peaks at the moment of death (on CUDA)
    max_reserved_mib: float | None = None
    name: str = field(default="", compare=False)  # the file it came from (not written back)

    def place(self, epochs: int | None = None) -> str:
        """Where it happened, as far as the record knows: "in val at epoch 134/200, rank 3"; "" when nothing is."""
        parts = [f"in {self.phase}"] if self.phase else []
        parts += [f"at {epoch_label(self.epoch, epochs)}"] if self.epoch is not None else []
        text = " ".join(parts)
        if self.rank is not None and self.rank >= 0:
            text = f"{text}, rank {self.rank}" if text else f"on rank {self.rank}"
        return text


@dataclass
class Event(Record):
    """One line of ``events.jsonl``: a phase start or end on one rank."""

    event: str | None = None
    t: float | None = None
    phase: str | None = None
    epoch: int | None = None
    rank: int | None = None
    gpu: int | None = None
    pid: int | None = None
    attempt: int | None = None


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise RecordError(f"{path}: cannot read ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"{path}: damaged, not JSON ({' '.join(str(exc).split())})") from None


def _typed(cls: type[R], path: Path, data: Any) -> R:
    if not isinstance(data, dict):
        raise RecordError(f"{path}: damaged, expected a JSON object, found {type(data).__name__}")
    try:
        return cls.from_dict(data)
    except TypeError as exc:
        raise RecordError(f"{path}: damaged ({exc})") from None


def story_path(run_dir: Path, node: int = 0) -> Path:
    """``yolosafe.json``; node R > 0 of a multi-node run keeps its own, ``yolosafe-nodeR.json``."""
    return RunDir(run_dir, node).story


def load_story(run_dir: Path, node: int = 0) -> Story:
    path = story_path(run_dir, node)
    return _typed(Story, path, _read(path))


def save_story(run_dir: Path, story: Story, node: int = 0) -> None:
    rundir.write_json(story_path(run_dir, node), story.to_dict())


def _failure_order(path: Path) -> tuple[int, int, str]:
    """Attempt, then rank, as numbers: failure-2 before failure-10."""
    match = _FAILURE_NAME.search(path.name)
    return (int(match[1]), int(match[2]), path.name) if match else (1 << 30, 0, path.name)


def load_failures(run_dir: Path, attempt: int | None = None) -> list[Failure]:
    """The failure records (of one attempt, or all), in attempt then rank order."""
    pattern = f"failure-{attempt}-rank*.json" if attempt is not None else "failure-*-rank*.json"
    found = []
    for path in sorted(run_dir.glob(pattern), key=_failure_order):
        record = _typed(Failure, path, _read(path))
        record.name = path.name
        found.append(record)
    return found


def save_failure(run_dir: Path, record: Failure) -> Path:
    """Write a failure record atomically, named by its attempt and global rank."""
    path = RunDir(run_dir).failure(record.attempt or 0, record.rank or 0)
    rundir.write_json(path, record.to_dict())
    return path


def failures_from(data: list[Any]) -> list[Failure]:
    """Failure records carried inside another record (a node's end record): the dicts :meth:`Failure.to_dict` made."""
    return [Failure.from_dict(d) for d in data if isinstance(d, dict)]


def load_events(run_dir: Path) -> list[Event]:
    """Every complete line of ``events.jsonl`` (a line cut short by a killed rank, or not an event, is skipped)."""
    found = []
    for line in rundir.read_jsonl(RunDir(run_dir).events):
        try:
            found.append(Event.from_dict(line))
        except (TypeError, AttributeError):
            continue
    return found
