"""The run spec: what one attempt asks its processes to do (``spec-N.json`` in the run directory).

The supervisor writes it before it starts the attempt; the worker and every DDP rank read it once, from the path on
their command line (``python -m yolosafe.training.worker RUN_DIR/spec-N.json``), into their
:class:`yolosafe.training.context.RunContext`.
It is the whole interface between the supervisor and the training processes: nothing else travels but the
environment torch and Ultralytics themselves read (allocator settings, ``CUDA_VISIBLE_DEVICES``, torchrun's ranks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from yolosafe.rundir import files as rundir
from yolosafe.rundir.layout import RunDir

TRAIN, FINAL_VAL = "train", "final_val"  # the two modes of an attempt


@dataclass(frozen=True)
class RunSpec:
    """One attempt's instructions. ``plan`` is :meth:`yolosafe.planning.trainplan.TrainPlan.summary` of the attempt's
    plan."""

    attempt: int
    mode: str  # TRAIN, or FINAL_VAL: only the validation of best.pt, alone, after an OOM in the final validation
    world_size: int  # ranks of the attempt (1: a single process)
    fake_gpus: bool  # the plan's GPUs are fake: each rank runs on the CPU over gloo (yolosafe.training.fake.cpuranks)
    run_dir: str
    model: str
    resume: str | None  # the checkpoint this attempt resumes from
    val_batch: int  # per GPU, for every validation loader
    clear_before_val: bool  # empty the CUDA cache on every rank right before validation
    cuda_visible_devices: str | None  # what the supervisor put in the attempt's environment
    node_rank: int = 0  # this node's place in a multi-node run (0 on one machine): its files carry it
    plan: dict[str, Any] = field(default_factory=dict)
    train_kwargs: dict[str, Any] = field(default_factory=dict)  # model.train(**train_kwargs)
    save_every: str = "0"  # the step checkpoint inside the epoch (yolosafe.planning.saveevery, training.stepckpt)
    val_oom: str = "in-place"  # a validation OOM: recovered in place by the rank (yolosafe.training.valretry), or
                               # "relaunch": the attempt ends and every rank is relaunched
    user_code: dict[str, Any] | None = None  # the user's callbacks and trainer, by name or pickled by value

    @property
    def run(self) -> RunDir:
        """The run directory, as this spec's node names its files."""
        return RunDir(Path(self.run_dir), self.node_rank)

    @property
    def path(self) -> Path:
        return self.run.spec(self.attempt)

    def save(self) -> Path:
        rundir.write_json(self.path, asdict(self))
        return self.path

    @classmethod
    def load(cls, path: Path) -> RunSpec:
        return cls(**rundir.read_json(path))
