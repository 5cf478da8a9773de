"""The records planning exchanges with its two children (the input check, the fake pass): each written and read by the
same code, a damaged one one line; the children started outside planning, their failures one line; the fake pass's
cache keeps the same record."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from yolosafe.planning import validate
from yolosafe.planning.memory import model as memmodel
from yolosafe.planning.memory import planner
from yolosafe.planning.memory import table as memtable
from yolosafe.rundir import childrecords
from yolosafe.rundir.childrecords import CheckAnswer, CheckRefusal, CheckRequest, FakePassRequest, FakePassResult
from yolosafe.rundir.typed import RecordError
from yolosafe.supervisor import children

REQUEST = CheckRequest(model="yolov8n.yaml", data="/data/set.yaml", task=None,
                       overrides={"epochs": 1, "imgsz": 32, "lr0": 0.01}, project="/runs", name="train",
                       user_code={"callbacks": [["on_fit_epoch_end", {"module": "mine", "name": "hook"}]]})
ANSWER = CheckAnswer(task="detect", project="/runs", project_in_cwd=None, project_is_asked=True, train_images=7,
                     dataset={"objects": {"train": [1, 2]}, "val_ratios": [1.0, 0.75]}, notes=["a note"],
                     reads=["/data/set.yaml", "/data/images/train"])


def shipped_entries() -> dict[str, Any]:
    return json.loads(resources.files("yolosafe").joinpath("data/memtable.json").read_text())["models"]


def test_each_record_reads_back_as_it_was_written(tmp_path: Path) -> None:
    REQUEST.save(tmp_path / "request.json")
    assert CheckRequest.load(tmp_path / "request.json") == REQUEST
    for result in (ANSWER, CheckRefusal("--data x.yaml: no such file")):
        childrecords.save_check_result(tmp_path / "result.json", result)
        assert childrecords.load_check_result(tmp_path / "result.json") == result
    for request in (FakePassRequest("my.yaml"), FakePassRequest("yolo11s.yaml", 1280, loss_only=True)):
        assert FakePassRequest.from_args(request.args()) == request
    for name, entry in shipped_entries().items():  # the table's entries are the fake pass's own record
        record = FakePassResult.from_dict(entry, name)
        assert record.to_dict() == entry and FakePassResult.from_json(record.to_json()) == record
    partial = FakePassResult(imgsz=640, task="detect", loss_error="RuntimeError: no")  # what is not measured: absent
    assert partial.to_dict() == {"imgsz": 640, "task": "detect", "loss_error": "RuntimeError: no"}
    partial.save(tmp_path / "terms.json")
    assert FakePassResult.load(tmp_path / "terms.json") == partial


@pytest.mark.parametrize("damage", ["not-json", "binary", "a-list", "missing", "unknown", "wrong-type", "notes"])
def test_a_damaged_record_is_one_line_naming_the_file(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "result.json"
    good = ANSWER.to_dict()
    text = {"not-json": '{"task": ', "a-list": "[1, 2]",
            "missing": json.dumps({k: v for k, v in good.items() if k != "task"}),
            "unknown": json.dumps({**good, "colour": "red"}), "wrong-type": json.dumps({**good, "train_images": "7"}),
            "notes": json.dumps({**good, "notes": [1]})}.get(damage)
    path.write_bytes(b"\xff\xfe\x00garbage") if text is None else path.write_text(text)
    with pytest.raises(RecordError) as caught:
        childrecords.load_check_result(path)
    assert str(path) in str(caught.value) and "damaged" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(RecordError, match="damaged"):
        FakePassResult.from_json(text or "\xff")
    with pytest.raises(RecordError, match="loss_curve"):
        FakePassResult.from_dict({"imgsz": 640, "loss_curve": [[1, 2, 3]]})


def child(monkeypatch: pytest.MonkeyPatch, stdout: str = "", stderr: str = "", code: int = 0,
          result: str | None = None) -> list[list[str]]:
    """The children's process started by a stand-in that answers as given (the parent's side is what is tested)."""
    started: list[list[str]] = []

    def run_module(module: str, args: list[str], timeout: float, env: Any = None) -> Any:
        started.append([module, *args])
        if result is not None:
            Path(args[1]).write_text(result)
        return subprocess.CompletedProcess([module, *args], code, stdout, stderr)

    monkeypatch.setattr(children.proc, "run_module", run_module)
    return started


def test_a_child_that_fails_or_answers_damage_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    child(monkeypatch, stderr="Traceback...\nMemoryError: out of host memory\n", code=1)
    with pytest.raises(validate.InputError,
                       match=r"^Ultralytics. input check failed: MemoryError: out of host memory$"):
        children.input_check(REQUEST)
    child(monkeypatch, result='{"task": "detect"')
    with pytest.raises(validate.InputError, match=r"input check failed: the input check's result .*damaged, not JSON"):
        children.input_check(REQUEST)
    child(monkeypatch, stderr="ImportError: no torch\n", code=1)
    with pytest.raises(memmodel.UnknownModel, match=r"^my.yaml: the fake-tensor memory pass failed \(ImportError"):
        children.fake_pass(FakePassRequest("my.yaml"))
    child(monkeypatch, stdout="printed by a module\n")
    with pytest.raises(memmodel.UnknownModel, match=r"failed .*damaged, not JSON"):
        children.fake_pass(FakePassRequest("my.yaml"))


def test_the_input_check_receives_the_request_and_its_answer_is_kept(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    monkeypatch.setenv("YOLOSAFE_CACHE", str(tmp_path / "cache"))
    request = dataclasses.replace(REQUEST, user_code=None, data=str(tmp_path / "set.yaml"))
    asked: list[CheckRequest] = []
    answer = dataclasses.replace(ANSWER, notes=[], reads=[])

    def ask(given: CheckRequest) -> CheckAnswer:
        asked.append(given)
        return answer

    assert validate.verdict(request, ask) == answer and validate.verdict(request, ask) == answer
    assert asked == [request]  # the second one is the kept answer
    started = child(monkeypatch, result=json.dumps(answer.to_dict()))
    assert children.input_check(request) == answer
    module, request_file, _ = started[0]
    assert module == children.INPUT_CHECK and not Path(request_file).exists()  # a throw-away folder


def test_the_fake_pass_runs_once_and_its_record_is_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("YOLOSAFE_CACHE", str(tmp_path / "cache"))
    yaml = tmp_path / "my-net.yaml"
    yaml.write_text("# a custom model\n")
    measured = FakePassResult.from_dict(shipped_entries()["yolov8n"])
    asked: list[FakePassRequest] = []

    def fake_pass(request: FakePassRequest) -> FakePassResult:
        asked.append(request)
        return measured

    with pytest.raises(memmodel.UnknownModel, match="no memory figures yet"):
        planner.model_terms(str(yaml))  # no function to run the child: planning starts none
    terms = planner.model_terms(str(yaml), fake_pass)
    assert asked == [FakePassRequest(str(yaml))]
    assert terms == memtable.terms_from_entry("my-net", measured, measured.source)
    assert planner.model_terms(str(yaml)) == terms  # kept: no child needed any more
    kept = next((tmp_path / "cache" / "memterms").glob("my-net-*.json"))
    kept.write_text('{"imgsz": ')  # damaged: measured again
    assert planner.model_terms(str(yaml), fake_pass) == terms and len(asked) == 2
    assert FakePassResult.load(kept) == measured
