"""Conformance matrix from Ultralytics' own tests: the training commands of its ``tests/test_cli.py`` (``test_train``
for every task, ``test_rtdetr``'s spacing, ``test_train_gpu``'s ``device=0`` and ``device=0,1``) and the training calls
of ``tests/test_python.py`` (``test_train_scratch``, ``test_workflow``) and ``tests/test_engine.py`` (a task trainer
with a callback added), with local tiny stand-ins for its hub datasets and model YAMLs for its weights (nothing
downloads). CLI commands run through the installed ``yolosafe`` as dry runs (every check a real run makes: Ultralytics'
own check of model, data and arguments in its child) and their ``train kwargs`` are compared with what Ultralytics'
``entrypoint`` reads from the same words; Python calls go through ``yolosafe.plan`` with the same keywords.

Tasks ``semantic`` and ``depth`` (cityscapes8, depth8) have no local stand-in here: not in the matrix.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import tinysets
from tests.test_yoloforms import OWNED, _json_like, train_kwargs
from tests.test_yolowords import entrypoint_reads

pytestmark = pytest.mark.slow  # 20 input checks of 5 tasks: minutes on 2 cores, beside the trainings

TASK_MODEL = {"detect": "yolov8n.yaml", "segment": "yolov8n-seg.yaml", "classify": "yolov8n-cls.yaml",
              "pose": "yolov8n-pose.yaml", "obb": "yolov8n-obb.yaml"}
# (id, the words after 'yolo' with {model} and {data}, the task whose stand-ins fill them, fake GPUs)
CLI = [
    *[(f"test_cli.test_train[{t}]", "train {task} model={model} data={data} imgsz=32 epochs=1 cache=disk", t, None)
      for t in TASK_MODEL],
    ("test_cli.test_rtdetr", "train {task} model=yolov8-rtdetr.yaml data={data} --imgsz= 160 epochs =1, cache = disk "
                             "fraction=0.25", "detect", None),
    *[(f"test_cli.test_train_gpu[{t}-device=0]", "train {task} model={model} data={data} imgsz=32 epochs=1 device=0",
       t, "1x24GB") for t in ("detect", "classify")],
    *[(f"test_cli.test_train_gpu[{t}-device=0,1]", "train {task} model={model} data={data} imgsz=32 epochs=1 "
       "device=0,1", t, "2x24GB") for t in ("detect", "segment")],
]


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("standins")
    sets = {t: str(tinysets.roboflow(root / t, t)) for t in ("detect", "segment", "pose", "obb")}
    return sets | {"classify": str(tinysets.imagefolder(root / "cls"))}


@pytest.mark.parametrize(("case", "command", "task", "fake"), CLI, ids=[c[0] for c in CLI])
def test_ultralytics_cli_training_commands(run_cli, standins, monkeypatch, case, command, task, fake):
    words = command.format(task=task, model=TASK_MODEL[task], data=standins[task]).split()
    result = run_cli(*words, "--dry-run", env={"YOLOSAFE_FAKE_GPUS": fake} if fake else None)
    assert result.returncode == 0, f"{case}: {result.stderr}{result.stdout}"
    theirs = entrypoint_reads(words, monkeypatch)
    assert theirs[0] == "ok", case
    expected = {k: _json_like(v) for k, v in theirs[1].items() if k not in OWNED}
    ours = train_kwargs(result.stdout)
    assert {k: ours.get(k) for k in expected} == expected, case


def _on_train_start(trainer):
    return trainer


PYTHON = [  # (id, the model, the task of the stand-in data, the keywords of its train call)
    ("test_python.test_train_scratch", "yolov8n.yaml", "detect", {"epochs": 1, "imgsz": 32}),
    ("test_python.test_workflow", "yolov8n.yaml", "detect", {"epochs": 1, "imgsz": 32, "optimizer": "SGD"}),
    ("test_engine.test_detect", "yolov8n.yaml", "detect", {"epochs": 1, "imgsz": 32, "callbacks":
                                                           {"on_train_start": _on_train_start}}),
    ("test_engine.test_segment", "yolov8n-seg.yaml", "segment", {"epochs": 1, "imgsz": 32, "callbacks":
                                                                 {"on_train_start": _on_train_start}}),
    ("test_engine.test_classify", "yolov8n-cls.yaml", "classify", {"epochs": 1, "imgsz": 32, "callbacks":
                                                                   {"on_train_start": _on_train_start}}),
]


@pytest.mark.parametrize(("case", "model", "task", "kwargs"), PYTHON, ids=[c[0] for c in PYTHON])
def test_ultralytics_python_training_calls(standins, case, model, task, kwargs, tmp_path: Path, monkeypatch):
    import yolosafe

    monkeypatch.chdir(tmp_path)
    plan = yolosafe.plan(model, standins[task], device="cpu", batch=4, **kwargs)
    assert plan is not None, case
