"""Hangs: every rank's heartbeat, the supervisor's hang watch with timeouts learnt from the run, every rank's stack
at a hang, the relaunch. Unit tests for the pure parts over real files and real processes (a SIGSTOPped child's stack
is dumped for real); drills with real ranks over gloo (fake GPUs) running the real trainer, where the hangs are the
injected sleeps of ``YOLOSAFE_INJECT_HANG`` or a real SIGSTOP."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import TINY, YOLOSAFE, cli_env, run_dir_of, story, wait_until
from tests.drills import events
from tests.test_multinode import two_nodes  # noqa: F401 - the fixture
from yolosafe import hang
from yolosafe.rundir import heartbeat as beats
from yolosafe.rundir.layout import RunDir
from yolosafe.rundir.records import load_hang
from yolosafe.supervisor import hangwatch, stacks
from yolosafe.supervisor.hangwatch import RankSeen, Timeouts

TWO = {"YOLOSAFE_FAKE_GPUS": "2x24GB", "OMP_NUM_THREADS": "1"}
SLACK_S = 3.0  # a loaded machine may run the watch's thread late; the figures found are in the note


# --- the injection -------------------------------------------------------------------------------------------------


def test_injections_parse_and_bad_ones_are_one_line():
    found = hang.parse_injections("phase=train,epoch=1,rank=1; phase=save,epoch=0,rank=0,seconds=2.5")
    assert found == (hang.HangInjection("train", 1, 1), hang.HangInjection("save", 0, 0, seconds=2.5))
    assert found[0].matches("train", 1, 0, 1) and not found[0].matches("train", 1, 1, 1)
    assert found[1].matches("save", 0, 37, 0)  # a save has no batch index
    for bad, words in (("phase=test", "phase must be train/val/save"), ("rank=x", "rank='x' must be a whole"),
                       ("when=1", "keys: phase, epoch")):
        with pytest.raises(hang.HangInjectionError, match=words):
            hang.parse_injections(bad)
    for spec, world, epochs, words in (("rank=2", 2, 2, "rank=2 does not exist"), ("epoch=2", 2, 2, "never comes"),
                                       ("phase=save,rank=1", 2, 2, "rank 0 only")):
        with pytest.raises(hang.HangInjectionError, match=words):
            hang.check_injections(spec, world, epochs)


def test_a_hang_injection_that_cannot_fire_is_a_usage_error(run_cli, tmp_path):
    result = run_cli("train", "--gpus", "0,1", "--epochs", "1", *TINY, env={**TWO, hang.INJECT_ENV: "rank=5"})
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "rank=5 does not exist: this run has ranks 0-1" in result.stderr and not (tmp_path / "runs").exists()
    result = run_cli("train", "--epochs", "1", "--hang-timeout", "-3", *TINY)
    assert result.returncode == 2 and "--hang-timeout -3" in result.stderr and result.stderr.count("\n") == 1


# --- heartbeats and timeouts ---------------------------------------------------------------------------------------


def test_a_beat_is_read_back_as_written_and_overwrites_the_last(tmp_path):
    path = RunDir(tmp_path).heartbeat(3, 1)
    writer = beats.Writer(path)
    writer.beat("train", 1, 12, 1700000000.25, 4242, 1)
    writer.beat("train", 1, 13, 1700000000.75, 4242, 1)
    writer.beat("sync", 2, 3, 1700000001.5, 4242, 1)
    assert beats.read(path) == beats.Beat("sync", 2, 3, 1700000001.5, 3, 4242, 1, {"train": 0.75})
    assert path.stat().st_size == beats.WIDTH and RunDir(tmp_path).heartbeats(3) == [path]
    assert RunDir(tmp_path, node=1).heartbeat(3, 2).parent.name == "attempt-3"  # each node's own folder
    path.write_bytes(b'{"state":"tr')  # a torn read keeps nothing
    assert beats.read(path) is None


def test_timeouts_are_learnt_floored_and_overridden():
    learnt = Timeouts()
    assert learnt.of("train") == (hangwatch.FLOORS["train"], "floor")
    learnt.learn("train", 0.5)
    assert learnt.of("train") == (hangwatch.MIN_LEARNT_S, "learnt")
    learnt.learn("train", 9.0)
    assert learnt.of("train") == (90.0, "learnt")
    fixed = Timeouts(override=20)
    assert fixed.of("val") == (20, "--hang-timeout")
    assert fixed.of("setup") == (hangwatch.FLOORS["setup"], "floor")  # set-up (dataset caching) beats nothing


def seen(state: str, t: float, rank: int = 0) -> RankSeen:
    return RankSeen(beats.Beat(state, 0, 0, t, 1, 100 + rank, rank), t)


def test_a_rank_waiting_for_a_live_rank_is_no_hang_and_the_rank_elsewhere_is_the_stuck_one():
    timeouts, now = Timeouts(override=10), 1000.0
    waiting_for_save = {0: seen("save", now - 5, 0), 1: seen("sync", now - 15, 1)}
    assert hangwatch.overdue(waiting_for_save, timeouts, now) == []
    both = {0: seen("train", now - 11, 0), 1: seen("train", now - 11.5, 1)}
    late = hangwatch.overdue(both, timeouts, now)
    assert late == [0, 1]
    dumps = {0: stacks.RankStack(0, 'File "x/torch/autograd/graph.py", line 1 in run', True, Path("a")),
             1: stacks.RankStack(1, 'File "y/heartbeat.py", line 80 in maybe_hang', False, Path("b"))}
    assert hangwatch.culprit(both, late, dumps, stopped=set()) == 1  # rank 0 waits for it in backward
    assert hangwatch.culprit(both, late, dumps, stopped={0}) == 0  # a stopped rank first


def test_a_rank_persistently_slower_in_its_own_part_of_the_steps_is_named_once():
    from yolosafe.supervisor.stragglers import Stragglers

    compare = Stragglers(window=10, windows=2)

    def at(steps: int, slow: float) -> dict[int, beats.Beat]:
        return {r: beats.Beat("train", 0, steps, 0.0, steps, 1, r, {}, own=steps * (slow if r == 2 else 0.1),
                              steps=steps) for r in range(4)}

    assert compare.feed(at(9, 0.3)) is None  # not a window yet
    assert compare.feed(at(10, 0.3)) is None  # one window: not yet persistent
    named = compare.feed(at(20, 0.3))
    assert named is not None and (named["rank"], named["ratio"], named["steps"]) == (2, 3.0, 20)
    assert compare.feed(at(30, 0.3)) is None and compare.feed(at(40, 0.3)) is None  # named once
    even = Stragglers(window=10, windows=2)
    assert all(even.feed(at(n, 0.12)) is None for n in (10, 20, 30))  # 1.2x: within the noise


STUCK_CHILD = textwrap.dedent("""
    import faulthandler, signal, sys, threading, time
    out = open(sys.argv[1], "a")
    out.write(f"yolosafe: stacks of rank 0, pid 0, main thread 0x{threading.main_thread().ident:016x}\\n")
    out.flush()
    faulthandler.register(signal.SIGRTMIN + 3, file=out, all_threads=True, chain=False)
    threading.Thread(target=lambda: time.sleep(60), daemon=True).start()
    def stuck_here():
        print("ready", flush=True)
        time.sleep(60)
    stuck_here()
""")


def test_a_stopped_process_is_continued_to_write_its_stack_where_it_was_stopped(tmp_path):
    """A SIGSTOPped process cannot run a handler: the dump signal is queued, SIGCONT delivers it first."""
    assert hang.STACK_SIGNAL == signal.SIGRTMIN + 3
    out = tmp_path / "rank-0.txt"
    child = subprocess.Popen([sys.executable, "-c", STUCK_CHILD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        os.kill(child.pid, signal.SIGSTOP)
        deadline = time.time() + 10
        while not stacks.is_stopped(child.pid):
            assert time.time() < deadline
            time.sleep(0.05)
        found = stacks.dump({0: child.pid}, {0: out}, {0: tmp_path / "rank-0.py-spy.txt"})
        assert found[0].frame is not None and found[0].frame.endswith("in stuck_here"), out.read_text()
        assert not found[0].collective and not stacks.is_stopped(child.pid)
        if shutil.which("py-spy"):  # its native frames too, where it is installed
            assert found[0].native is not None and "stuck_here" in found[0].native.read_text()
    finally:
        child.kill()
        child.wait()


def test_a_hang_relaunches_the_same_plan_from_the_checkpoint_and_the_next_one_ends_the_run(tmp_path):
    from tests.test_attempts import DONE, StubChild, plan4
    from yolosafe.exits import Exit
    from yolosafe.rundir.records import Outcome, Story
    from yolosafe.supervisor.loop import AttemptLoop, Limits
    from yolosafe.supervisor.policy import AttemptEnd

    hung = AttemptEnd(Outcome.HUNG, "train", epoch=1, rank=1, message="hang: rank 1 stuck")
    for ends, restarts, code, outcome in (([hung, DONE], 1, Exit.OK, Outcome.COMPLETED),
                                          ([hung, hung], 1, Exit.FAILED, Outcome.HUNG)):
        said: list[str] = []
        folder = tmp_path / f"{restarts}-{len(said)}-{code}"
        folder.mkdir()
        child = StubChild(folder, ends)
        loop = AttemptLoop(folder, Story(), child, Limits(max_hang_restarts=restarts), lambda: {}, said.append)
        assert loop.run(plan4()) == code and loop.story.outcome == outcome
        assert [r.plan for r in child.requests] == [plan4()] * 2  # nothing wrong with the plan
        assert child.requests[1].resume == folder / "weights" / "last-before-attempt2.pt"
        assert said[0] == f"relaunch 1/1 after the hang; resuming from {folder / 'weights' / 'last.pt'}"
        assert loop.story.attempts[0].outcome == "hung" and loop.story.attempts[0].next == "relaunch after a hang"
    assert said[-1].startswith("giving up after 1 relaunch after hangs (--max-hang-restarts 1)")


def test_every_node_agrees_on_the_hang_another_node_found():
    from yolosafe.rundir.records import Hang, Outcome
    from yolosafe.supervisor.multinode import agree

    found = Hang.new(attempt=2, node=1, rank=3, phase="train", epoch=1, message="hang: rank 3 of node 1 stuck")
    ends = [{"node": 0, "exit_code": 1, "records": [{"attempt": 2, "rank": 0, "signal": "SIGTERM"}]},
            {"node": 1, "exit_code": -9, "hang": found.to_dict()}]
    decided = agree.decide(ends, 2)
    assert (decided.outcome, decided.rank, decided.node, decided.phase) == (Outcome.HUNG, 3, 1, "train")


# --- drills: real ranks --------------------------------------------------------------------------------------------


def hangs_of(run: Path) -> list:
    return [load_hang(p) for p in RunDir(run).hangs()]


def each_epoch_once(run: Path, epochs: int) -> None:
    rows = [int(float(r.split(",")[0])) for r in (run / "results.csv").read_text().strip().splitlines()[1:]]
    assert rows == list(range(1, epochs + 1)), rows


@pytest.mark.slow
def test_hangs_in_training_validation_and_save_are_found_stacked_relaunched_and_a_long_pause_is_not(run_cli,
                                                                                                   tmp_path):
    """One run, four faults: a 10 s pause in epoch 1 under --hang-timeout 20 (no hang), then rank 1 stuck in a
    training step of epoch 2, rank 0 stuck in its validation, rank 0 stuck in the checkpoint save; each found within
    the timeout plus one sampling period, every rank's stack written, relaunched from the last checkpoint (the
    unvalidated epoch after a validation hang), and the run completes with each epoch trained once."""
    spec = ("phase=train,epoch=0,rank=1,seconds=10;phase=train,epoch=1,rank=1;phase=val,epoch=1,rank=0;"
            "phase=save,epoch=1,rank=0")
    result = run_cli("train", "--gpus", "0,1", "--epochs", "2", *TINY, "--hang-timeout", "20",
                     "--max-hang-restarts", "3", "--save-every", "1h",  # the trained state kept before each validation
                     env={**TWO, hang.INJECT_ENV: spec})
    assert result.returncode == 0, result.stderr[-3000:]
    run = run_dir_of(tmp_path)
    found = hangs_of(run)
    assert [(h.attempt, h.rank, h.phase, h.epoch) for h in found] == [(1, 1, "train", 1), (2, 0, "val", 1),
                                                                        (3, 0, "save", 1)]
    print("found after (s):", {h.phase: h.stuck_s for h in found})
    for h in found:
        assert 20 <= h.stuck_s <= 20 + hangwatch.POLL_S + SLACK_S, h
        assert h.frame and "maybe_hang" in h.frame and not h.stopped
        assert h.waiting == [1 - h.rank]  # the other rank waits for it in a collective
        for rank in (0, 1):
            text = RunDir(run).stack(h.attempt or 0, rank).read_text()
            assert "most recent call first" in text, text
    outcomes = [(a["outcome"], a["next"]) for a in story(run)["attempts"]]
    assert outcomes == [("hung", "relaunch after a hang")] * 3 + [("completed", None)]
    assert story(run)["outcome"] == "completed"
    each_epoch_once(run, 2)
    assert "injected hang on rank 1 in train at epoch 1, iteration 0 for 10 s" in (run / "train.log").read_text()
    assert result.stderr.count("yolosafe: hang: rank ") == 3 and "relaunch 3/3 after the hang" in result.stderr
    shown = run_cli("report", str(run), env=TWO).stdout
    assert shown.count(": hang: rank ") == 3 and str(RunDir(run).stack(1, 1)) in shown
    doctor = run_cli("doctor", str(run), env=TWO).stdout
    assert "attempt 1 hung: rank 1 made no progress" in doctor and str(RunDir(run).stack(1, 1)) in doctor


def start(tmp_path: Path, shared_cache: Path, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([YOLOSAFE, "train", *args], cwd=tmp_path, env=cli_env(shared_cache, env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def stop_rank_at(proc: subprocess.Popen[str], run: Path, match: dict) -> dict:
    found: dict = {}

    def hit() -> bool:
        event = next((e for e in events(run) if all(e.get(k) == v for k, v in match.items())), None)
        found.update(event or {})
        return event is not None

    wait_until(hit, proc, f"event {match}", 240)
    os.kill(found["pid"], signal.SIGSTOP)  # at an epoch's start: its state was learnt in the epoch before
    return found


@pytest.mark.slow
def test_a_sigstopped_rank_is_found_with_the_learnt_timeout_and_the_run_relaunched(tmp_path, shared_cache):
    """No --hang-timeout: the timeout of a training step is learnt from epoch 1 (10 x its longest interval, at
    least a minute); rank 1 stopped in epoch 2 is found, named as stopped, continued to write its stack, and the run
    completes from epoch 1's checkpoint."""
    proc = start(tmp_path, shared_cache, "--gpus", "0,1", "--epochs", "2", *TINY, env=TWO)
    run = run_dir_of(tmp_path)
    wait_until(lambda: (run / "events.jsonl").is_file(), proc, "the run directory", 120)
    stopped = stop_rank_at(proc, run, {"event": "train_start", "epoch": 1, "rank": 1, "attempt": 1})
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    (found,) = hangs_of(run)
    assert (found.rank, found.pid, found.stopped, found.timeout_source) == (1, stopped["pid"], True, "learnt")
    print(f"stopped rank found after {found.stuck_s} s (learnt timeout {found.timeout_s} s)")
    assert found.stuck_s <= found.timeout_s + hangwatch.POLL_S + SLACK_S
    assert "stopped (SIGSTOP, state T)" in err
    assert "most recent call first" in RunDir(run).stack(1, 1).read_text()  # its stack, after SIGCONT
    each_epoch_once(run, 2)


@pytest.mark.slow
def test_a_sigstopped_single_worker_is_found_and_relaunched(tmp_path, shared_cache):
    """One process, no DDP: nothing else would ever notice it."""
    proc = start(tmp_path, shared_cache, "--gpus", "cpu", "--epochs", "1", *TINY, "--hang-timeout", "15",
                 env={"OMP_NUM_THREADS": "1"})
    run = run_dir_of(tmp_path)
    wait_until(lambda: (run / "events.jsonl").is_file(), proc, "the run directory", 120)
    stop_rank_at(proc, run, {"event": "train_start", "epoch": 0, "attempt": 1})
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    (found,) = hangs_of(run)
    assert (found.rank, found.stopped, found.phase) == (-1, True, "train")
    assert "the worker stopped (SIGSTOP, state T)" in err and "from scratch" in err
    assert json.loads((run / "yolosafe.json").read_text())["outcome"] == "completed"
    each_epoch_once(run, 1)


@pytest.mark.slow
def test_a_rank_stuck_on_node_1_is_found_there_and_both_nodes_relaunch(two_nodes, tmp_path):  # noqa: F811
    """Two nodes of one rank each: node 1's rank sleeps in a step of epoch 2. Node 1's watch names it; node 0's rank
    waits for it in backward's all-reduce, so node 0's watch waits for the other node's verdict; both nodes agree on
    the hang and relaunch from node 0's checkpoint."""
    args = ["--gpus", "0", "--imgsz", "64", "--batch", "8", "--effective-batch", "16", "workers=0", "plots=False",
            "--name", "two", "--rdzv-timeout", "60", "--epochs", "2", "--hang-timeout", "20"]
    procs = two_nodes(*args, env={hang.INJECT_ENV: "phase=train,epoch=1,node=1,rank=0", "OMP_NUM_THREADS": "1"})
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    run = tmp_path / "runs" / "detect" / "two"
    (found,) = hangs_of(run)
    assert (found.node, found.rank, found.phase, found.epoch, found.stopped) == (1, 1, "train", 1, False)
    assert found.stuck_s is not None and found.stuck_s <= 20 + hangwatch.POLL_S + SLACK_S
    print(f"node 1's stuck rank found after {found.stuck_s} s")
    assert "every rank of node 0 waits in a collective" in errs[0]
    mine, theirs = story(run), json.loads((run / "yolosafe-node1.json").read_text())
    for told in (mine, theirs):
        assert [a["outcome"] for a in told["attempts"]] == ["hung", "completed"], told["attempts"]
    each_epoch_once(run, 2)


@pytest.mark.slow
def test_a_throttled_rank_is_named_a_straggler_in_one_warning_and_in_the_report(run_cli, tmp_path, shared_cache):
    """Rank 1 stopped half of every 100 ms (SIGSTOP/SIGCONT, as a throttled GPU or a shared CPU slows it): its own
    part of each step is about twice the other rank's; named once, in the story, report and doctor; no hang."""
    import threading

    proc = start(tmp_path, shared_cache, "--gpus", "0,1", "--epochs", "8", "--imgsz", "64", "--batch", "4",
                 "--effective-batch", "8", "workers=0", "plots=False", env=TWO)
    run = run_dir_of(tmp_path)
    wait_until(lambda: (run / "events.jsonl").is_file(), proc, "the run directory", 120)
    rank1 = stop_rank_at(proc, run, {"event": "train_start", "epoch": 0, "rank": 1, "attempt": 1})["pid"]
    os.kill(rank1, signal.SIGCONT)

    def throttle() -> None:
        while proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rank1, signal.SIGSTOP)
                time.sleep(0.05)
                os.kill(rank1, signal.SIGCONT)
            time.sleep(0.05)

    threading.Thread(target=throttle, daemon=True).start()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert err.count("straggler: rank 1's own part of each training step") == 1, err[-3000:]
    (named,) = story(run)["stragglers"]
    assert named["rank"] == 1 and named["ratio"] >= 1.5 and not hangs_of(run)
    print(f"straggler named: {named}")
    assert "straggler: rank 1" in run_cli("report", str(run), env=TWO).stdout
    assert "straggler: rank 1" in run_cli("doctor", str(run), env=TWO).stdout
