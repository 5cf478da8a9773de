"""What the library returns: a run (:class:`Run`, read back from its ``yolosafe.json``) and a plan (:class:`Plan`).

Both are frozen: a ``Run`` is what the run directory said when it was read (:meth:`Run.load` reads it again).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from yolosafe.exits import Exit
from yolosafe.planning.trainplan import TrainPlan
from yolosafe.rundir import records
from yolosafe.rundir.layout import RunDir
from yolosafe.rundir.records import Attempt, Outcome


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class Run:
    """One yolosafe run: where it is, how it ended, its attempts, its final metrics and its weights.

    ``outcome`` is an :class:`~yolosafe.rundir.records.Outcome` (``completed``, ``oom_exhausted``, ``failed``,
    ``killed``, ``interrupted``...); ``exit_code`` what ``yolosafe train`` exits with for it; ``attempts`` each
    attempt's batches and end, as ``yolosafe.json`` records them; ``metrics`` the final validation's metrics
    (``metrics/mAP50-95(B)``...); ``weights`` ``{"last": path, "best": path}`` for the files that exist.
    ``run`` is the run directory it was read from (a :class:`~yolosafe.rundir.layout.RunDir`), ``run_dir`` its path.
    """

    run: RunDir
    outcome: Outcome | str | None
    exit_code: Exit
    attempts: tuple[Attempt, ...] = ()
    metrics: Mapping[str, Any] = field(default_factory=_frozen)
    weights: Mapping[str, Path] = field(default_factory=_frozen)
    story: Mapping[str, Any] = field(default_factory=_frozen, repr=False, compare=False)  # all of yolosafe.json

    @property
    def run_dir(self) -> Path:
        return self.run.path

    @property
    def completed(self) -> bool:
        return self.outcome == Outcome.COMPLETED

    @property
    def best(self) -> Path | None:
        return self.weights.get("best")

    @property
    def last(self) -> Path | None:
        return self.weights.get("last")

    @classmethod
    def load(cls, run_dir: str | Path, node: int = 0) -> Run:
        """The run in ``run_dir`` as its ``yolosafe.json`` says now; raises a ``UsageError`` (``RecordError``'s
        message) when there is none or it is damaged."""
        from yolosafe.planning.validate import InputError

        run = RunDir(Path(run_dir), node)
        try:
            story = records.load_story(run)
        except (OSError, records.RecordError) as exc:
            raise InputError(f"{run.path}: not a readable yolosafe run ({exc})") from None
        return cls.of(run, story)

    @classmethod
    def of(cls, run: RunDir, story: records.Story) -> Run:
        """The run in ``run`` as ``story`` (its ``yolosafe.json``) says."""
        try:
            outcome: Outcome | str | None = Outcome(story.outcome) if story.outcome else None
        except ValueError:
            outcome = story.outcome
        weights = {name: Path(p) for name, p in (story.weights or {}).items()}
        exit_code = outcome.exit_status if isinstance(outcome, Outcome) else Exit.FAILED  # a value of a newer yolosafe
        return cls(run=run, outcome=outcome, exit_code=exit_code,
                   attempts=tuple(story.attempts), metrics=_frozen(story.final_metrics), weights=_frozen(weights),
                   story=_frozen(story.to_dict()))


@dataclass(frozen=True)
class Plan:
    """What ``yolosafe plan`` says: the resolved plan (GPUs, batch split, accumulation, validation batch), the
    memory model's prediction per GPU and phase, and the choice of ``batch="auto"`` with its reasons."""

    plan: TrainPlan
    memory: Mapping[str, Any] = field(default_factory=_frozen)
    auto: Mapping[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON of ``yolosafe plan --json``."""
        return {"plan": self.plan.summary(), "auto": dict(self.auto) if self.auto is not None else None,
                "memory": dict(self.memory)}
