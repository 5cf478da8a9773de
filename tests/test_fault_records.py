"""Faults whose effect is on the records, without training: a stop between an OOM and its relaunch (the real signal,
sent as the loop says the OOM), the plan a resume runs after it, a worker that finished as a stop came, a killed
run's story marked by whoever reads it first, results.csv trimmed, a failed write leaving no temp file."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest

from tests.conftest import run_dir_of
from tests.test_attempts import OOM_TRAIN, StubChild, plan4
from tests.test_cli import assert_usage_error
from tests.test_misuse import fake_run
from yolosafe.exits import Exit
from yolosafe.proc import AttemptResult
from yolosafe.rundir import files as rundir
from yolosafe.rundir import records, results
from yolosafe.rundir.records import Outcome, Story
from yolosafe.supervisor.loop import AttemptLoop, Limits
from yolosafe.supervisor.policy import classify


class Unhandled(Exception):
    """The signal reached the test's own handler: the loop did not handle it (the real default would kill it)."""


@pytest.fixture
def guard():
    def unhandled(signum, _frame):
        raise Unhandled(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, unhandled)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("at", ["OOM in", "retry 1/3"])
def test_sigterm_between_an_oom_and_its_relaunch_stops_with_the_next_plan_recorded(tmp_path, guard, at):
    said: list[str] = []

    def say(line: str) -> None:
        said.append(line)
        if line.startswith(at):
            os.kill(os.getpid(), signal.SIGTERM)

    child = StubChild(tmp_path, [OOM_TRAIN])
    loop = AttemptLoop(tmp_path, Story(), child, Limits(3, 1), lambda: {}, say)
    code = loop.run(plan4())
    assert code == Exit.INTERRUPTED and len(child.requests) == 1  # the relaunch never started
    assert said[-1] == f"stopped by SIGTERM; resume with: yolosafe train --resume {tmp_path}"
    story = records.load_story(tmp_path)
    assert story.outcome == "interrupted" and len(story.attempts) == 1
    last = story.attempts[0]
    assert last.outcome == "oom" and last.next.startswith("batch 64 -> 32")
    assert last.extra["next_plan"] == {"batch": 32, "val_batch": 16, "final_val_only": False}


def test_a_resume_after_that_stop_runs_the_next_plan(run_cli, tmp_path):
    run = fake_run(tmp_path, outcome="interrupted")
    s = json.loads((run / rundir.STORY).read_text())
    s["attempts"][0].update(outcome="oom", next="batch 8 -> 4", next_plan={"batch": 4, "val_batch": 4,
                                                                          "final_val_only": False})
    rundir.write_json(run / rundir.STORY, s)
    result = run_cli("train", "--resume", str(run), "--dry-run", env={"YOLOSAFE_FAKE_GPUS": "2x24GB"})
    assert result.returncode == 0, result.stderr
    assert "4 total = 2 per GPU" in result.stdout


def test_a_worker_that_finished_as_a_stop_came_is_completed():
    end = classify(AttemptResult(0, 1.0, interrupted=signal.SIGINT), [], "")
    assert end.outcome == Outcome.COMPLETED


def test_the_killed_attempt_is_abandoned_whoever_reads_first(tmp_path):
    run = fake_run(tmp_path, outcome="running")
    s = json.loads((run / rundir.STORY).read_text())
    s["attempts"][0]["outcome"] = None  # as the supervisor writes it while the attempt runs
    s["memory_watch"] = None
    rundir.write_json(run / rundir.STORY, s)
    fd = rundir.lock(run)  # a resume holds the lock when it looks
    try:
        assert rundir.mark_if_orphaned(run, locked_here=True)
    finally:
        os.close(fd)
    marked = records.load_story(run)
    assert marked.outcome == "abandoned" and marked.attempts[0].outcome == "abandoned"


def test_report_of_a_killed_run_is_one_line(run_cli, tmp_path):
    run = fake_run(tmp_path, outcome="running")
    (run / rundir.MEMORY_CSV).write_text("t,attempt,gpu,used_mib,total_mib,ours_mib,others_mib\n"
                                         "1.0,1,0,100,24576,100,0\n")
    s = json.loads((run / rundir.STORY).read_text())
    s["memory_watch"] = None
    rundir.write_json(run / rundir.STORY, s)
    result = run_cli("report", str(run))
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    (run / rundir.STORY).write_text("{damaged")
    result = run_cli("report", str(run))
    assert "Traceback" not in result.stdout + result.stderr, result.stderr


def test_results_keep_each_epoch_of_the_checkpoint_once(tmp_path):
    (tmp_path / "results.csv").write_text("epoch,loss\n1,0.5\n2,0.4\n2,0.4\n3,0.3\n")
    assert results.trim(tmp_path, 2) == 2
    assert (tmp_path / "results.csv").read_text() == "epoch,loss\n1,0.5\n2,0.4\n"


def test_a_failed_json_write_leaves_no_temp_file(tmp_path, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError):
        rundir.write_json(tmp_path / "x.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_an_empty_resume_makes_no_run(run_cli, tmp_path):
    assert_usage_error(run_cli("train", "--resume", "", "--dry-run"), "--resume ''")
    assert not run_dir_of(tmp_path).exists()
