"""The optimizer ``yolo train`` builds: for the same arguments yolosafe passes Ultralytics what makes its trainer
build the same optimizer (type, and per parameter group the learning rate, momentum and weight decay) and the same
accumulation; after an OOM halving, the first attempt's step and weight decay. Each side is Ultralytics' own trainer
set-up (``_setup_train``: the model, the loaders, ``build_optimizer``), which is what ``yolo train`` runs before its
first batch; the drills read the optimizer line real runs print."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest

from tests.conftest import run_dir_of
from yolosafe.planning import trainplan

pytestmark = pytest.mark.slow  # Ultralytics' trainer set-up, and real trainings
LINE = re.compile(r"optimizer:\x1b?\[?[0-9;]*m? ?\s*(\w+)\(lr=([\d.e-]+), momentum=([\d.e-]+)\) with parameter groups "
                  r"(\d+) weight\(decay=0\.0\), (\d+) weight\(decay=([\d.e-]+)\), (\d+) bias\(decay=0\.0\)")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from yolosafe.planning import datasets

    return datasets.ensure_shapes(tmp_path_factory.mktemp("optimizer-set"), train=8, val=2, size=64)


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def built(data: Path, tmp: Path, **args) -> dict:
    """What Ultralytics' trainer builds for ``args`` (``yolo train`` runs the same set-up before its first batch); 100
    epochs (set up, never trained) keep Ultralytics' cap of the accumulation at the run's iterations out of the way."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    lines, logger = Lines(), logging.getLogger("ultralytics")
    logger.addHandler(lines)
    try:
        trainer = DetectionTrainer(overrides={"model": "yolov8n.yaml", "data": str(data), "epochs": 100, "imgsz": 64,
                                              "workers": 0, "device": "cpu", "plots": False, "project": str(tmp),
                                              "name": "t", "exist_ok": True, **args})
        trainer._setup_train()
    finally:
        logger.removeHandler(lines)
    groups = [{k: g.get(k) for k in ("param_group", "lr", "momentum", "betas", "weight_decay", "nesterov")} | {
        "params": len(g["params"])} for g in trainer.optimizer.param_groups]
    [line] = [m for m in map(LINE.search, lines.lines) if m]
    return {"optimizer": type(trainer.optimizer).__name__, "groups": groups, "accumulate": trainer.accumulate,
            "batch": trainer.batch_size, "line": line.groups()}


def passed(plan: trainplan.TrainPlan) -> dict:
    """The arguments yolosafe's worker gives Ultralytics that decide the optimizer (the rest are the user's)."""
    kwargs = plan.train_kwargs()
    return {k: kwargs[k] for k in ("batch", "nbs", "weight_decay") if k in kwargs}


def same_optimizer(ours: dict, theirs: dict, rel: float = 0.0) -> None:
    assert ours["optimizer"] == theirs["optimizer"]
    assert len(ours["groups"]) == len(theirs["groups"])
    for a, b in zip(ours["groups"], theirs["groups"], strict=True):
        assert {**a, "weight_decay": None} == {**b, "weight_decay": None}
        assert math.isclose(a["weight_decay"], b["weight_decay"], rel_tol=rel, abs_tol=0.0), (a, b)


CASES = {  # id: (batch, the user's nbs or None), as `yolo train batch=B [nbs=N]`
    "batch3": (3, None), "batch16": (16, None), "batch128": (128, None), "batch8-nbs20": (8, 20),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_optimizer_is_yolo_trains_before_and_after_a_halving(data, tmp_path, case):
    batch, nbs = CASES[case]
    theirs = built(data, tmp_path, batch=batch, **({"nbs": nbs} if nbs else {}))
    plan = trainplan.build_plan(model="yolov8n.yaml", data=str(data), gpus=(), batch=batch, effective_batch=nbs,
                                imgsz=64, epochs=100, train_images=8)
    assert passed(plan) == {"batch": batch, "nbs": nbs or 64}  # exactly the user's command: args.yaml agrees too
    ours = built(data, tmp_path, **passed(plan))
    same_optimizer(ours, theirs)
    assert ours["line"] == theirs["line"] and ours["accumulate"] == theirs["accumulate"]
    half = plan.halved()
    if half is None:
        return
    after = built(data, tmp_path, **passed(half))
    same_optimizer(after, theirs, rel=1e-12)  # the first attempt's weight decay, to the last bits of a float
    assert after["batch"] * after["accumulate"] == theirs["batch"] * theirs["accumulate"]  # the same step
    assert half.accumulate == after["accumulate"] and half.real_effective_batch == plan.real_effective_batch


def optimizer_lines(log: str) -> list[tuple[str, ...]]:
    return [m.groups() for m in map(LINE.search, log.splitlines()) if m]


def test_a_run_after_a_training_oom_prints_the_first_attempts_optimizer(run_cli, tmp_path, data):
    """yolosafe train --batch 6 (yolo train's nbs 64: 11 steps of 6, weight decay 0.0005 x 66/64): a training OOM,
    the retry at 3 accumulates 22 and prints the same optimizer line (and batch 128's is yolo train batch=128's)."""
    common = ["--epochs", "1", "--imgsz", "64", "--data", str(data), "workers=0", "plots=False"]
    result = run_cli("train", "--batch", "6", *common, env={"YOLOSAFE_INJECT_OOM": "phase=train,epoch=0"})
    assert result.returncode == 0, result.stderr[-3000:]
    run = run_dir_of(tmp_path)
    first, second = optimizer_lines((run / "train.log").read_text())
    theirs = built(data, tmp_path, batch=6)["line"]
    assert first == theirs and second[:5] + second[6:] == theirs[:5] + theirs[6:]
    assert math.isclose(float(second[5]), float(theirs[5]), rel_tol=1e-12) and float(theirs[5]) == 0.0005 * 66 / 64
    wide = run_cli("train", "--batch", "128", "--name", "wide", *common)
    assert wide.returncode == 0, wide.stderr[-3000:]
    [line] = optimizer_lines((run_dir_of(tmp_path, "wide") / "train.log").read_text())
    assert line == built(data, tmp_path, batch=128)["line"] and float(line[5]) == 0.001  # not nbs 128's 0.0005
