"""Mistakes a user makes, through the installed CLI: one line on stderr, exit 2, no run directory, no worker.

Also the parts of "what the user sees" that need no training: resume flags on a dry run, the run-directory lock,
a dead supervisor's run, the README's examples, the start lines, the traceback filter, the advice, the memory table.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import zipfile
from pathlib import Path

import pytest

from tests.conftest import run_dir_of, story
from tests.test_cli import FOUR, assert_usage_error
from yolosafe.planning import trainplan as plan
from yolosafe.readers import report
from yolosafe.rundir import files as rundir
from yolosafe.supervisor import advice, terminal
from yolosafe.supervisor.policy import AttemptEnd as Failure

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def fake_checkpoint(path: Path, payload: object) -> Path:
    """A zip in PyTorch's checkpoint layout holding ``payload``'s pickle (only for runs that are never trained)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("last/data.pkl", pickle.dumps(payload))
    return path


@pytest.fixture
def files(tmp_path: Path) -> Path:
    write(tmp_path / "notes.txt", "not a dataset\n")
    write(tmp_path / "incomplete.yaml", "train: images/train\n")
    write(tmp_path / "nonames.yaml", "train: images\nval: images\n")
    write(tmp_path / "missing.yaml", "path: .\ntrain: images/train\nval: images/val\nnames: {0: a}\n")
    write(tmp_path / "list.yaml", "- train\n- val\n")
    write(tmp_path / "float.yaml", "epochs: 1.5\n")
    write(tmp_path / "text.yaml", "batch: abc\n")
    write(tmp_path / "args.yaml", "args:\n  lr0: abc\n")
    write(tmp_path / "model.yaml", "nc: 3\n")
    write(tmp_path / "corrupt.pt", "garbage")
    write(tmp_path / "afile", "")
    import torch

    torch.save({"weights": [1, 2, 3]}, tmp_path / "foreign.pt")  # a real PyTorch file, not an Ultralytics model
    return tmp_path


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--data", "notes.txt"], ["notes.txt", "not a data YAML"]),
        (["--data", "incomplete.yaml"], ["incomplete.yaml", "'val:' key missing"]),  # Ultralytics' words from here on
        (["--data", "nonames.yaml"], ["'names' or 'nc' are required"]),
        (["--data", "missing.yaml"], ["missing.yaml", "images not found", "images/val"]),
        (["--data", "list.yaml"], ["--data", "list.yaml"]),
        (["--model", "nope.yaml"], ["--model nope.yaml", "no such file"]),
        (["--model", "yolov9000n.yaml"], ["not a model Ultralytics knows"]),
        (["--model", "model.yaml"], ["not a model YAML"]),
        (["--model", "corrupt.pt"], ["--model corrupt.pt", "not a readable PyTorch checkpoint"]),
        (["--model", "foreign.pt"], ["not an Ultralytics checkpoint"]),
        (["--model", "weights/missing.pt"], ["no such file"]),
        (["--model", "net.onnx"], ["expected a model YAML"]),
        (["lr0=abc"], ["lr0=abc", "'lr0' types are int", "float"]),
        (["plots=maybe"], ["plots=maybe", "'plots' must be a bool"]),
        (["workers=1.5"], ["workers=1.5", "'workers' must be an int"]),
        (["amp=maybe"], ["amp=maybe", "'amp' values are True, False"]),
        (["optimizer=Adamm"], ["optimizer=Adamm", "not found in list of available optimizers"]),
        (["patience=-1"], ["patience=-1", "'patience' must be >= 0"]),
        (["--epochs", "3", "epochs=2"], ["--epochs 3 and epochs=2 disagree"]),
        (["--config", "float.yaml"], ["--epochs 1.5", "whole number"]),
        (["--config", "text.yaml"], ["--batch 'abc'", "whole number"]),
        (["--config", "args.yaml"], ["lr0=abc"]),
        (["--max-retries", "-1"], ["--max-retries -1", "at least 0"]),
        (["--min-batch", "0"], ["--min-batch 0", "at least 1"]),
        (["--name", "a/b"], ["--name 'a/b'", "single folder"]),
        (["--name", ".."], ["single folder"]),
        (["--project", "{tmp}/afile"], ["--project", "afile", "is a file"]),  # relative: under Ultralytics' runs/<task>
        (["--project", "{tmp}/afile/runs"], ["is a file"]),
    ],
)
def test_mistakes_are_one_line_before_anything_exists(run_cli, files, args, words):
    assert_usage_error(run_cli("train", *(a.replace("{tmp}", str(files)) for a in args)), *words)
    assert not (files / "runs").exists()


@pytest.mark.parametrize(("spec", "words"), [
    ("phase=vall", ["phase must be train/val/final"]),
    ("rank=a", ["rank='a'", "whole number"]),
    ("times=-1", ["times='-1'"]),
    ("epoch", ["cannot read 'epoch'"]),
])
def test_malformed_injection_is_a_usage_error(run_cli, tmp_path, spec, words):
    assert_usage_error(run_cli("train", env={"YOLOSAFE_INJECT_OOM": spec}), "YOLOSAFE_INJECT_OOM", *words)
    assert not (tmp_path / "runs").exists()


# --- resume without training ---------------------------------------------------------------------------------------


def fake_run(tmp_path: Path, outcome: str = "failed", name: str = "train") -> Path:
    """A run directory as a failed run leaves it (the checkpoint is a stand-in: nothing here trains)."""
    run = run_dir_of(tmp_path, name)
    p = plan.build_plan(model="yolov8n.yaml", data="d.yaml", gpus=(0, 1), batch=8, effective_batch=16, imgsz=64,
                        epochs=2, extra={"workers": 0})
    run.mkdir(parents=True)
    rundir.write_json(run / rundir.STORY,
                      {"run_dir": str(run), "plan": p.summary(), "outcome": outcome, "simulated_on_cpu": True,
                       "allocator": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
                                     "PYTORCH_ALLOC_CONF": "expandable_segments:True"},
                       "attempts": [{"attempt": 1, "batch": 8, "val_batch": 4}]})
    from ultralytics.nn.modules.conv import Concat  # an Ultralytics module, as a checkpoint's model names one

    fake_checkpoint(run / "weights" / "last.pt",
                    {"model": Concat(), "train_args": {"model": "yolov8n.yaml"}, "epoch": 0})
    return run


def digest(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}


def test_resume_dry_run_applies_flags_and_trains_nothing(run_cli, tmp_path):
    run = fake_run(tmp_path)
    before = digest(run)
    result = run_cli("train", "--resume", str(run), "--batch", "4", "--gpus", "0,1,2,3", "--effective-batch", "32",
                     "--val-batch", "2", "--max-retries", "1", "--dry-run", env=FOUR)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for text in ("0,1,2,3  (4 GPUs)", "4 total = 1 per GPU", "nbs 32", "2 per GPU", "imgsz / epochs   64 / 2",
                 f"resumed from {run / 'weights' / 'last.pt'}", "spec-2.json"):
        assert text in out, out
    assert digest(run) == before  # no spec, no log, no story change: a dry run trains and writes nothing


@pytest.mark.parametrize(("args", "flag"), [
    (["--epochs", "5"], "--epochs"), (["--model", "yolov8s.yaml"], "--model"), (["lr0=0.02"], "key=value"),
    (["--name", "other"], "--name"), (["--imgsz", "128"], "--imgsz"), (["--data", "shapes"], "--data"),
])
def test_resume_refuses_flags_it_cannot_honour(run_cli, tmp_path, args, flag):
    run = fake_run(tmp_path)
    before = digest(run)
    assert_usage_error(run_cli("train", "--resume", str(run), *args), "cannot change", flag)
    assert digest(run) == before


def test_resume_of_corrupt_story_or_checkpoint(run_cli, tmp_path):
    run = fake_run(tmp_path)
    (run / rundir.STORY).write_text("{not json")
    assert_usage_error(run_cli("train", "--resume", str(run)), "yolosafe.json is unreadable")
    run = fake_run(tmp_path, name="other")
    (run / "weights" / "last.pt").write_text("half a checkpoint")
    assert_usage_error(run_cli("train", "--resume", str(run)), "weights/last.pt", "not a readable PyTorch checkpoint")


def test_a_live_run_is_refused_naming_its_holder(run_cli, tmp_path):
    run = fake_run(tmp_path, outcome="running")
    fd = rundir.lock(run)  # this test process plays the supervisor of a live run
    try:
        before = digest(run)
        for args in (["--resume", str(run)], ["--resume", str(run), "--dry-run"], ["--name", "train"]):
            assert_usage_error(run_cli("train", *args, env=FOUR), f"pid {os.getpid()}")
        assert digest(run) == before and not run_dir_of(tmp_path, "train2").exists()
        assert story(run)["outcome"] == "running"
    finally:
        os.close(fd)
    result = run_cli("report", str(run))  # the supervisor is gone: the next command that reads the run says so
    assert "supervisor died" in result.stderr, result.stderr
    assert story(run)["outcome"] == rundir.ORPHANED and story(run)["attempts"][-1]["outcome"] == rundir.ORPHANED
    result = run_cli("train", "--resume", str(run), "--dry-run", env=FOUR)
    assert result.returncode == 0, result.stderr


def test_default_name_of_a_live_run_goes_to_the_next_name(run_cli, tmp_path):
    run = fake_run(tmp_path, outcome="running")
    fd = rundir.lock(run)
    try:
        result = run_cli("train", "--dry-run")
        assert result.returncode == 0 and "runs/detect/train2" in result.stdout
    finally:
        os.close(fd)


# --- README, start lines, terminal, advice, table ------------------------------------------------------------------


def readme_train_examples() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    lines = [ln.split("#")[0].split() for ln in re.findall(r"^yolosafe train [^\n]*", text, re.M)]
    return [ln[1:] for ln in lines if "--resume" not in ln]


@pytest.mark.slow  # Ultralytics in a child process, seconds a case
@pytest.mark.parametrize("args", readme_train_examples(), ids=" ".join)
def test_readme_examples_run_as_written(run_cli, args):
    """The README's examples, on four fake GPUs, as dry runs (a dry run checks all a real run checks first)."""
    result = run_cli(*args, *([] if "--dry-run" in args else ["--dry-run"]), env=FOUR)
    assert result.returncode == 0, result.stderr


def test_start_lines_say_how_the_run_is_spread():
    p = plan.build_plan(model="m.yaml", data="d.yaml", gpus=(0, 1, 2, 3), batch=64, effective_batch=128)
    lines = terminal.start_lines(p, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, simulated=True)
    assert len(lines) == 4
    assert lines[0].startswith("GPUs 0,1,2,3: batch 64 = 16 per GPU") and "runs on the CPU" in lines[0]
    assert lines[1] == "effective batch 128 = batch 64 x accumulate 2 (nbs 128)"
    assert lines[2] == "validation batch 16 per GPU" and "expandable_segments:True" in lines[3]


def test_tracebacks_stay_off_the_terminal_progress_stays_live():
    out = io.BytesIO()
    tee = terminal.TracebackFilter(out)
    tee.write(b"  1/4 loss 1.2\r  2/4 loss 1.1")
    assert out.getvalue() == b"  1/4 loss 1.2\r  2/4 loss 1.1"  # partial lines go out at once
    tee.write(b"\nTrace")
    tee.write(b"back (most recent call last):\n  File \"x.py\", line 1\n    boom()\nRuntimeError: boom\n\n"
              b"During handling of the above exception, another exception occurred:\n\n"
              b"[rank1]: Traceback (most recent call last):\n[rank1]:   File \"y\"\n"
              b"FileNotFoundError: \x1b[34mtrain:\x1b[0m no images\nSee the docs\n\n"
              b"The above exception was the direct cause of the following exception:\n\n"
              b"Traceback (most recent call last):\n  File \"z\"\nKeyboardInterrupt\n\nafter\n")
    assert out.getvalue() == b"  1/4 loss 1.2\r  2/4 loss 1.1\nafter\n"
    log = ("x\nTraceback (most recent call last):\n  File \"y\"\n"
           "FileNotFoundError: \x1b[34mtrain:\x1b[0m no images\nmore\n")
    assert terminal.exception_line(log) == "FileNotFoundError: train: no images"


def plan_on(gpus: tuple[int, ...], model: str = "yolov8n.yaml") -> plan.TrainPlan:
    return plan.build_plan(model=model, data="d.yaml", gpus=gpus, batch=8 * len(gpus), effective_batch=64)


def test_advice_fits_the_case():
    tips = " | ".join(advice.advice(Failure("oom", "train"), plan_on((0, 1))))
    assert "smaller model" not in tips and "workers" not in tips and "cache" not in tips
    assert "--gpus 0 --batch 16 is 16 per GPU" in tips and "min-batch" not in tips
    tips = " | ".join(advice.advice(Failure("oom", "train"), plan_on((0,), "yolov8m.yaml"), min_batch=8))
    assert "smaller model" in tips and "--min-batch 8" in tips and "fewer GPUs" not in tips
    host = Failure("oom", "train", message="DefaultCPUAllocator: can't allocate memory")
    assert any("host RAM" in t for t in advice.advice(host, plan_on((0,))))


def test_memory_table_leaves_out_what_means_nothing():
    idle = {"total_mib": 24576.0, "peak_used_mib": 0.0, "headroom_mib": 24576.0, "peak_others_mib": None,
            "phases": {"train": {"peak_used_mib": 0.0, "peak_used_share": 0.0, "epoch_of_peak": 0}}}
    busy = {"total_mib": 24576.0, "peak_used_mib": 12288.0, "headroom_mib": 12288.0, "peak_others_mib": 0.0,
            "phases": {"train": {"peak_used_mib": 12288.0, "peak_used_share": 0.5, "epoch_of_peak": 0}}}
    lines = report.table({"gpus": {"0": idle, "1": idle}})
    assert lines == [lines[0]] and lines[0].startswith("GPU 0, 1: no memory in use") and "0.0 GiB" not in lines[0]
    lines = report.table({"gpus": {"0": busy, "1": idle}})
    assert "val peak" not in lines[0] and "others" not in lines[0]
    assert "12.0 GiB 50% e1" in lines[1] and lines[2].startswith("GPU 1: no memory")


def test_no_double_prefix_in_messages():
    from yolosafe.supervisor.policy import AttemptResult, classify

    result = classify(AttemptResult(3, 1.0), [], "...\nyolosafe: cannot load model 'x.pt': gone\n")
    assert result.message == "cannot load model 'x.pt': gone"
    from yolosafe.rundir.records import Failure

    record = Failure.new(error="RuntimeError", message="boom", phase="train", epoch=0)
    assert classify(AttemptResult(1, 1.0), [record], "").message == "RuntimeError: boom"
