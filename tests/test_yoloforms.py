"""Every form of a ``yolo`` command through the installed ``yolosafe``: the task word before or after ``train``, bare
flags, Ultralytics' spacing, its typing of values (``lr0=1e-3``, ``name=001``, ``classes=0,1``), deprecated keys,
``device=`` in ``select_device``'s forms, model stems, every ``resume=`` form, ``cfg=`` files of ``yolo copy-cfg``;
and every other ``yolo`` command handed to Ultralytics' own entry point unchanged (``alias yolo=yolosafe``).

Trainings are dry runs (every check a real run makes, nothing trained): the ``train kwargs`` the dry run prints are
compared with what Ultralytics' own ``entrypoint`` reads from the same words (tests/test_yolowords.py's harness)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests import tinysets
from tests.conftest import YOLOSAFE, cli_env
from tests.test_cli import FOUR, assert_usage_error
from tests.test_misuse import fake_run
from tests.test_yolowords import entrypoint_reads

YOLO = str(Path(YOLOSAFE).with_name("yolo"))
OWNED = {"batch", "device", "project", "name", "exist_ok", "nbs", "resume", "mode", "task", "model", "data"}


@pytest.fixture
def data(tmp_path: Path) -> str:
    return str(tinysets.roboflow(tmp_path / "rf", "detect"))


def train_kwargs(stdout: str) -> dict:
    line = next(ln for ln in stdout.splitlines() if ln.strip().startswith("train kwargs"))
    return json.loads(line.split("train kwargs", 1)[1])


def _json_like(value):
    return json.loads(json.dumps(value))


FORMS = [  # the words after 'yolosafe', as yolo's docs and tests write them
    "detect train model=yolov8n.yaml data={data} imgsz=32 epochs=1",
    "train detect model=yolov8n.yaml data={data} imgsz=32 epochs=1",
    "train model=yolov8n.yaml data={data} imgsz= 32 epochs =1, cache = disk rect cos_lr",
    "train model=yolov8n.yaml data={data} imgsz=32 lr0=1e-3 classes=0,1",
    "train model=yolov8n.yaml data={data} imgsz=32 boxes=False hide_labels=True label_smoothing=0.1",
    "model=yolov8n.yaml data={data} imgsz=32 mode=train",
    "train model=yolov8n.yaml data={data} imgsz=32 --epochs=1 plots=False",
]


@pytest.mark.slow  # Ultralytics in a child process, seconds a case
@pytest.mark.parametrize("form", FORMS)
def test_yolo_forms_train_with_what_yolo_reads(run_cli, data, form, monkeypatch):
    words = form.format(data=data).split()
    result = run_cli(*words, "--dry-run")
    assert result.returncode == 0, result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    theirs = entrypoint_reads([w for w in words if w != "--dry-run"], monkeypatch)
    assert theirs[0] == "ok"
    ours = train_kwargs(result.stdout)
    expected = {k: _json_like(v) for k, v in theirs[1].items() if k not in OWNED}
    assert {k: ours.get(k) for k in expected} == expected


@pytest.mark.slow  # Ultralytics in a child process, seconds a case
@pytest.mark.parametrize(("words", "shown"), [
    (["name=001"], "runs/detect/001 "),
    (["device=cuda:0"], "device           0 "),
    (["device=(0,1)"], "device           0,1 "),
    (["device=[0, 1]"], "device           0,1 "),
    (["batch=-1", "device=cpu"], "batch            16 "),
    (["batch=0.7", "device=cpu"], "batch            16 "),
])
def test_yolosafe_keys_in_every_form_yolo_takes(run_cli, data, words, shown):
    result = run_cli("train", "model=yolov8n.yaml", f"data={data}", "imgsz=32", *words, "--dry-run",
                     env={"YOLOSAFE_FAKE_GPUS": "2x24GB"})
    assert result.returncode == 0, result.stderr + result.stdout
    assert shown in result.stdout, result.stdout


def test_differences_from_yolo_are_said(run_cli, data):
    result = run_cli("train", f"data={data}", "imgsz=32", "exist_ok=True", "device=cpu", "batch=-1", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "exist_ok=True: yolosafe never writes into an earlier run" in result.stderr
    assert "no model given: yolosafe trains yolov8n.yaml" in result.stderr
    assert "AutoBatch is for GPUs; using Ultralytics' default batch 16" in result.stderr


@pytest.mark.parametrize(("words", "said"), [
    (["name="], "missing 'name' value"),
    (["epochs"], "missing an '=' sign"),
    (["epoch=3"], "did you mean 'epochs'"),
    (["imgsz=[3,"], "unmatched"),
    (["model=yolov8n"], "--download"),  # a release name as YOLO() resolves it: yolov8n.pt, not here offline
    (["resume=True"], "model=RUN/weights/last.pt"),
    (["resume=runs/detect/none"], "not a yolosafe run directory"),
    (["model=runs/detect/none/weights/last.pt", "resume=True"], "not a yolosafe run directory"),
    (["resume=runs/detect/none/weights/last.pt"], "not a yolosafe run directory"),
    (["cfg=missing.yaml"], "cfg="),
    (["val=off"], "must be a bool"),  # yolo train refuses it too (check_cfg)
])
def test_refused_yolo_words_are_one_line(run_cli, data, words, said):
    given = [] if any(w.startswith("resume=") for w in words) else [f"data={data}"]  # a resume keeps its data
    result = run_cli("train", *given, *words, "--dry-run")
    assert_usage_error(result, said)
    assert result.stderr.count("yolosafe:") == 1


@pytest.mark.parametrize("words", [["resume={run}"], ["resume={run}/weights/last.pt"],
                                   ["model={run}/weights/last.pt", "resume=True"], ["model={run}/weights/last.pt",
                                                                                    "resume"]])
def test_every_resume_form_resumes_the_run(run_cli, tmp_path, words):
    run = fake_run(tmp_path)
    result = run_cli("train", *(w.format(run=run) for w in words), "--dry-run", env=FOUR)
    assert result.returncode == 0, result.stderr + result.stdout
    assert f"resumed from {run / 'weights' / 'last.pt'}" in result.stdout and "spec-2.json" in result.stdout


@pytest.mark.slow  # Ultralytics in a child process, seconds a case
def test_copy_cfg_then_cfg_trains_with_its_keys(run_cli, tmp_path, data):
    copied = run_cli("copy-cfg")  # Ultralytics' own command
    assert copied.returncode == 0, copied.stderr
    cfg = tmp_path / "default_copy.yaml"
    cfg.write_text(cfg.read_text().replace("lr0: 0.01", "lr0: 0.02"))
    result = run_cli("train", f"cfg={cfg}", "model=yolov8n.yaml", f"data={data}", "imgsz=32", "--dry-run")
    assert result.returncode == 0, result.stderr + result.stdout
    assert train_kwargs(result.stdout)["lr0"] == 0.02


def test_yolosafe_alone_shows_its_help():
    result = subprocess.run([YOLOSAFE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Usage" in result.stdout, result.stderr


@pytest.mark.slow  # Ultralytics in a child process, seconds a case
@pytest.mark.parametrize("words", [["version"], ["cfg"], ["val", "model=missing.pt"], ["predict", "model=missing.pt"],
                                   ["export", "model=missing.pt"], ["detect", "val", "model=missing.pt"]])
def test_other_yolo_commands_are_ultralytics_own(tmp_path, shared_cache, words):
    """``alias yolo=yolosafe``: the same output and exit status as ``yolo`` itself."""
    ours, theirs = (subprocess.run([exe, *words], cwd=tmp_path, env=cli_env(shared_cache), capture_output=True,
                                   text=True, timeout=300) for exe in (YOLOSAFE, YOLO))
    assert ours.returncode == theirs.returncode, ours.stderr
    assert _lines(ours.stdout) == _lines(theirs.stdout)
    assert _lines(ours.stderr)[-1:] == _lines(theirs.stderr)[-1:]


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "Arguments received" not in ln]


def test_batch_auto_never_picks_more_than_the_training_set(run_cli, data):
    result = run_cli("train", "model=yolov8n.yaml", f"data={data}", "imgsz=32", "--batch", "auto", "--dry-run",
                     env={"YOLOSAFE_FAKE_GPUS": "1x24GB"})
    assert result.returncode == 0, result.stderr
    assert f"batch            {tinysets.TRAIN} total" in result.stdout, result.stdout
    assert f"the training set holds {tinysets.TRAIN} images" in result.stderr


@pytest.mark.slow  # Ultralytics in a child process, seconds a case
@pytest.mark.parametrize(("words", "said"), [
    (["callbacks=no_such_module:on_fit_epoch_end"], "cannot be loaded"),
    (["callbacks=tests.test_usercode:on_fit_epoch_end", "trainer=tests.test_usercode:on_fit_epoch_end"],
     "or a subclass of it"),
    (["trainer=ultralytics.models.yolo.classify:ClassificationTrainer"], "DetectionTrainer or a subclass"),
])
def test_user_code_a_rank_could_not_use_is_one_line(run_cli, data, words, said):
    result = run_cli("train", "model=yolov8n.yaml", f"data={data}", "imgsz=32", *words, "--dry-run",
                     env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert_usage_error(result, said)


def test_user_code_by_name_passes_the_check(run_cli, data):
    result = run_cli("train", "model=yolov8n.yaml", f"data={data}", "imgsz=32", "--dry-run",
                     "callbacks=tests.test_usercode:on_fit_epoch_end",
                     "trainer=ultralytics.models.yolo.detect:DetectionTrainer",
                     env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 0, result.stderr
