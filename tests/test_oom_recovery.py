"""OOM recovery end to end: the real Ultralytics trainer on CPU, the real torch.OutOfMemoryError injected inside it."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.conftest import TINY, run_dir_of, story, wait_until
from tests.test_terminal import dead_bars

pytestmark = pytest.mark.slow  # real Ultralytics trainings on CPU


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def ran_batches(run: Path, attempt: int, event: str = "train_start") -> set[int]:
    """The batches an attempt really ran, from its ranks' own events (not from what the supervisor asked for)."""
    return {e["batch"] for e in events(run) if e["event"] == event and e["attempt"] == attempt}


def died_in(run: Path, attempt: int) -> tuple[str, int]:
    """The phase and epoch an attempt's rank 0 opened last and never closed, from its events."""
    last = [e for e in events(run) if e["attempt"] == attempt and e["rank"] in (-1, 0)][-1]
    assert last["event"].endswith("_start"), last
    return ("final" if last["final"] else last["phase"]), last["epoch"]


def failure(run: Path, attempt: int) -> dict:
    return json.loads((run / f"failure-{attempt}-rank0.json").read_text())


def checkpoint_epoch(path: Path) -> int:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)["epoch"]


def assert_finished(run: Path, epochs: int, nbs: int = 16) -> dict:
    assert (run / "weights" / "last.pt").is_file() and (run / "weights" / "best.pt").is_file()
    rows = (run / "results.csv").read_text().strip().splitlines()[1:]
    assert [int(float(r.split(",")[0])) for r in rows][-1] == epochs  # every requested epoch completed
    s = story(run)
    assert s["outcome"] == "completed"
    assert {a["nbs"] for a in s["attempts"]} == {nbs}  # the effective batch never changed
    return s


def inject(spec: str) -> dict[str, str]:
    return {"YOLOSAFE_INJECT_OOM": spec}


def recovered(run_cli, tmp_path: Path, epochs: int, injection: str, *args: str) -> tuple[Path, dict, dict]:
    """Train with one injected OOM; check the run finished; return it with its two attempts."""
    result = run_cli("train", "--epochs", str(epochs), *args, *TINY, env=inject(injection), keep_cr=True)
    assert result.returncode == 0, result.stderr[-3000:]
    run = run_dir_of(tmp_path)
    first, second = assert_finished(run, epochs)["attempts"]
    assert not dead_bars(result.stdout), result.stdout[-3000:]  # the bar the OOM cut short is train.log's
    return run, first, second


def test_oom_in_first_training_step_restarts_with_half_batch(run_cli, tmp_path):
    run, first, second = recovered(run_cli, tmp_path, 2, "phase=train,epoch=0,iteration=1")
    assert (first["outcome"], first["phase"], first["epoch"]) == ("oom", "train", 0)
    assert (first["batch"], first["accumulate"]) == (8, 2) and (second["batch"], second["accumulate"]) == (4, 4)
    assert second["resumed_from"] is None  # no checkpoint yet: from scratch
    record = failure(run, 1)
    assert record["oom"] and record["error"] == "OutOfMemoryError" and record["figures"]["tried_mib"] == 300.0
    assert (record["phase"], record["epoch"], record["iteration"], record["batch"]) == ("train", 0, 1, 8)
    assert died_in(run, 1) == ("train", 0) and "preprocess_batch" in "".join(record["traceback"])
    # Ultralytics' own in-process halving is off: one halving per OOM, and the batch reported is the one that ran.
    log = (run / "train.log").read_text()
    assert "Reducing to batch" not in log
    assert ran_batches(run, 1) == {8} and ran_batches(run, 2) == {4}


def test_oom_in_epoch_2_of_3_resumes_from_checkpoint(run_cli, tmp_path):
    run, first, second = recovered(run_cli, tmp_path, 3, "phase=train,epoch=2")
    assert (first["phase"], first["epoch"]) == ("train", 2) and died_in(run, 1) == ("train", 2)
    assert (failure(run, 1)["phase"], failure(run, 1)["epoch"], failure(run, 1)["iteration"]) == ("train", 2, 0)
    kept = Path(second["resumed_from"])  # the checkpoint it resumed from is kept
    assert kept == run / "weights" / "last-before-attempt2.pt"
    assert second["resumed_from_epoch"] == checkpoint_epoch(kept) == 1  # not restarted from 0
    assert ran_batches(run, 2) == {4}
    assert sorted({e["epoch"] for e in events(run) if e["event"] == "train_start" and e["attempt"] == 2}) == [2]


def test_oom_in_validation_halves_only_val_batch(run_cli, tmp_path):
    # shapes' 16 validation images in ONE batch of 16: the injection at validation iteration 0 must fire there
    # (Ultralytics sets validator.batch_i after on_val_batch_start: None on the very first batch).
    run, first, second = recovered(run_cli, tmp_path, 2, "phase=val,epoch=0,iteration=0", "--val-batch", "16",
                                   "--val-oom", "relaunch")
    assert (first["outcome"], first["phase"], first["epoch"]) == ("oom", "val", 0) and died_in(run, 1) == ("val", 0)
    record = failure(run, 1)
    assert (record["phase"], record["epoch"], record["iteration"], record["val_batch"]) == ("val", 0, 0, 16)
    assert "on_val_batch_start" in "".join(record["traceback"])
    assert second["resumed_from"] is None  # validation of epoch 0 comes before its checkpoint
    assert ran_batches(run, 1, "val_start") == {16} and ran_batches(run, 2) == {8}  # the train batch kept
    assert ran_batches(run, 2, "val_start") == {8}  # --val-batch really controls the loader, final validation too


def test_oom_in_final_validation_keeps_training(run_cli, tmp_path):
    run, first, second = recovered(run_cli, tmp_path, 2, "phase=final,epoch=1", "--val-oom", "relaunch")
    assert (first["phase"], second["mode"], second["val_batch"]) == ("final", "final_val", 4)
    assert died_in(run, 1) == ("final", 1) and (failure(run, 1)["phase"], failure(run, 1)["iteration"]) == ("final", 0)
    assert not [e for e in events(run) if e["event"] == "train_start" and e["attempt"] == 2]  # no training again
    assert "metrics/mAP50-95(B)" in story(run)["final_metrics"]


def test_oom_every_time_gives_up_with_advice(run_cli, tmp_path):
    # Two fake GPUs; a stale kernel (pid 4242) holds 13 GB of GPU 1. The worker trains on CPU with the same batches.
    gpus = {"gpus": [{"total_mib": 24576}, {"total_mib": 24576, "used_mib": 13000,
                                            "processes": [{"pid": 4242, "used_mib": 13000}]}]}
    env = {**inject("phase=train,times=0"), "YOLOSAFE_FAKE_GPUS": json.dumps(gpus)}
    result = run_cli("train", "--epochs", "2", "--max-retries", "1", "--gpus", "0,1", *TINY, env=env)
    assert result.returncode == 3
    run = run_dir_of(tmp_path)
    s = story(run)
    assert s["outcome"] == "oom_exhausted" and [a["per_gpu_batch"] for a in s["attempts"]] == [4, 2]
    assert {a["nbs"] for a in s["attempts"]} == {16}
    for advice in ("next steps", "GPU(s) 1 also hold", "--gpus 0 --batch 4 is 4 per GPU", "--imgsz"):
        assert advice in result.stderr, result.stderr[-2000:]
    assert "smaller model" not in result.stderr and "workers=" not in result.stderr  # yolov8n; GPU, not host RAM
    assert len(list(run.glob("failure-*-rank0.json"))) == 2 and (run / "train.log").is_file()  # nothing deleted


def test_non_oom_crash_is_not_retried(run_cli, tmp_path):
    result = run_cli("train", "--epochs", "2", *TINY, env=inject("phase=train,epoch=0,error=runtime"))
    assert result.returncode == 1
    s = story(run_dir_of(tmp_path))
    assert s["outcome"] == "failed" and len(s["attempts"]) == 1
    assert "not an OOM, not retried" in result.stderr and "injected a non-OOM failure" in result.stderr


def test_sigkilled_worker_is_reported_and_resumable(run_cli, start_cli, tmp_path):
    proc = start_cli("train", "--epochs", "2", *TINY)
    run = run_dir_of(tmp_path)
    wait_until((run / "weights" / "last.pt").is_file, proc, "a checkpoint")
    os.kill(json.loads((run / "worker-1.json").read_text())["pid"], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "killed by SIGKILL" in err and f"--resume {run}" in err
    assert story(run)["outcome"] == "killed"

    result = run_cli("train", "--resume", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    s = assert_finished(run, 2)
    resumed = s["attempts"][1]
    assert resumed["resumed_from_epoch"] == checkpoint_epoch(Path(resumed["resumed_from"])) >= 0
    assert ran_batches(run, 2) == {8}
