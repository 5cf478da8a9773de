"""Faults during a real (tiny) run: each ends in one line, and ``--resume`` completes the run with nothing trained
lost and nothing duplicated; the story is never left "running". The drills stop a run at a stage through
:mod:`tests.drills` (the phase event, then the signal), at the first event that proves the point."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests import drills
from tests.conftest import TINY, YOLOSAFE, cli_env, failed_in_epoch_2, run_dir_of, story
from tests.test_cli import assert_usage_error

pytestmark = pytest.mark.slow
FAST = [*TINY, "--imgsz", "32"]  # the last --imgsz wins


def epochs_of(run: Path) -> list[int]:
    return [int(float(row.split(",")[0])) for row in (run / "results.csv").read_text().splitlines()[1:]]


def train(home: Path, shared_cache: Path, *args: str, env: dict[str, str] | None = None,
          timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([YOLOSAFE, "train", *args], cwd=home, capture_output=True, text=True,
                          env=cli_env(shared_cache, env), timeout=timeout)


@pytest.fixture(scope="module")
def slow_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shapes set with its validation images listed four times: a validation long enough to stop inside."""
    from yolosafe.planning import datasets

    root = tmp_path_factory.mktemp("slowval")
    data = datasets.ensure_shapes(root, train=16, val=16, size=64)
    spec = yaml.safe_load(data.read_text())
    spec["val"] = [spec["val"]] * 4
    path = root / "slow-val.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Path:
    """A 2-epoch run that failed (not an OOM) in epoch 2: weights/last.pt holds epoch 1. Copied by each test."""
    return failed_in_epoch_2(tmp_path_factory.mktemp("failed"), shared_cache, "--imgsz", "32")


def copy_of(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "runs" / "detect" / run.name
    shutil.copytree(run, target)
    return target


def test_stop_inside_the_final_validation_resumes_only_that(tmp_path, shared_cache, slow_val):
    proc = drills.start(tmp_path, shared_cache, "train", "--data", str(slow_val), "--epochs", "1", *FAST)
    run = run_dir_of(tmp_path)
    drills.stop_at(proc, run, {"event": "val_start", "phase": "final"}, signal.SIGTERM)
    code, err = drills.finish(proc)
    assert code == 130, err
    stops = [ln for ln in drills.yolosafe_lines(err) if "stopped" in ln]
    assert stops == [f"yolosafe: stopped by SIGTERM; resume with: yolosafe train --resume {run}"], err
    assert "Traceback" not in err and story(run)["outcome"] == "interrupted"
    assert not (run / "final_metrics.json").exists()

    result = train(tmp_path, shared_cache, "--resume", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "only the final validation is left" in result.stderr
    s = story(run)
    assert s["outcome"] == "completed" and s["attempts"][-1]["mode"] == "final_val"
    assert json.loads((run / "final_metrics.json").read_text())
    assert epochs_of(run) == [1]


def test_sigkill_of_the_supervisor_then_resume_first_marks_the_attempt_abandoned(tmp_path, shared_cache):
    proc = drills.start(tmp_path, shared_cache, "train", "--epochs", "2", *FAST)
    run = run_dir_of(tmp_path)
    event = drills.stop_at(proc, run, {"event": "train_start", "epoch": 1}, signal.SIGKILL, freeze=False)
    proc.wait(timeout=30)
    drills.wait_gone(event["pid"])  # the worker notices its parent is gone and ends
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    for command in (["report", str(copy)], ["doctor", str(copy)]):  # a reader first, on a copy
        read = subprocess.run([YOLOSAFE, *command], cwd=tmp_path, capture_output=True, text=True,
                              env=cli_env(shared_cache), timeout=120)
        assert "Traceback" not in read.stdout + read.stderr, read.stderr
        assert "cannot read the memory data" not in read.stdout
    assert story(copy)["attempts"][0]["outcome"] == "abandoned"

    result = train(tmp_path, shared_cache, "--resume", str(run))  # the resume comes first here
    assert result.returncode == 0, result.stderr[-3000:]
    s = story(run)
    assert [a["outcome"] for a in s["attempts"]] == ["abandoned", "completed"] and s["outcome"] == "completed"
    assert epochs_of(run) == [1, 2]


def test_ctrl_c_reaches_a_worker_started_with_sigint_ignored(tmp_path, shared_cache):
    """``yolosafe train ... &`` in a script: SIGINT is ignored by inheritance; the worker must still stop on it."""
    proc = drills.start(tmp_path, shared_cache, "train", "--epochs", "2", *FAST, ignore_sigint=True)
    run = run_dir_of(tmp_path)
    drills.stop_at(proc, run, {"event": "train_start", "epoch": 0}, signal.SIGINT)
    code, err = drills.finish(proc)
    assert code == 130, err
    assert "yolosafe: worker stopped by SIGINT" in (run / "train.log").read_text()  # not SIGKILLed after 8 s


def test_missing_story_and_an_epoch_row_past_the_checkpoint(tmp_path, shared_cache, failed_run):
    """``yolosafe.json`` gone: the resume rebuilds it from last.pt and args.yaml. And a stop after an epoch's row
    was written but before its checkpoint: the resume trains that epoch again, its row is there once."""
    damaged = copy_of(failed_run, tmp_path / "a")
    (damaged / "yolosafe.json").write_text("{not json")
    dry = train(tmp_path, shared_cache, "--resume", str(damaged), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "yolosafe.json is damaged: resuming from weights/last.pt and args.yaml alone" in dry.stderr
    assert (damaged / "yolosafe.json").read_text() == "{not json"  # a dry run changes nothing

    run = copy_of(failed_run, tmp_path)
    (run / "yolosafe.json").unlink()
    rows = (run / "results.csv").read_text().splitlines()
    assert epochs_of(run) == [1]
    (run / "results.csv").write_text("\n".join([*rows, rows[-1].replace("1,", "2,", 1)]) + "\n")
    result = train(tmp_path, shared_cache, "--resume", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "yolosafe.json is missing: resuming from weights/last.pt and args.yaml alone" in result.stderr
    assert story(run)["outcome"] == "completed" and epochs_of(run) == [1, 2]


def test_a_corrupt_checkpoint_names_what_can_stand_in(tmp_path, shared_cache, failed_run):
    run = copy_of(failed_run, tmp_path)
    shutil.copy2(run / "weights" / "last.pt", run / "weights" / "last-before-attempt2.pt")
    (run / "weights" / "last.pt").write_bytes(b"\0" * 100)
    result = train(tmp_path, shared_cache, "--resume", str(run))
    assert_usage_error(result, "weights/last.pt", "best.pt, last-before-attempt2.pt are there",
                       "copy one to weights/last.pt")


def test_an_empty_resume_is_refused(run_cli, tmp_path):
    assert_usage_error(run_cli("train", "--resume", ""), "--resume ''", "empty")
    assert not (tmp_path / "runs").exists()


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


RECORDS_KIB = 1024  # what a resumed epoch writes beside its checkpoints: logs, events, results, the story


def test_a_full_disk_during_a_checkpoint_save(tmp_path, shared_cache, failed_run):
    """A tmpfs that holds epoch 1's checkpoints but not epoch 2's partial last.pt."""
    disk = tmp_path / "disk"
    # epoch 1 holds at most 3 checkpoints at once (unvalidated.pt, last.pt, best.pt's partial), epoch 2 needs a 4th
    size_kib = (failed_run / "weights" / "last.pt").stat().st_size * 7 // 2 // 1024
    if not _mount_tmpfs(disk, f"{size_kib}k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        result = train(disk, shared_cache, "--epochs", "2", *FAST, "--save-every", "1h")  # unvalidated.pt each epoch
        run = run_dir_of(disk)
        assert result.returncode == 1, result.stderr[-3000:]
        lines = drills.yolosafe_lines(result.stderr)
        failed = [ln for ln in lines if "training failed" in ln]
        assert len(failed) == 1 and "No space left on device" in failed[0] and "free at least" in failed[0]
        need_mib = float(re.search(r"free at least ([0-9.]+) MiB", failed[0]).group(1))
        assert "Traceback" not in result.stderr
        assert story(run)["outcome"] == "failed"
        leftovers = [p.name for p in run.rglob("*") if p.name.endswith((".partial", ".tmp"))]
        assert leftovers == []
        assert (run / "weights" / "last.pt").stat().st_size > 0
        # Just the space the line asks for, and room for the records and logs (the hint counts checkpoints).
        fs = os.statvfs(disk)
        used_kib = (fs.f_blocks - fs.f_bfree) * fs.f_frsize // 1024
        size = used_kib + int(need_mib * 1024) + RECORDS_KIB
        subprocess.run(["mount", "-o", f"remount,size={size}k", str(disk)], check=True)
        resumed = train(disk, shared_cache, "--resume", str(run))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert story(run)["outcome"] == "completed" and epochs_of(run) == [1, 2]
    finally:
        time.sleep(0.2)
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_ctrl_c_to_the_group_after_an_epoch_of_two_ranks_then_resume(tmp_path, shared_cache):
    """Ctrl-C as a terminal sends it (to the process group), right after rank 0 validated epoch 1: its row of
    results.csv may be written before its checkpoint; after the resume each epoch is there once."""
    two = {"YOLOSAFE_FAKE_GPUS": "2x24GB"}
    proc = drills.start(tmp_path, shared_cache, "train", "--gpus", "0,1", "--epochs", "1", *FAST, env=two)
    run = run_dir_of(tmp_path)
    drills.stop_at(proc, run, {"event": "val_end", "epoch": 0, "rank": 0}, signal.SIGINT, group=True)
    code, err = drills.finish(proc)
    assert code == 130, err
    assert "Traceback" not in err and story(run)["outcome"] == "interrupted"
    result = train(tmp_path, shared_cache, "--resume", str(run), env=two)
    assert result.returncode == 0, result.stderr[-3000:]
    assert story(run)["outcome"] == "completed" and epochs_of(run) == [1]


def test_sigterm_as_the_oom_is_said_then_resume_runs_the_halved_batch(tmp_path, shared_cache):
    """SIGTERM the moment the supervisor says the OOM: before the relaunch (the stop waits until the next plan is
    recorded) or during it; either way one line, and the resume runs the halved batch."""
    proc = drills.start(tmp_path, shared_cache, "train", "--epochs", "1", *FAST,
                        env={"YOLOSAFE_INJECT_OOM": "phase=train,epoch=0"})
    run = run_dir_of(tmp_path)
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("yolosafe: OOM in"):
            proc.send_signal(signal.SIGTERM)
            break
    code, err = drills.finish(proc)
    assert code == 130, err
    assert [ln for ln in drills.yolosafe_lines(err) if "stopped" in ln] == [
        f"yolosafe: stopped by SIGTERM; resume with: yolosafe train --resume {run}"]
    first = story(run)["attempts"][0]
    assert first["outcome"] == "oom" and first["next"].startswith("batch 8 -> 4")
    result = train(tmp_path, shared_cache, "--resume", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    s = story(run)
    assert s["outcome"] == "completed" and s["attempts"][-1]["batch"] == 4 and epochs_of(run) == [1]


def test_stop_while_the_model_and_data_are_built_then_resume(tmp_path, shared_cache):
    """SIGTERM while the worker builds the trainer, its dataset and loaders (after it loaded the model, before the
    first epoch starts): one line, the story says interrupted, and the resume trains the run from the start."""
    proc = drills.start(tmp_path, shared_cache, "train", "--epochs", "1", *FAST)
    run = run_dir_of(tmp_path)
    seen = run / "worker-1.json"
    drills.wait_until(lambda: seen.is_file() and seen.stat().st_size > 0, proc, "the worker's record")
    worker = json.loads(seen.read_text())["pid"]
    signal_while_frozen(proc, worker, signal.SIGTERM)
    code, err = drills.finish(proc)
    assert code == 130 and "Traceback" not in err, err
    assert not [e for e in drills.events(run) if e["event"] == "train_start"]  # it stopped before the first epoch
    assert story(run)["outcome"] == "interrupted"
    result = train(tmp_path, shared_cache, "--resume", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    assert story(run)["outcome"] == "completed" and epochs_of(run) == [1]


def test_sigkill_of_the_rank_launcher_then_resume(tmp_path, shared_cache):
    """The launcher of two ranks killed by SIGKILL mid-epoch: its ranks end themselves (their parent is gone), the
    supervisor says it in one line, and the resume completes the run."""
    import psutil

    two = {"YOLOSAFE_FAKE_GPUS": "2x24GB"}
    proc = drills.start(tmp_path, shared_cache, "train", "--gpus", "0,1", "--epochs", "1", *FAST, env=two)
    run = run_dir_of(tmp_path)
    def both_training() -> bool:
        return len({e["rank"] for e in drills.events(run) if e["event"] == "train_start"}) == 2

    drills.wait_until(both_training, proc, "two ranks training")
    ranks = {e["pid"] for e in drills.events(run) if e["event"] == "train_start"}
    launcher = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                    if "yolosafe.training.launcher" in " ".join(p.cmdline()))
    launcher.kill()
    code, err = drills.finish(proc)
    assert code == 1 and "Traceback" not in err, err
    for pid in ranks:
        drills.wait_gone(pid)
    assert story(run)["outcome"] not in ("running", None)
    result = train(tmp_path, shared_cache, "--resume", str(run), env=two)
    assert result.returncode == 0, result.stderr[-3000:]
    assert story(run)["outcome"] == "completed" and epochs_of(run) == [1]


def signal_while_frozen(proc: subprocess.Popen[str], pid: int, signum: int) -> None:
    """``signum`` to the supervisor while process ``pid`` is frozen, so the stop lands where ``pid`` is now."""
    os.kill(pid, signal.SIGSTOP)
    try:
        proc.send_signal(signum)
        time.sleep(0.3)
    finally:
        os.kill(pid, signal.SIGCONT)
