"""Atomic checkpoints: the real ``BaseTrainer.save_model`` run through yolosafe's trainer on a tiny model.

The trainer is built without its training setup (``__new__`` plus the attributes ``save_model`` reads), so the
checkpoint files are written by Ultralytics' own code in milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ultralytics.engine.trainer import BaseTrainer

from tests.contexts import run_context
from yolosafe.training.trainer import trainer_class


def trainer(weights: Path, fitness: float, best_fitness: float) -> BaseTrainer:
    from ultralytics.utils.torch_utils import ModelEMA

    cls = trainer_class("detect", run_context(weights.parent))
    t = cls.__new__(cls)
    t.model = torch.nn.Linear(2, 2)
    t.ema, t.optimizer = ModelEMA(t.model), torch.optim.SGD(t.model.parameters(), lr=0.1)
    t.scaler = torch.amp.GradScaler("cuda", enabled=False)
    t.args, t.metrics, t.epoch, t.save_period = SimpleNamespace(epochs=3), {}, 1, -1
    t.fitness, t.best_fitness = fitness, best_fitness
    t.stopper = SimpleNamespace(best_fitness=best_fitness, best_epoch=0)
    t.wdir, t.csv = weights, weights.parent / "results.csv"
    t.last, t.best = weights / "last.pt", weights / "best.pt"
    return t


def epoch_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["epoch"]


@pytest.mark.parametrize("improved", [False, True])
def test_a_killed_ranks_partial_is_never_promoted(tmp_path, improved):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "best.pt").write_bytes(b"the previous best")
    for name in ("best", "last"):  # a rank SIGKILLed mid-write left these behind
        (weights / f".{name}.pt.partial").write_bytes(b"truncated")
    t = trainer(weights, fitness=0.9 if improved else 0.1, best_fitness=0.9 if improved else 0.5)
    assert t.save_model()
    t.checkpoints_durable()
    assert epoch_of(weights / "last.pt") == 1
    if improved:  # Ultralytics wrote best.pt: this save's file is promoted
        assert epoch_of(weights / "best.pt") == 1
    else:  # fitness did not improve: Ultralytics wrote no best.pt, so best.pt stays as it was
        assert (weights / "best.pt").read_bytes() == b"the previous best"
    assert not list(weights.glob(".*.partial"))
