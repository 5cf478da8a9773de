"""Drills with real ranks: fake GPUs, one real CPU rank process per GPU over gloo, launched by yolosafe through
torch.distributed.run, each running the real Ultralytics trainer; OOMs are the real torch.OutOfMemoryError raised in
one rank; signals are real signals to real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from tests.conftest import TINY, YOLOSAFE, alive, cli_env, run_dir_of, story, wait_until
from tests.test_terminal import dead_bars
from yolosafe.rundir import files as rundir

TWO, FOUR = {"YOLOSAFE_FAKE_GPUS": "2x24GB"}, {"YOLOSAFE_FAKE_GPUS": "4x24GB"}


def events(run: Path, attempt: int, kind: str) -> list[dict]:
    lines = (run / "events.jsonl").read_text().splitlines() if (run / "events.jsonl").is_file() else []
    found = [json.loads(line) for line in lines]
    return [e for e in found if e["attempt"] == attempt and e["event"] == kind]


def started(run: Path, attempt: int, kind: str = "train_start") -> dict[int, tuple[int | None, int]]:
    """``{rank: (batch, pid)}`` of the ranks that sent ``kind`` in ``attempt``."""
    return {e["rank"]: (e.get("batch"), e["pid"]) for e in events(run, attempt, kind)}


def inject(spec: str, gpus: dict[str, str] = TWO) -> dict[str, str]:
    return {**gpus, "YOLOSAFE_INJECT_OOM": spec}


@pytest.fixture
def start(tmp_path: Path, shared_cache: Path):
    """Start ``yolosafe`` in its own process group (so a signal to the group reaches yolosafe only, as Ctrl-C does)."""

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen([YOLOSAFE, *args], cwd=tmp_path, env=cli_env(shared_cache, env or TWO),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)

    return run


def family(proc: subprocess.Popen[str], ranks: int) -> set[int]:
    """yolosafe's descendants (launcher and ranks) once every rank is there."""
    deadline = time.time() + 30
    while time.time() < deadline:
        found = {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        if len(found) >= ranks + 1:
            return found
        time.sleep(0.1)
    raise AssertionError(f"expected a launcher and {ranks} ranks, found {found}")


def all_gone_within(pids: set[int], seconds: float) -> None:
    deadline = time.time() + seconds
    while alive(pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(pids), f"still alive after {seconds} s: {alive(pids)}"


def completed(run: Path, epochs: int) -> dict:
    rows = (run / "results.csv").read_text().strip().splitlines()[1:]
    assert int(float(rows[-1].split(",")[0])) == epochs
    s = story(run)
    assert s["outcome"] == "completed" and (run / "weights" / "best.pt").is_file()
    return s


def test_rank_injection_for_a_missing_rank_is_a_usage_error(run_cli, tmp_path):
    result = run_cli("train", "--gpus", "0,1", "--epochs", "1", *TINY, env=inject("phase=val,rank=2"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "rank=2 does not exist: this run has ranks 0-1" in result.stderr and not (tmp_path / "runs").exists()


def test_launch_arguments_are_torchruns_own(tmp_path):
    """The argv yolosafe builds parses with torch.distributed.run's own parser: single node (static rendezvous on a
    free port) and multi-node (static rendezvous at node 0's endpoint, this node's rank, attempt N on port + N - 1)."""
    from torch.distributed.run import parse_args

    from yolosafe.planning.nodes import for_attempt, resolve
    from yolosafe.supervisor import launchcmd as launch

    port = launch.free_port()
    single = parse_args(launch.torchrun_args(launch.Launch(4, port, tmp_path), launch.WORKER, ["spec.json"]))
    assert (single.nproc_per_node, single.nnodes, single.master_port, single.master_addr) == ("4", "1", port,
                                                                                             "127.0.0.1")
    assert (single.module, single.training_script, single.training_script_args) == (True, "yolosafe.training.worker",
                                                                                     ["spec.json"])
    assert (single.max_restarts, single.log_dir, single.tee) == (0, str(tmp_path), "3")
    nodes = resolve(2, 1, "node0:29400", "run7", {})
    multi = launch.Launch(8, port, tmp_path, replace(for_attempt(nodes, 3), timeout=60))
    parsed = parse_args(launch.torchrun_args(multi, "yolosafe.training.worker", ["spec.json"]))
    assert (parsed.nnodes, parsed.node_rank, parsed.nproc_per_node, parsed.rdzv_backend, parsed.rdzv_endpoint,
            parsed.rdzv_id, parsed.rdzv_conf) == ("2", 1, "8", "static", "node0:29402", "run7", "timeout=60")


def test_epoch_peaks_become_ultralytics_metrics_per_nvml_gpu(tmp_path):
    """The rank on CUDA device 1 of a plan on GPUs 2,3 reports as GPU 3; GPUs without figures are NaN (one column
    set every epoch, so results.csv stays aligned)."""
    import math
    from types import SimpleNamespace

    import torch

    from tests.contexts import run_context
    from yolosafe.training import peakmetrics

    context = run_context(tmp_path, plan={"gpus": [2, 3]})
    context.progress.train_peaks = {"max_allocated_mib": 10.0, "max_reserved_mib": 12.0}
    found = peakmetrics.epoch_peaks(SimpleNamespace(device=torch.device("cuda", 1), world_size=1), context)
    assert list(found) == peakmetrics.keys([2, 3]) and len(found) == 8
    assert (found["memory/gpu3_train_allocated_mib"], found["memory/gpu3_train_reserved_mib"]) == (10.0, 12.0)
    assert math.isnan(found["memory/gpu2_train_reserved_mib"]) and math.isnan(found["memory/gpu3_val_reserved_mib"])
    ordered = peakmetrics.ordered({"memory/gpu3_val_reserved_mib": 5.0, "lr/pg0": 0.1}, context)
    assert list(ordered)[:2] == ["lr/pg0", "memory/gpu2_train_allocated_mib"] and len(ordered) == 9


def assert_clean_terminal(result: subprocess.CompletedProcess[str], run: Path, failed_rank: int) -> None:
    """The terminal of a recovered multi-rank OOM: rank 0's output and yolosafe's own lines, as with one process;
    the failed rank's traceback and torch.distributed.run's failure dump are in train.log only (the other ranks may
    be stopped before they print anything)."""
    shown = result.stdout + result.stderr
    for noise in ("Traceback", "[rank", "traceback :", "ChildFailedError", "torch/distributed"):
        assert noise not in shown, f"{noise!r} on the terminal"
    assert all(line.startswith(("yolosafe: ", "  ")) for line in result.stderr.splitlines()), result.stderr
    assert "Epoch" in result.stdout  # rank 0's progress is there
    assert not dead_bars(result.stdout), result.stdout[-3000:]  # its bar the stop cut short is not left there
    log = (run / "train.log").read_text()
    assert "Traceback" in log and f"[rank{failed_rank}]: " in log and "traceback :" in log


@pytest.mark.slow
def test_oom_on_rank_2_of_4_in_training_halves_every_rank(run_cli, tmp_path):
    args = ["--gpus", "0,1,2,3", "--epochs", "2", "--imgsz", "64", "--batch", "16", "--effective-batch", "32",
            "workers=0", "plots=False"]
    result = run_cli("train", *args, env=inject("phase=train,epoch=1,rank=2", FOUR), keep_cr=True)
    assert result.returncode == 0, result.stderr[-3000:]
    run = run_dir_of(tmp_path)
    first, second = completed(run, 2)["attempts"]
    assert "yolosafe.training.launcher" in first["command"] and "--nproc-per-node" in first["command"]
    assert (first["outcome"], first["phase"], first["epoch"], first["rank"], first["gpu"]) == ("oom", "train", 1, 2, 2)
    assert "OOM in train at epoch 2/2 on rank 2, GPU 2 (batch 4/GPU" in result.stderr
    assert (second["per_gpu_batch"], second["nbs"], second["accumulate"]) == (2, 32, 4)
    assert second["resumed_from_epoch"] == 0 and Path(second["resumed_from"]).is_file()
    # the resumed ranks' own events: four processes, every one ran the halved batch from epoch 2 on
    ran = started(run, 2)
    assert {rank: batch for rank, (batch, _) in ran.items()} == {0: 2, 1: 2, 2: 2, 3: 2}
    assert len({pid for _, pid in ran.values()}) == 4
    assert {e["epoch"] for e in events(run, 2, "train_start")} == {1}
    assert {e["gpu"] for e in events(run, 2, "train_start")} == {0, 1, 2, 3}
    header = (run / "results.csv").read_text().splitlines()[0].split(",")
    assert header[-16:] == [f"memory/gpu{g}_{p}_{k}_mib" for g in range(4) for p in ("train", "val")
                            for k in ("allocated", "reserved")]  # torch's peaks of every GPU (NaN on the CPU)
    assert_clean_terminal(result, run, 2)


@pytest.mark.slow
def test_oom_on_rank_1_in_validation_halves_the_val_batch_of_every_rank(run_cli, tmp_path):
    result = run_cli("train", "--gpus", "0,1", "--epochs", "1", "--val-oom", "relaunch", *TINY,
                     env=inject("phase=val,epoch=0,rank=1"), keep_cr=True)
    assert result.returncode == 0, result.stderr[-3000:]
    run = run_dir_of(tmp_path)
    first, second = completed(run, 1)["attempts"]
    assert (first["phase"], first["rank"], first["gpu"]) == ("val", 1, 1)
    assert (second["per_gpu_batch"], second["val_batch"]) == (4, 2)
    assert {rank: batch for rank, (batch, _) in started(run, 2, "val_start").items()} == {0: 2, 1: 2}
    assert_clean_terminal(result, run, 1)


@pytest.mark.slow
def test_oom_on_rank_1_in_final_validation_reruns_only_the_validation(run_cli, tmp_path):
    result = run_cli("train", "--gpus", "0,1", "--epochs", "1", "--val-oom", "relaunch", *TINY,
                     env=inject("phase=final,epoch=0,rank=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    run = run_dir_of(tmp_path)
    first, second = completed(run, 1)["attempts"]
    assert (first["phase"], first["rank"], second["mode"], second["val_batch"]) == ("final", 1, "final_val", 2)
    assert not events(run, 2, "train_start")  # training kept
    assert "metrics/mAP50-95(B)" in story(run)["final_metrics"]


def stop_attempt(start, run: Path, attempt: int, stop) -> tuple[subprocess.Popen[str], set[int]]:
    """Start (or resume) two ranks, wait until both train in ``attempt``, then ``stop`` it; its process tree."""
    args = ("--resume", str(run)) if attempt > 1 else ("--gpus", "0,1", "--epochs", "2", *TINY)
    proc = start("train", *args)
    wait_until(lambda: len(started(run, attempt)) == 2 and (run / "weights" / "last.pt").is_file(), proc,
               f"two ranks training in attempt {attempt}")
    pids = family(proc, 2)
    stop(proc)
    return proc, pids


@pytest.mark.slow
def test_every_stop_of_a_two_rank_run_is_told_and_the_run_resumes(start, run_cli, tmp_path):
    """One run, stopped four ways, then resumed to the end: Ctrl-C to yolosafe's pid, then to its process group
    (torchrun's ranks run in sessions of their own, so only yolosafe's process tree can stop them); a rank SIGKILLed;
    the supervisor itself SIGKILLed (nobody is left to stop the tree, so each level ends itself)."""
    run = run_dir_of(tmp_path)
    for attempt, stop in ((1, lambda p: os.kill(p.pid, signal.SIGINT)),
                          (2, lambda p: os.killpg(p.pid, signal.SIGINT))):
        proc, pids = stop_attempt(start, run, attempt, stop)
        _, err = proc.communicate(timeout=30)  # the tree's grace (proc.STOP_GRACE_S), then SIGKILL; slack for load
        assert proc.returncode == 130, err[-2000:]
        all_gone_within(pids, 2)  # yolosafe itself waited for its tree before it exited
        assert story(run)["outcome"] == "interrupted" and f"--resume {run}" in err

    proc, pids = stop_attempt(start, run, 3, lambda p: os.kill(started(run, 3)[1][1], signal.SIGKILL))  # rank 1
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "rank 1 was killed by SIGKILL on GPU 1" in err, err[-2000:]
    all_gone_within(pids, 2)
    s = story(run)
    assert (s["outcome"], s["attempts"][2]["rank"], s["attempts"][2]["gpu"]) == ("killed", 1, 1)

    proc, pids = stop_attempt(start, run, 4, lambda p: p.kill())  # the supervisor
    proc.wait()
    all_gone_within(pids, 5)
    report = run_cli("report", str(run))
    assert "run abandoned" in report.stdout + report.stderr and story(run)["outcome"] == rundir.ORPHANED

    result = run_cli("train", "--resume", str(run), env=TWO)  # the same fake GPUs: a resume maps the run's GPUs
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = [a["outcome"] for a in completed(run, 2)["attempts"]]
    assert outcomes[:3] == ["interrupted", "interrupted", "killed"] and outcomes[-1] == "completed"
