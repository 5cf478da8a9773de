"""The Ultralytics compatibility guard: every private detail yolosafe relies on holds for the installed Ultralytics,
and a broken one fails with its name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from yolosafe.training import compat

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("assumption", compat.ASSUMPTIONS, ids=lambda a: a.name)
def test_assumption_holds(assumption: compat.Assumption):
    assumption.verify()  # a failure reads "Ultralytics assumption '<name>' broken (<where>): yolosafe assumes ..."


def test_names_are_unique_and_say_where():
    names = [a.name for a in compat.ASSUMPTIONS]
    assert len(set(names)) == len(names)
    assert all(a.assumes and a.where for a in compat.ASSUMPTIONS)


def test_a_changed_private_detail_fails_naming_it(monkeypatch):
    """An Ultralytics whose _do_train no longer re-raises at 3 retries: the message names the assumption."""
    from ultralytics.engine.trainer import BaseTrainer

    def _do_train(self):  # Ultralytics' loop without the cap yolosafe turns its in-process halving off with
        self._oom_retries = 0
        self.run_callbacks("on_train_epoch_start")

    monkeypatch.setattr(BaseTrainer, "_do_train", _do_train)
    with pytest.raises(compat.CompatError, match=r"assumption 'oom_retries_cap' broken .*_oom_retries >= 3"):
        next(a for a in compat.ASSUMPTIONS if a.name == "oom_retries_cap").verify()
    assert {"oom_retries_cap", "do_train_signature"} <= set(compat.failed())


def test_supported_range_is_declared_once():
    requirement = re.search(r'^ +"(ultralytics[^"]*)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    assert requirement == "ultralytics" + ",".join(compat.SUPPORTED)
    pinned = re.search(r"^ultralytics==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)[1]
    assert compat.supported(pinned)  # CI tests a version inside the range


def test_version_outside_range_warns_in_one_line():
    import ultralytics

    assert compat.version_warning(ultralytics.__version__) is None
    assert compat.supported("8.4.999") and not compat.supported("8.4.189") and not compat.supported("8.5.0")
    line = compat.version_warning("8.5.1")
    assert line is not None and "\n" not in line
    assert "ultralytics 8.5.1 is outside the supported range >=8.4.190,<8.5" in line
    assert all(a.name in line for a in compat.ASSUMPTIONS) and "the cheap checks pass" in line


def test_worker_warns_when_ultralytics_is_outside_range(monkeypatch, capsys):
    import ultralytics

    from yolosafe.training import worker

    worker.warn_unsupported_ultralytics()
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(ultralytics, "__version__", "8.3.0")
    worker.warn_unsupported_ultralytics()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unverified assumptions: oom_retries_cap" in err


def test_no_check_is_a_bare_assert():
    """``python -O`` strips ``assert``: every check raises its named error instead."""
    import ast

    tree = ast.parse((ROOT / "yolosafe" / "training" / "compat.py").read_text())
    assert not [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)]


def test_what_the_cpu_ranks_replace_is_checked(monkeypatch):
    """A select_device that writes CUDA_VISIBLE_DEVICES (as older Ultralytics did) and a _setup_ddp that sets the
    device after init_process_group fail, named."""
    from ultralytics.engine.trainer import BaseTrainer
    from ultralytics.utils import torch_utils

    def select_device(device="", newline=False, verbose=True):
        import os

        os.environ["CUDA_VISIBLE_DEVICES"] = device

    def _setup_ddp(self):
        dist.init_process_group(backend="nccl", rank=RANK, world_size=self.world_size)  # noqa: F821
        self.accelerator.set_device(index)  # noqa: F821

    by_name = {a.name: a for a in compat.ASSUMPTIONS}
    monkeypatch.setattr(torch_utils, "select_device", select_device)
    monkeypatch.setattr(BaseTrainer, "_setup_ddp", _setup_ddp)
    with pytest.raises(compat.CompatError, match=r"'select_device_keeps_visible' broken .*CUDA_VISIBLE_DEVICES"):
        by_name["select_device_keeps_visible"].verify()
    with pytest.raises(compat.CompatError, match=r"'ddp_setup_device' broken .*set_device"):
        by_name["ddp_setup_device"].verify()
