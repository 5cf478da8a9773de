"""Resume follows the run directory, with real (tiny) trainings: a moved run resumes in place, a copied run resumes
into the copy and never touches the original, a live run cannot be resumed a second time, and what the terminal
shows of a run that fails or is interrupted.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import TINY, YOLOSAFE, cli_env, failed_in_epoch_2, run_dir_of, story, wait_until
from tests.test_cli import assert_usage_error

pytestmark = pytest.mark.slow


@pytest.fixture
def failed_run(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Path:
    """A 2-epoch run that failed (not an OOM) in epoch 2: weights/last.pt holds epoch 1."""
    return failed_in_epoch_2(tmp_path_factory.mktemp("failed"), shared_cache)


def digest(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}


def epochs_of(run: Path) -> list[int]:
    return [int(row.split(",")[0]) for row in (run / "results.csv").read_text().splitlines()[1:]]


def test_copied_then_moved_run_resumes_where_it_is(run_cli, tmp_path, failed_run):
    """The checkpoint names the run's first place (Ultralytics' save_dir): a copy must not write there, a moved run
    must not recreate it."""
    before = digest(failed_run)
    copy = tmp_path / "copy"
    shutil.copytree(failed_run, copy)
    result = run_cli("train", "--resume", str(copy))
    assert result.returncode == 0, result.stderr[-3000:]
    assert digest(failed_run) == before  # every byte of the original run as it was
    assert story(copy)["outcome"] == "completed" and epochs_of(copy) == [1, 2]
    assert story(copy)["resumes"][-1]["previous_run_dir"] == str(failed_run)

    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    failed_run.rename(moved)
    result = run_cli("train", "--resume", str(moved), "--batch", "4", "--effective-batch", "32")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not failed_run.exists()  # nothing written where the run used to be
    s = story(moved)
    assert s["outcome"] == "completed" and s["run_dir"] == str(moved)
    assert s["resumes"][-1]["applied"] == {"batch": 4, "effective_batch": 32}
    assert (s["attempts"][-1]["batch"], s["attempts"][-1]["nbs"]) == (4, 32)
    assert epochs_of(moved) == [1, 2]
    args = (moved / "args.yaml").read_text()
    assert f"save_dir: {moved}" in args and "nbs: 32" in args
    assert "Resume ignores" not in (moved / "train.log").read_text()


def test_live_run_is_refused_and_ctrl_c_keeps_tracebacks_off_the_terminal(tmp_path, shared_cache):
    proc = subprocess.Popen([YOLOSAFE, "train", "--epochs", "30", *TINY], cwd=tmp_path, env=cli_env(shared_cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = run_dir_of(tmp_path)
    wait_until(lambda: (run / "events.jsonl").is_file(), proc, "training start")
    for args in (["--resume", str(run)], ["--name", "train"]):
        result = subprocess.run([YOLOSAFE, "train", *args], cwd=tmp_path, env=cli_env(shared_cache),
                                capture_output=True, text=True, timeout=60)
        assert_usage_error(result, f"pid {proc.pid}")
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in out + err
    assert "KeyboardInterrupt" in (run / "train.log").read_text()
    assert story(run)["outcome"] == "interrupted" and len(story(run)["attempts"]) == 1


def test_a_resumed_plan_accumulates_what_the_new_run_did():
    """The resumed plan is built from the same inputs as the new run, the dataset's size included: batch 4, nbs 64,
    1 epoch, 8 images accumulates 2 steps (Ultralytics caps it at the run's iterations) before and after a resume."""
    from yolosafe.planning import resume
    from yolosafe.planning.trainplan import build_plan
    from yolosafe.rundir.records import Attempt, Story

    new = build_plan(model="yolov8n.yaml", data="d.yaml", gpus=(), batch=4, effective_batch=64, imgsz=32, epochs=1,
                     train_images=8)
    story = Story.from_dict({"plan": new.summary(), "attempts": [Attempt(attempt=1, batch=4).to_dict()]})
    resumed, _ = resume._plan(story, {})
    assert new.accumulate == resumed.accumulate == 2
    assert resumed.summary() == new.summary()
