"""One training process's view of its attempt: the run spec, which rank it is, the injection, and its progress.

The worker loads it once per process (:meth:`RunContext.load`), from the run spec path on its command line and the
variables torch.distributed.run sets, and hands it to everything that runs inside Ultralytics: the trainer class
(:func:`yolosafe.training.trainer.trainer_class`), the callbacks, the fake phase file, the peak metrics and the failure
record. Nothing of it is kept in a module global or read again from the environment: every rank is a process of its
own, so its context is too, and a test builds one from a run spec file without training.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from yolosafe import hang, oom
from yolosafe.planning import saveevery
from yolosafe.rundir import heartbeat as beats
from yolosafe.rundir.layout import RunDir
from yolosafe.rundir.runspec import RunSpec


@dataclass(frozen=True)
class Rank:
    """Which rank this process is, as torch.distributed.run told it (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``). A
    single process, started by the supervisor without the launcher, is rank -1 of a world of 1."""

    index: int = -1
    local: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Rank:
        env = os.environ if environ is None else environ
        return cls(int(env.get("RANK", -1)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))

    @property
    def distributed(self) -> bool:
        """One rank of several, started by yolosafe's launcher."""
        return self.world_size > 1

    @property
    def leads(self) -> bool:
        """The process that speaks for the attempt (a single process, or rank 0): one record, one warning."""
        return self.index <= 0


@dataclass
class Progress:
    """Where this process is in training, kept by the callbacks and read by the failure record and peak metrics."""

    phase: str | None = None  # train, val, final (the validation of best.pt after the last epoch), or between
    epoch: int = 0
    iteration: int = 0  # 0-based batch index within the phase, counted by the callbacks
    final: bool = False  # the validation of best.pt after the last epoch has begun
    train_peaks: dict[str, float | None] = field(default_factory=dict)  # torch's peaks of this epoch's training


@dataclass
class HeartbeatFiles:
    """This process's heartbeat writer and the stack file its dump goes to, opened at its first beat
    (:mod:`yolosafe.training.heartbeat`)."""

    writer: beats.Writer | None = None
    stacks: IO[str] | None = None
    step_from: float | None = None  # where the rank's own part of this training step began (the last step's end)
    forward_end: float | None = None  # when the model's forward of this step returned (a forward hook)


@dataclass(frozen=True)
class RunContext:
    """The run spec of this attempt, this process's rank, the injection (``YOLOSAFE_INJECT_OOM``, parsed once) and
    the progress of its training (mutable, per process)."""

    spec: RunSpec
    rank: Rank = field(default_factory=Rank)
    injection: oom.Injection | None = None
    progress: Progress = field(default_factory=Progress)
    hangs: tuple[hang.HangInjection, ...] = ()  # YOLOSAFE_INJECT_HANG, parsed once
    heartbeat: HeartbeatFiles = field(default_factory=HeartbeatFiles)
    save_every: saveevery.SaveEvery = field(init=False)  # the spec's --save-every, parsed once (checked before the run)

    def __post_init__(self) -> None:
        object.__setattr__(self, "save_every", saveevery.parse(self.spec.save_every))

    @classmethod
    def load(cls, spec_path: Path, rank: Rank | None = None,
             environ: Mapping[str, str] | None = None) -> RunContext:
        """The context of a process started with ``spec_path``; ``environ`` (default: this process's) gives the rank
        when ``rank`` is None, and the injection, which the CLI validated before the run began."""
        env = os.environ if environ is None else environ
        return cls(RunSpec.load(spec_path), rank or Rank.from_env(env), oom.parse_injection(env.get(oom.INJECT_ENV)),
                   hangs=hang.parse_injections(env.get(hang.INJECT_ENV)))

    @property
    def run_dir(self) -> Path:
        return Path(self.spec.run_dir)

    @property
    def run(self) -> RunDir:
        """The run directory, as this process's node names its files."""
        return self.spec.run

    @property
    def attempt(self) -> int:
        return self.spec.attempt

    @property
    def node(self) -> int:
        """This process's node in a multi-node run (0 on one machine)."""
        return self.spec.node_rank

    def gpu_index(self, device: Any) -> int | None:
        """The CUDA device index of ``device``, which is its GPU's position in the plan's ``gpus``; a CPU rank (fake
        GPUs) stands for the GPU at its local rank. None for a single process on the CPU."""
        index = getattr(device, "index", None)
        if index is None and self.rank.distributed and getattr(device, "type", "cpu") == "cpu":
            return self.rank.local
        return index
