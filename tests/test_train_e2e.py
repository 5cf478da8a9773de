"""End to end through the installed CLI: real Ultralytics trainings on CPU, offline."""

from __future__ import annotations

import json
import os
import signal

import psutil
import pytest

from tests.conftest import TINY, run_dir_of, story, wait_gone, wait_until


@pytest.mark.slow
def test_default_run_trains_and_records_everything(run_cli, tmp_path):
    env = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    result = run_cli("train", "--epochs", "2", *TINY, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = run_dir_of(tmp_path)
    for name in ("weights/last.pt", "weights/best.pt", "results.csv", "yolosafe.json", "train.log", "events.jsonl"):
        assert (run / name).is_file(), name
    assert "Epoch" in result.stdout and "2/2" in result.stdout  # Ultralytics' own progress, live
    assert str(run / "weights" / "last.pt") in result.stderr  # ends with the run dir and its weights

    s = story(run)
    assert s["outcome"] == "completed" and len(s["attempts"]) == 1
    assert s["attempts"][0]["exit_code"] == 0 and s["plan"]["device"] == "cpu"
    assert s["versions"]["torch"] and s["versions"]["ultralytics"]
    assert s["final_metrics"]  # the final validation of best.pt

    seen = json.loads((run / "worker-1.json").read_text())
    wanted = "expandable_segments:True,max_split_size_mb:128"
    assert seen["env"]["PYTORCH_CUDA_ALLOC_CONF"] == wanted and seen["env"]["PYTORCH_ALLOC_CONF"] == wanted
    assert seen["env"]["RANK"] is None and seen["env"]["WORLD_SIZE"] is None  # stray DDP variables removed
    assert seen["pid"] != os.getpid()  # trained in a child process

    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    for kind in ("train_start", "train_end", "val_start", "val_end"):
        assert sorted({e["epoch"] for e in events if e["event"] == kind and not e["final"]}) == [0, 1], kind
    assert {e["batch"] for e in events if e["event"] == "val_start"} == {8}  # --val-batch default: per-GPU batch


@pytest.mark.slow
def test_sigterm_stops_worker_and_everything_it_started(start_cli, tmp_path):
    proc = start_cli("train", "--epochs", "50", *TINY)
    run = run_dir_of(tmp_path)
    wait_until(lambda: (run / "events.jsonl").is_file() and (run / "worker-1.json").is_file(), proc, "training")
    worker = json.loads((run / "worker-1.json").read_text())["pid"]
    family = {worker, *(c.pid for c in psutil.Process(worker).children(recursive=True))}
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err
    assert not wait_gone(family)
    assert story(run)["outcome"] == "interrupted"


@pytest.mark.slow
def test_named_weights_without_network_end_in_one_clear_line(run_cli):
    """A user may name pretrained weights; with --download Ultralytics fetches them (once, before training), and
    offline that is one line; without it nothing is fetched."""
    result = run_cli("train", "--model", "yolov8s.pt", "--epochs", "1", *TINY)
    assert result.returncode == 2 and "--download" in result.stderr, result.stderr
    result = run_cli("train", "--model", "yolov8s.pt", "--epochs", "1", *TINY, "--download")
    if result.returncode == 0:
        pytest.skip("this machine could download the weights")
    assert result.returncode == 2  # refused before launch: no run directory, no worker
    assert "cannot load model 'yolov8s.pt'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
