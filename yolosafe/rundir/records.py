"""Typed run records: ``yolosafe.json`` (the story), its attempts, the failure records and the phase events,
with load and save in one place.

Each record is a dataclass whose known fields are typed and whose unknown keys are kept in ``extra``, so
``from_dict(d).to_dict() == d`` for the schema the supervisor and the trainer write today, and a record written by a
newer or older yolosafe still loads. Readers (report, doctor, fix) get a :class:`RecordError` with one line for a
damaged file instead of a traceback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yolosafe.rundir import files as rundir
from yolosafe.rundir.layout import RunDir
from yolosafe.rundir.outcome import Outcome
from yolosafe.rundir.typed import Record, RecordError, _typed, read_json

__all__ = (  # RecordError: what every loader here raises, so readers catch it as records.RecordError
    "VAL_PHASES",
    "Attempt",
    "Event",
    "Failure",
    "Hang",
    "Outcome",
    "RecordError",
    "Story",
    "epoch_label",
    "failures_from",
    "load_events",
    "load_failures",
    "load_hang",
    "load_story",
    "save_failure",
    "save_hang",
    "save_story",
    "story_path",
)

_FAILURE_NAME = re.compile(r"failure-(\d+)-rank(\d+)\.json$")


def epoch_label(epoch: int | None, epochs: int | None = None) -> str:
    """A recorded epoch (0-based, as the trainer counts) as people read it, 1-based as Ultralytics prints it:
    "epoch 134/200", "epoch 134", or "an unknown epoch"; never a raw None."""
    if epoch is None:
        return "an unknown epoch"
    return f"epoch {epoch + 1}/{epochs}" if epochs else f"epoch {epoch + 1}"


VAL_PHASES = ("val", "final")  # the phases of a record that are validation: each epoch's, and best.pt's at the end


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
    resumed_at: dict[str, Any] | None = None  # a resume inside the epoch: rundir.steps.resume_point
    redone: dict[str, Any] | None = None  # what this attempt trains again of the one before: {"iterations", "seconds"}
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
    hang_timeout: float | None = None  # None in the story: learnt (the run's option), or never recorded
    max_hang_restarts: int | None = None
    save_every: str | None = None  # the step checkpoint inside the epoch (yolosafe.planning.saveevery)
    batch_auto: dict[str, Any] | None = None  # --batch auto: the choice and its reasons
    memory_plan: dict[str, Any] | None = None  # the memory model's prediction for the plan
    nodes: dict[str, Any] | None = None  # a multi-node run: nodes.Nodes.summary() of this node
    supervisor: dict[str, Any] | None = None  # proc.identity of the supervisor: tells a dead run from a live one
    attempts: list[Attempt] = field(default_factory=list)
    outcome: str | None = None  # an Outcome
    memory_watch: dict[str, Any] | None = None
    stragglers: list[dict[str, Any]] | None = None  # ranks named slower than the others (supervisor.stragglers)
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
    recovered: str | None = None  # "in_place": the rank caught this OOM and went on, no relaunch (training.valretry)
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
class Hang(Record):
    """``hang-N.json``: the rank the supervisor's hang watch found stuck in attempt N on its node, written by the
    watch (:mod:`yolosafe.supervisor.hangwatch`) before it stopped every rank; read by the attempt loop, the
    multi-node agreement, report and doctor."""

    attempt: int | None = None
    node: int | None = None
    rank: int | None = None  # the stuck rank (global; a single process is -1)
    pid: int | None = None
    phase: str | None = None  # the state of its last beat: setup, train, val, save, sync, final
    epoch: int | None = None  # 0-based
    iteration: int | None = None  # 0-based: the batch it was in (the one after its last beat's)
    stuck_s: float | None = None  # seconds since its last beat when it was found
    timeout_s: float | None = None  # the timeout of its phase then
    timeout_source: str | None = None  # "--hang-timeout", "learnt" (safety factor x the longest seen) or "floor"
    frame: str | None = None  # the innermost frame of its main thread ('File "...", line N in f')
    stopped: bool | None = None  # it was stopped (SIGSTOP, state T): it was continued to write its stack
    waiting: list[int] | None = None  # the ranks found waiting in a collective (for the stuck one)
    stacks: list[str] | None = None  # the stack files written, one per rank
    native: list[str] | None = None  # py-spy's dumps, where py-spy is installed
    message: str | None = None  # the line the supervisor said
    t: float | None = None


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
    iteration: int | None = None  # step_saved / step_resume: the iterations of the epoch done; of: the epoch's
    of: int | None = None
    seconds: float | None = None  # step_saved, unvalidated_saved: how long the save took
    preempted: bool | None = None  # step_saved: written because a stop (SIGTERM, SIGUSR1) asked for it
    world: int | None = None  # step_saved: the ranks that wrote it
    shard: int | None = None  # step_saved: the samples of the epoch per rank (every rank's order is as long)
    done_samples: int | None = None  # step_saved: of them, trained (rank 0's; every rank's but the last batch's)


def story_path(run: RunDir | Path) -> Path:
    """``yolosafe.json``; node R > 0 of a multi-node run keeps its own, ``yolosafe-nodeR.json`` (a plain path:
    node 0's)."""
    return RunDir.of(run).story


def load_story(run: RunDir | Path) -> Story:
    path = story_path(run)
    return _typed(Story, path, read_json(path))


def save_story(run: RunDir | Path, story: Story) -> None:
    rundir.write_json(story_path(run), story.to_dict())


def _failure_order(path: Path) -> tuple[int, int, str]:
    """Attempt, then rank, as numbers: failure-2 before failure-10."""
    match = _FAILURE_NAME.search(path.name)
    return (int(match[1]), int(match[2]), path.name) if match else (1 << 30, 0, path.name)


def load_failures(run: RunDir | Path, attempt: int | None = None) -> list[Failure]:
    """The failure records (of one attempt, or all), in attempt then rank order."""
    found = []
    for path in sorted(RunDir.of(run).failures(attempt), key=_failure_order):
        record = _typed(Failure, path, read_json(path))
        record.name = path.name
        found.append(record)
    return found


def save_failure(run: RunDir | Path, record: Failure) -> Path:
    """Write a failure record atomically, named by its attempt and global rank."""
    path = RunDir.of(run).failure(record.attempt or 0, record.rank or 0)
    rundir.write_json(path, record.to_dict())
    return path


def save_hang(run: RunDir | Path, record: Hang) -> Path:
    path = RunDir.of(run).hang(record.attempt or 0)
    rundir.write_json(path, record.to_dict())
    return path


def load_hang(path: Path) -> Hang:
    return _typed(Hang, path, read_json(path))


def failures_from(data: list[Any]) -> list[Failure]:
    """Failure records carried inside another record (a node's end record): the dicts :meth:`Failure.to_dict` made."""
    return [Failure.from_dict(d) for d in data if isinstance(d, dict)]


def load_events(run: RunDir | Path) -> list[Event]:
    """Every complete line of the node's ``events.jsonl`` (a line cut short by a killed rank, or not an event, is
    skipped)."""
    found = []
    for line in rundir.read_jsonl(RunDir.of(run).events):
        try:
            found.append(Event.from_dict(line))
        except (TypeError, AttributeError):
            continue
    return found
