"""The input check's verdict cache: a repeated check of unchanged inputs answers without the child; a change to any
input or version misses; corrupt or foreign entries are ignored, never trusted. One real child answers for the
module (Ultralytics' real acceptance of a real tiny dataset); every case after it is a lookup."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests import tinysets
from yolosafe.planning import checkcache, validate
from yolosafe.rundir.childrecords import CheckRefusal, CheckRequest
from yolosafe.supervisor import children


@pytest.fixture(scope="module")
def asked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A dataset of its own (the cases change it), its request, and the real check's answer kept in a cache of its
    own."""
    root = tmp_path_factory.mktemp("checkcache")
    data = tinysets.rooted(root / "set", "detect")
    env = {"YOLOSAFE_CACHE": str(root / "cache"), "YOLO_CONFIG_DIR": str(root / "ultralytics"), "YOLO_OFFLINE": "1"}
    request = CheckRequest(model="yolov8n.yaml", data=str(data), task=None, overrides={"epochs": 1, "imgsz": 32},
                           project=None, name="train")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    elsewhere = dataclasses.replace(request, project=str(root / "projects" / "one"), name="first")
    try:
        result = validate.verdict(request, children.input_check)
        validate.verdict(elsewhere, children.input_check)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return {"root": root, "data": data, "env": env, "request": request, "result": result}


@pytest.fixture
def cache(asked: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """The module's cache in this test's environment, the child forbidden: every answer here is a lookup."""
    for k, v in asked["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)

    def no_child(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the input check's child was started")

    monkeypatch.setattr(children.proc, "run_module", no_child)
    return asked


def entry_file(request: CheckRequest) -> Path:
    return Path(os.environ["YOLOSAFE_CACHE"]) / checkcache.FOLDER / f"{checkcache.key(request)}.json"


def test_a_repeated_check_answers_from_the_cache_without_the_child(cache: dict[str, Any]) -> None:
    kept = checkcache.lookup(cache["request"])
    assert kept is not None
    assert dataclasses.replace(kept, project="") == dataclasses.replace(cache["result"], project="")
    assert kept.task == "detect" and kept.train_images == cache["result"].train_images > 0
    # A dry run and a training of the same inputs share the answer.
    assert checkcache.lookup(dataclasses.replace(cache["request"], dry_run=True)) == kept


def test_a_relative_runs_folder_is_resolved_in_the_directory_that_asks(cache: dict[str, Any],
                                                                       tmp_path: Path) -> None:
    kept = checkcache.lookup(cache["request"])
    assert kept.project == str(tmp_path.resolve() / "runs" / "detect")


def test_another_absolute_project_shares_the_answer_another_name_does_not(cache: dict[str, Any],
                                                                         tmp_path: Path) -> None:
    other = dataclasses.replace(cache["request"], project=str(tmp_path / "another" / "project"), name="first")
    kept = checkcache.lookup(other)  # the fixture asked for name=first under another absolute project
    assert kept is not None and kept.project == str(tmp_path / "another" / "project") and kept.name == "first"
    relative = dataclasses.replace(cache["request"], project="mine")
    assert checkcache.lookup(relative) is None  # under runs/<task>: another answer, asked once
    # the answer holds Ultralytics' name for the run (name=model: the model's stem): never another request's
    assert checkcache.lookup(dataclasses.replace(cache["request"], name="model")) is None
    assert checkcache.lookup(dataclasses.replace(cache["request"], name="second")) is None


@pytest.mark.parametrize("change", ["request", "ultralytics", "torch", "code", "env", "relative"])
def test_a_changed_request_version_or_environment_misses(cache: dict[str, Any], change: str,
                                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    request = cache["request"]
    if change == "request":
        request = dataclasses.replace(request, overrides={**request.overrides, "epochs": 2})
    elif change in ("ultralytics", "torch"):
        real = checkcache._version
        monkeypatch.setattr(checkcache, "_version", lambda name: "0.0.0" if name == change else real(name))
    elif change == "code":
        monkeypatch.setattr(checkcache, "_code_digest", lambda: "another")
    elif change == "env":
        monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "elsewhere"))
    else:  # the same relative name now means a file in this directory
        shutil.copy(Path(cache["data"]), tmp_path / "data.yaml")
        request = dataclasses.replace(request, data="data.yaml")
        assert checkcache.lookup(request) is None
        return
    assert checkcache.lookup(request) is None


@pytest.mark.parametrize("change", ["data-yaml", "train-image-added", "label-replaced", "val-image-removed",
                                    "settings"])
def test_a_changed_input_file_misses(cache: dict[str, Any], change: str, tmp_path: Path) -> None:
    request = cache["request"]
    backup = tmp_path / "backup"
    root = Path(cache["data"]).parent
    shutil.copytree(root, backup)
    settings = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics" / "settings.json"
    settings_text, settings_time = settings.read_text(), settings.stat().st_mtime_ns
    try:
        assert checkcache.lookup(request) is not None
        if change == "data-yaml":
            data = Path(cache["data"])
            data.write_text(data.read_text() + "\n# edited\n")
        elif change == "train-image-added":
            image = next((root / "images" / "train").iterdir())
            shutil.copy(image, image.with_name("extra" + image.suffix))
        elif change == "label-replaced":
            label = next((root / "labels" / "train").iterdir())
            fresh = label.with_name(label.name + ".new")
            fresh.write_text("0 0.5 0.5 0.2 0.2\n" * 7)
            fresh.replace(label)  # how editors and tools save: a new file renamed over the old
        elif change == "val-image-removed":
            next((root / "images" / "val").iterdir()).unlink()
        else:
            settings.write_text(settings_text.replace('"sync": true', '"sync": false'))
        assert checkcache.lookup(request) is None
    finally:
        shutil.rmtree(root)
        shutil.copytree(backup, root)  # copytree keeps the times: the module's entry is valid again
        settings.write_text(settings_text)
        os.utime(settings, ns=(settings_time, settings_time))


@pytest.mark.parametrize("damage", ["not-json", "binary", "foreign-key", "wrong-types", "refusal", "a-list"])
def test_a_corrupt_or_foreign_entry_is_ignored(cache: dict[str, Any], damage: str) -> None:
    request = dataclasses.replace(cache["request"], overrides={"epochs": 3, "imgsz": 32, "lr0": 0.5,  # its own entry
                                                               "cos_lr": damage})
    checkcache.store(request, dataclasses.replace(cache["result"], reads=[]))
    path = entry_file(request)
    entry = json.loads(path.read_text())
    assert checkcache.lookup(request) is not None
    if damage == "not-json":
        path.write_text('{"format": 1, "key": ')
    elif damage == "binary":
        path.write_bytes(b"\xff\xfe\x00garbage")
    elif damage == "foreign-key":
        path.write_text(json.dumps({**entry, "key": "0" * 64}))
    elif damage == "wrong-types":
        path.write_text(json.dumps({**entry, "result": {**entry["result"], "task": 5}}))
    elif damage == "refusal":
        path.write_text(json.dumps({**entry, "result": {**entry["result"], "error": "refused"}}))
    else:
        path.write_text("[1, 2, 3]")
    assert checkcache.lookup(request) is None


def test_refusals_answers_with_notes_and_downloads_are_not_kept(cache: dict[str, Any]) -> None:
    base = cache["request"]
    for name, result in (("refused", CheckRefusal("no")),
                         ("noted", dataclasses.replace(cache["result"], notes=["a dry run"], reads=[]))):
        request = dataclasses.replace(base, overrides={**base.overrides, "cache": name})
        checkcache.store(request, result)
        assert not entry_file(request).exists()
    downloading = dataclasses.replace(base, download=True)
    assert checkcache.lookup(downloading) is None  # a download is asked for: the check runs and fetches


def test_an_unwritable_cache_costs_only_the_time(cache: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("YOLOSAFE_CACHE", str(blocker))  # a file where the folder should be
    checkcache.store(dataclasses.replace(cache["request"], overrides={}),
                     dataclasses.replace(cache["result"], reads=[]))
