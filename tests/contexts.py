"""Run contexts for the tests of the training side without training: a run spec as the supervisor writes it, loaded
the way every worker and rank loads its own (``RunContext.load``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from yolosafe.rundir import runspec
from yolosafe.rundir.runspec import RunSpec
from yolosafe.training.context import RunContext


def spec_file(run_dir: Path, **fields: Any) -> Path:
    """``run_dir/spec-N.json`` of a one-GPU detection plan, with ``fields`` changed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = RunSpec(attempt=1, mode=runspec.TRAIN, world_size=1, fake_gpus=False, run_dir=str(run_dir),
                   model="yolov8n.yaml", resume=None, val_batch=4, clear_before_val=True, cuda_visible_devices=None,
                   plan={"gpus": [0], "per_gpu_batch": 8, "val_batch": 4}, train_kwargs={})
    return dataclasses.replace(spec, **fields).save()


def run_context(run_dir: Path, environ: dict[str, str] | None = None, **fields: Any) -> RunContext:
    """The context of a process started with that spec and ``environ`` (torchrun's variables, the injection)."""
    return RunContext.load(spec_file(run_dir, **fields), environ=environ or {})
