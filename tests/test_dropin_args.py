"""``yolo train``'s own argument names as yolosafe options, and what ``--data`` resolves to before Ultralytics is
asked: pure functions, no process, no training."""

from __future__ import annotations

import pytest

from yolosafe.planning import datasets, options
from yolosafe.planning.validate import InputError


@pytest.mark.parametrize(("words", "expected"), [
    (["model=yolov8n.yaml", "data=coco8.yaml", "epochs=3", "imgsz=320"],
     {"model": "yolov8n.yaml", "data": "coco8.yaml", "epochs": 3, "imgsz": 320}),
    (["device=0,1,2,3"], {"gpus": "0,1,2,3"}),
    (["device=[0, 1]"], {"gpus": "0,1"}),
    (["device=0"], {"gpus": "0"}),
    (["device=cpu"], {"gpus": "cpu"}),
    (["device=-1"], {"gpus": "auto"}),
    (["device=-1,-1"], {"gpus": "auto:2"}),
    (["batch=32"], {"batch": 32}),
    (["batch=-1"], {"batch": "auto"}),
    (["batch=0.7"], {"batch": "auto", "memory_fraction": 0.7}),
    (["nbs=128"], {"effective_batch": 128}),
    (["resume=runs/detect/train3/weights/last.pt"], {"resume_dir": "runs/detect/train3"}),
    (["resume=runs/detect/train3"], {"resume_dir": "runs/detect/train3"}),
    (["project=p", "name=exp"], {"project": "p", "name": "exp"}),
    (["task=segment", "mode=train", "exist_ok=True"],
     {"task": "segment", "differences": ("exist_ok=True: yolosafe never writes into an earlier run; this run gets the "
                                         "next free name",)}),
])
def test_yolo_keys_mean_the_yolosafe_options(words, expected):
    mapped = options.yolo_style({"args": (*words, "lr0=0.02")})
    assert mapped["args"] == ["lr0=0.02"]  # the rest stays Ultralytics' arguments
    assert {k: v for k, v in mapped.items() if k != "args"} == expected


@pytest.mark.parametrize(("given", "batch", "fraction"), [(-1, "auto", None), (0.7, "auto", 0.7), (8, 8, None),
                                                         ("auto", "auto", None), (16.0, 16, None)])
def test_batch_flag_takes_ultralytics_forms(given, batch, fraction):
    mapped = options.yolo_style({"batch": given})
    assert mapped["batch"] == batch and mapped.get("memory_fraction") == fraction


@pytest.mark.parametrize(("given", "words"), [
    ({"epochs": 3, "args": ("epochs=2",)}, ["--epochs 3 and epochs=2 disagree"]),
    ({"gpus": "0", "args": ("device=1",)}, ["--gpus 0 and device=1"]),
    ({"resume_dir": "a", "args": ("resume=b",)}, ["--resume a and resume=b"]),
    ({"args": ("mode=val",)}, ["mode=val"]),
    ({"args": ("resume=True",)}, ["resume=RUN_DIR"]),
    ({"batch": 1.5}, ["--batch 1.5"]),
    ({"args": ("cfg=missing.yaml",)}, ["cfg=missing.yaml"]),
])
def test_contradictions_are_refused(given, words):
    with pytest.raises(InputError) as caught:
        options.yolo_style(given)
    for word in words:
        assert word in str(caught.value)


def test_same_value_twice_is_fine_and_cfg_comes_first(tmp_path):
    assert options.yolo_style({"epochs": 3, "args": ("epochs=3",)})["epochs"] == 3
    cfg = tmp_path / "custom.yaml"
    cfg.write_text("epochs: 5\nlr0: 0.03\nimgsz: 64\n")
    mapped = options.yolo_style({"args": (f"cfg={cfg}", "imgsz=96")})
    assert mapped["epochs"] == 5 and mapped["imgsz"] == 96 and mapped["args"] == ["lr0=0.03"]


def test_data_resolves_directories_and_leaves_unknown_names_to_ultralytics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flowers" / "train").mkdir(parents=True)
    assert datasets.resolve("flowers").yaml_path == (tmp_path / "flowers").resolve()
    named = datasets.resolve("coco8.yaml")
    assert str(named.yaml_path) == "coco8.yaml" and "unknown dataset" in named.hint and "shapes" in named.hint
    with pytest.raises(datasets.DatasetError, match="file not found"):
        datasets.resolve("missing/data.yaml")
    (tmp_path / "datasets.yaml").write_text("datasets:\n  flowers:\n    path: flowers\n")
    assert datasets.resolve("flowers", tmp_path / "datasets.yaml").yaml_path == (tmp_path / "flowers").resolve()
