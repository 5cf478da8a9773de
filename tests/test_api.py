"""The library under the CLI: ``yolosafe.train`` / ``yolosafe.plan``, their keywords, their exceptions, a cheap
``import yolosafe``, and a terminal that is any text stream (a notebook's has no ``.buffer`` and no descriptor)."""

from __future__ import annotations

import ctypes
import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import yolosafe
from tests.conftest import cli_env, run_dir_of
from yolosafe import errors, proc
from yolosafe.api import calls
from yolosafe.api.result import Run
from yolosafe.exits import Exit
from yolosafe.planning import allocator, datasets, nodes, trainplan, validate
from yolosafe.planning.memory import model as memmodel
from yolosafe.rundir import files as rundir


class NotebookStream:
    """A text stream as a notebook kernel gives one: write and flush, no buffer, no file descriptor."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        assert isinstance(text, str)
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_import_is_cheap_and_lists_the_api():
    code = ("import sys, yolosafe; assert callable(yolosafe.train) and callable(yolosafe.plan); "
            "print(sorted(m for m in ('torch', 'ultralytics', 'click', 'yaml', 'yolosafe.api.calls') "
            "if m in sys.modules))")
    lazy = subprocess.run([sys.executable, "-c", code.replace("assert callable(yolosafe.train) and "
                                                              "callable(yolosafe.plan); ", "")],
                          capture_output=True, text=True, check=True)
    assert lazy.stdout.strip() == "[]"  # nothing heavy before the first use
    used = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "torch" not in used.stdout and "ultralytics" not in used.stdout
    assert {"train", "plan", "Run", "Plan", "UsageError", "TrainingInterrupted"} <= set(dir(yolosafe))


def test_input_errors_are_usage_errors():
    for cls in (validate.InputError, trainplan.PlanError, allocator.AllocConfError, nodes.NodesError,
                datasets.DatasetError, memmodel.UnknownModel):
        assert issubclass(cls, errors.UsageError) and issubclass(cls, ValueError if cls is not memmodel.UnknownModel
                                                                  else LookupError)
    assert issubclass(errors.TrainingInterrupted, KeyboardInterrupt)
    for cls in (errors.OutOfMemoryRetriesExhausted, errors.TrainingFailed, errors.TrainingInterrupted):
        assert issubclass(cls, errors.TrainingError) and issubclass(cls, errors.YolosafeError)
    assert errors.OutOfMemoryRetriesExhausted("x", None).exit_code == Exit.OOM_EXHAUSTED


def test_keywords_become_the_command_lines_options():
    given, where = calls.given_of({"model": Path("m.yaml"), "device": [0, 1, 2, 3], "batch": 64, "epochs": 3,
                                   "effective_batch": 128, "lr0": 0.01, "optimizer": "SGD", "cos_lr": True,
                                   "config": "c.yaml", "nnodes": 1})
    assert given == {"model": "m.yaml", "gpus": "0,1,2,3", "batch": 64, "epochs": 3, "effective_batch": 128,
                     "config_file": "c.yaml", "args": ["lr0=0.01", "optimizer=SGD", "cos_lr=True"]}
    assert where == {"nnodes": 1}
    assert trainplan.parse_passthrough(given["args"]) == {"lr0": 0.01, "optimizer": "SGD", "cos_lr": True}
    assert calls.given_of({"device": -1, "batch": -1})[0] == {"gpus": "auto", "batch": "auto"}
    assert calls.given_of({"device": "cpu", "batch": 0.7})[0] == {"gpus": "cpu", "batch": "auto",
                                                                   "memory_fraction": 0.7}
    assert calls.given_of({"gpus": [1], "device": "1"})[0]["gpus"] == "1"
    with pytest.raises(errors.UsageError, match="disagree"):
        calls.given_of({"gpus": "0", "device": [0, 1]})


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"data": "no-such-dataset"}, "no-such-dataset"),
    ({"epochs": 0}, "--epochs 0: must be at least 1"),
    ({"lr00": 0.1}, "lr00"),
    ({"device": ["a"]}, "give GPU ids"),
    ({"dry_run": True}, "yolosafe.plan"),
    ({"data": ["a.yaml", "b.yaml"]}, "several datasets in one call"),  # Ultralytics' MultiTrainer: refused, said
])
def test_bad_input_raises_a_usage_error_before_any_run_directory(tmp_path, monkeypatch, shared_cache, kwargs,
                                                                 message):
    monkeypatch.chdir(tmp_path)
    for key, value in cli_env(shared_cache).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(errors.UsageError, match=message):
        yolosafe.train(**kwargs)
    assert not (tmp_path / "runs").exists()


def test_plan_returns_the_plan(tmp_path, monkeypatch, shared_cache):
    monkeypatch.chdir(tmp_path)
    for key, value in cli_env(shared_cache, {"YOLOSAFE_FAKE_GPUS": "2x24GB"}).items():
        monkeypatch.setenv(key, value)
    found = yolosafe.plan(model="yolov8n.yaml", data="shapes", device=[0, 1], batch=16, imgsz=64,
                          effective_batch=64)
    assert isinstance(found, yolosafe.Plan)
    assert (found.plan.gpus, found.plan.per_gpu_batch, found.plan.accumulate) == ((0, 1), 8, 4)
    assert [g["index"] for g in found.memory["gpus"]] == [0, 1]
    assert found.as_dict()["plan"]["batch"] == 16 and not (tmp_path / "runs").exists()


def test_a_run_reads_back_from_its_story(tmp_path):
    (tmp_path / "yolosafe.json").write_text('{"outcome": "oom_exhausted", "attempts": [{"attempt": 1}], '
                                            '"weights": {"last": "w/last.pt"}, "final_metrics": {"m": 1.0}}')
    run = Run.load(tmp_path)
    assert (run.outcome, run.exit_code, run.last, run.best, dict(run.metrics)) == (
        "oom_exhausted", Exit.OOM_EXHAUSTED, Path("w/last.pt"), None, {"m": 1.0})
    assert run.attempts[0].attempt == 1 and not run.completed
    with pytest.raises(errors.UsageError):
        Run.load(tmp_path / "nothing")


def test_child_output_reaches_a_text_stream_without_buffer(monkeypatch, tmp_path):
    stream = NotebookStream()
    monkeypatch.setattr(sys, "stdout", stream)
    code = "import sys; sys.stdout.buffer.write('bar 50% é\\rbar 100%\\n'.encode()); sys.stdout.flush()"
    with open(tmp_path / "log", "wb") as log:
        result = proc.run_child([sys.executable, "-c", code], proc.child_env({}, {}), log)
    assert result.exit_code == 0 and "".join(stream.parts) == "bar 50% é\rbar 100%\n"
    sink = proc.TextSink(stream)
    sink.write("é".encode()[:1])
    sink.write("é".encode()[1:])
    assert stream.parts[-1] == "é"


def test_keyboard_interrupt_in_the_calling_thread_stops_the_child(tmp_path):
    """What a notebook's interrupt is when no signal handler of ours runs: a KeyboardInterrupt in the thread that
    waits for the child. The child is stopped (SIGINT, its output kept) and the attempt reports the interrupt."""
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGINT, lambda *a: (print('child stopping', flush=True), sys.exit(7)))\n"
            "while True:\n    print('tick', flush=True); time.sleep(0.05)\n")
    out, found = io.BytesIO(), {}

    def waiter() -> None:
        with open(tmp_path / "log", "wb") as log:
            found["result"] = proc.run_child([sys.executable, "-c", code], proc.child_env({}, {}), log, out=out)

    thread = threading.Thread(target=waiter)  # not the main thread: run_child installs no signal handler there
    thread.start()
    deadline = time.time() + 20
    while b"tick" not in out.getvalue():
        assert time.time() < deadline
        time.sleep(0.05)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(KeyboardInterrupt))
    thread.join(timeout=15)
    assert not thread.is_alive()
    result = found["result"]
    assert result.interrupted is not None and result.exit_code == 7 and b"child stopping" in out.getvalue()


@pytest.mark.slow
def test_retries_exhausted_raise_with_the_run(tmp_path, monkeypatch, shared_cache, capsys):
    monkeypatch.chdir(tmp_path)
    for key, value in cli_env(shared_cache, {"YOLOSAFE_INJECT_OOM": "phase=train,times=0"}).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(errors.OutOfMemoryRetriesExhausted) as caught:
        yolosafe.train(data="shapes", epochs=1, imgsz=64, batch=8, max_retries=0, workers=0, plots=False)
    run = caught.value.run
    assert run.run_dir == run_dir_of(tmp_path).resolve()
    assert (run.outcome, run.exit_code, len(run.attempts)) == ("oom_exhausted", Exit.OOM_EXHAUSTED, 1)
    assert "giving up after 0 retries" in capsys.readouterr().err
    assert rundir.holder(run.run_dir) is None  # given back: this process may resume the run


def test_a_number_as_name_or_project_is_text_as_ultralytics_makes_it():
    from ultralytics.cfg import get_cfg

    from yolosafe.api import calls
    from yolosafe.planning.trainoptions import TrainOptions

    for number in (0, 7, 1.5):
        given, _ = calls.given_of({"name": number, "project": number})
        options = TrainOptions.of({k: given[k] for k in ("name", "project")})  # the options' parsing owns the rule
        theirs = get_cfg(overrides={"name": number, "project": number})
        assert (options.name, options.project) == (theirs.name, theirs.project) == (str(number), str(number))
