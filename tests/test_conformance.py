"""Drop-in for ``yolo train``: the same command through Ultralytics' own ``yolo train`` and through ``yolosafe train``
(``yolo`` replaced by ``yolosafe``), on tiny sets of every task in the layouts users bring; both accept or both refuse
each case, and where both really train, their ``args.yaml`` agree apart from the keys yolosafe owns.

Ultralytics runs every case in one child (``ultralytics.cfg.entrypoint``, its ``yolo`` command): a case it accepts
stops when its first epoch starts (the model, the data, the loaders and the optimizer are set up by then), except the
few that train to the end on both sides. yolosafe's accepted cases are dry runs (every check a real run makes), those
few real 1-epoch trainings, and its refusals stop at the input check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests import tinysets
from tests.conftest import YOLOSAFE

pytestmark = pytest.mark.slow

COMMON = "epochs=1 imgsz=32 batch=2 workers=0 device=cpu plots=False"
# id: (model, data, extra arguments, what both must do: "dry" accept, "train" accept and train, "refuse")
CASES = {
    "detect-roboflow": ("yolov8n.yaml", "rf/data.yaml", "", "train"),
    "segment-lists": ("yolov8n-seg.yaml", "seglist/data.yaml", "", "train"),
    "classify-imagefolder": ("yolov8n-cls.yaml", "cls", "", "train"),
    "detect-rooted-dict": ("yolov8n.yaml", "rooted/data.yaml", "", "dry"),
    "detect-lists": ("yolov8n.yaml", "detlist/data.yaml", "", "dry"),
    "detect-datasets-dir": ("yolov8n.yaml", "indatasets.yaml", "", "dry"),
    "detect-args": ("yolov8n.yaml", "rf/data.yaml", "lr0=0.02 optimizer=SGD cos_lr=True close_mosaic=0", "dry"),
    "pose-rooted": ("yolov8n-pose.yaml", "pose/data.yaml", "", "dry"),
    "obb-roboflow": ("yolov8n-obb.yaml", "obb/data.yaml", "", "dry"),
    "classify-datasets-dir": ("yolov8n-cls.yaml", "clsindatasets", "", "dry"),
    "refuse-names-empty": ("yolov8n.yaml", "nonames.yaml", "", "refuse"),
    "refuse-empty-folder": ("yolov8n.yaml", "empty/data.yaml", "", "refuse"),
    "refuse-amp": ("yolov8n.yaml", "rf/data.yaml", "amp=maybe", "refuse"),
    "refuse-optimizer": ("yolov8n.yaml", "rf/data.yaml", "optimizer=Adamm", "refuse"),
    "refuse-classify-on-detect": ("yolov8n-cls.yaml", "rf/data.yaml", "", "refuse"),
    "refuse-pose-on-detect": ("yolov8n-pose.yaml", "rf/data.yaml", "", "refuse"),
}
# args.yaml keys yolosafe owns: the batch split (--batch), the device (--gpus), where the run goes (its folder, never
# reused); nbs and weight_decay are yolo train's (yolosafe passes the user's nbs, Ultralytics' 64 by default)
OWNED = {"batch", "device", "save_dir", "project", "name", "exist_ok"}

ULTRALYTICS_RUNNER = r"""
import json, os, sys
from ultralytics.cfg import entrypoint
from ultralytics.utils import SETTINGS
from ultralytics.utils.callbacks.base import default_callbacks

class Accepted(Exception):
    pass

def stop(trainer):
    raise Accepted

SETTINGS.update(datasets_dir=sys.argv[2])
results = {}
for case in json.loads(sys.argv[1]):
    hooks = default_callbacks["on_train_epoch_start"]
    if not case["train"]:
        hooks.append(stop)
    try:
        entrypoint(case["command"])
        results[case["id"]] = {"accepted": True}
    except Accepted:
        results[case["id"]] = {"accepted": True}
    except BaseException as exc:
        results[case["id"]] = {"accepted": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        if stop in hooks:
            hooks.remove(stop)
print("RESULTS " + json.dumps(results))
"""


def environment(root: Path) -> dict[str, str]:
    """One Ultralytics settings folder (its datasets dir inside ``root``), offline, outside any test runner."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLOSAFE_", "PYTORCH_", "PYTEST_"))}
    return env | {"YOLO_CONFIG_DIR": str(root / "ultralytics-config"), "YOLOSAFE_CACHE": str(root / "cache"),
                  "YOLO_OFFLINE": "1"}


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every layout once, in one folder the commands run in (relative paths resolve from it)."""
    root = tmp_path_factory.mktemp("conformance")
    tinysets.roboflow(root / "rf", "detect")
    tinysets.listed(root / "seglist", "segment")
    tinysets.listed(root / "detlist", "detect")
    tinysets.imagefolder(root / "cls")
    tinysets.rooted(root / "rooted", "detect")
    tinysets.rooted(root / "pose", "pose")
    tinysets.roboflow(root / "obb", "obb")
    datasets = root / "datasets"  # Ultralytics' datasets dir: a relative path: and a bare name resolve there
    tinysets.rooted(datasets / "reldet", "detect", path_value="reldet")
    (root / "indatasets.yaml").write_text((datasets / "reldet" / "data.yaml").read_text())
    tinysets.imagefolder(datasets / "clsindatasets")
    (root / "nonames.yaml").write_text("path: rooted\ntrain: images/train\nval: images/val\nnames: []\n")
    tinysets.rooted(root / "empty", "detect")
    for image in (root / "empty" / "images" / "train").iterdir():
        image.unlink()
    return root


def command(case: str, project: Path) -> str:
    model, data, extra, _ = CASES[case]
    return f"train model={model} data={data} {COMMON} project={project} name={case} {extra}".strip()


@pytest.fixture(scope="module")
def ultralytics_results(sets: Path) -> dict[str, dict]:
    """Every case through Ultralytics' own ``yolo train``, in one child process."""
    cases = [{"id": case, "command": command(case, sets / "ultralytics-runs"), "train": CASES[case][3] == "train"}
             for case in CASES]
    done = subprocess.run([sys.executable, "-c", ULTRALYTICS_RUNNER, json.dumps(cases), str(sets / "datasets")],
                          cwd=sets, env=environment(sets), capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULTS "))


def yolosafe(sets: Path, case: str, *flags: str) -> subprocess.CompletedProcess[str]:
    words = command(case, sets / "yolosafe-runs").split()
    return subprocess.run([YOLOSAFE, *words, *flags], cwd=sets, env=environment(sets), capture_output=True,
                          text=True, timeout=300)


def args_yaml(run: Path) -> dict:
    return yaml.safe_load((run / "args.yaml").read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_yolosafe_accepts_what_yolo_train_accepts(sets, ultralytics_results, case):
    expected = CASES[case][3]
    theirs = ultralytics_results[case]
    assert theirs["accepted"] == (expected != "refuse"), theirs
    result = yolosafe(sets, case, *(["--dry-run"] if expected == "dry" else []))
    if expected == "refuse":
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
        assert not (sets / "yolosafe-runs" / case).exists()
        return
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    if expected == "dry":
        return
    ours, reference = args_yaml(sets / "yolosafe-runs" / case), args_yaml(sets / "ultralytics-runs" / case)
    for key in ("data", "model"):  # yolosafe passes the dataset as the absolute path it resolved
        ours[key], reference[key] = (str((sets / str(d[key])).resolve()) for d in (ours, reference))
    differ = {k: (ours.get(k), reference.get(k)) for k in set(ours) | set(reference)
              if k not in OWNED and ours.get(k) != reference.get(k)}
    assert not differ, differ


def test_every_task_of_ultralytics_runs_under_its_own_folder(sets):
    """Each task's runs go where Ultralytics puts them: runs/<task>/, asked of Ultralytics."""
    from yolosafe.training.trainer import TRAINERS

    assert {"detect", "segment", "pose", "obb", "classify", "semantic", "depth"} <= set(TRAINERS)
    result = subprocess.run([YOLOSAFE, "train", "model=yolo26n-sem.yaml", "data=rf/data.yaml", "--dry-run",
                             *COMMON.split()], cwd=sets, env=environment(sets), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{sets / 'runs' / 'semantic' / 'train'} (not created" in result.stdout, result.stdout


def test_one_download_for_all_ranks_and_attempts(sets, tmp_path):
    """--download: a segmentation set is fetched once, by the input check, before two fake-GPU ranks start; an OOM on
    rank 1 is recovered with half the batch and yolosafe's validation batch, and the retry downloads nothing."""
    counter, source = tmp_path / "downloads", tinysets.rooted(tmp_path / "source", "segment").parent
    script = (f"import pathlib, shutil\nc = pathlib.Path({str(counter)!r})\n"
              "c.write_text(str(int(c.read_text()) + 1) if c.exists() else '1')\n"
              f"shutil.copytree({str(source)!r}, {str(tmp_path / 'fetched')!r})\n")
    (tmp_path / "dl.yaml").write_text(yaml.safe_dump({
        "path": str(tmp_path / "fetched"), "train": "images/train", "val": "images/val", "names": ["thing"],
        "download": script}))
    env = environment(sets) | {"YOLOSAFE_FAKE_GPUS": "2x24GB", "YOLOSAFE_INJECT_OOM": "phase=train,epoch=0,rank=1"}
    words = ["train", "model=yolov8n-seg.yaml", "data=dl.yaml", "device=0,1", "batch=8", "nbs=16", "epochs=1",
             "imgsz=32", "workers=0", "plots=False", "name=dl", "--val-batch", "1"]
    refused = subprocess.run([YOLOSAFE, *words], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--download" in refused.stderr and not counter.exists(), refused.stderr
    done = subprocess.run([YOLOSAFE, *words, "--download"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert counter.read_text() == "1"
    story = json.loads((tmp_path / "runs" / "segment" / "dl" / "yolosafe.json").read_text())
    assert story["outcome"] == "completed" and [a["batch"] for a in story["attempts"]] == [8, 4]
    assert {a["val_batch"] for a in story["attempts"]} == {1}


def test_a_seeded_run_has_yolo_trains_results(sets, tmp_path):
    """The same seeded one-process training through ``yolo train`` and through ``yolosafe train`` (Ultralytics'
    validation batch, twice the train batch, given as --val-batch): every results.csv column both write, to 1e-6.
    yolosafe's own columns (the epoch's memory peaks) are extra; ``time`` is the wall clock."""
    words = ["train", "model=yolov8n.yaml", "data=rf/data.yaml", *COMMON.split(), "seed=3"]
    theirs = subprocess.run([sys.executable, "-c", "import sys\nfrom ultralytics.cfg import entrypoint\n"
                             "entrypoint(' '.join(sys.argv[1:]))", *words, f"project={tmp_path}", "name=yolo"],
                            cwd=sets, env=environment(sets), capture_output=True, text=True, timeout=600)
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    ours = subprocess.run([YOLOSAFE, *words, f"project={tmp_path}", "name=yolosafe", "--val-batch", "4"], cwd=sets,
                          env=environment(sets), capture_output=True, text=True, timeout=600)
    assert ours.returncode == 0, ours.stdout[-2000:] + ours.stderr[-2000:]
    rows = {}
    for name in ("yolo", "yolosafe"):
        header, *lines = (tmp_path / name / "results.csv").read_text().strip().splitlines()
        rows[name] = [dict(zip(header.split(","), line.split(","), strict=True)) for line in lines]
    assert len(rows["yolo"]) == len(rows["yolosafe"]) == 1
    columns = set(rows["yolo"][0]) - {"time"}
    assert columns <= set(rows["yolosafe"][0]) and any(c.startswith("metrics/") for c in columns)
    for a, b in zip(rows["yolo"], rows["yolosafe"], strict=True):
        differ = {c: (a[c], b[c]) for c in columns if abs(float(a[c]) - float(b[c])) > 1e-6}
        assert not differ, differ
