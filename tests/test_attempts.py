"""The attempt loop with a stub child (no process, no training): every outcome and the whole sequence of plans it
asks for, in the style of accelerate's ``find_executable_batch_size`` tests. Milliseconds each."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from yolosafe.exits import Exit
from yolosafe.planning.trainplan import build_plan
from yolosafe.proc import AttemptResult
from yolosafe.rundir import records
from yolosafe.rundir.records import Outcome, Story
from yolosafe.supervisor.loop import AttemptLoop, Limits, Request
from yolosafe.supervisor.policy import AttemptEnd

OOM_TRAIN = AttemptEnd(Outcome.OOM, "train", epoch=3, rank=2, gpu=2)
OOM_VAL = AttemptEnd(Outcome.OOM, "val", epoch=3, rank=1, gpu=1)
OOM_FINAL = AttemptEnd(Outcome.OOM, "final", epoch=9, rank=0, gpu=0)
DONE = AttemptEnd(Outcome.COMPLETED)


class StubChild:
    """Plays the child of each attempt: records what it was asked to run and ends as scripted. A training attempt
    leaves ``weights/last.pt`` behind, as the real one does after its first epoch (a new file renamed over it:
    ``training.trainer.AtomicCheckpoints``)."""

    def __init__(self, run_dir: Path, ends: list[AttemptEnd | BaseException]) -> None:
        self.run_dir, self.ends, self.requests = run_dir, list(ends), []

    def __call__(self, request: Request) -> tuple[AttemptResult, AttemptEnd]:
        self.requests.append(request)
        end = self.ends.pop(0)
        if isinstance(end, BaseException):
            raise end
        if not request.final_val_only:
            (self.run_dir / "weights").mkdir(exist_ok=True)
            partial = self.run_dir / "weights" / ".last.pt.partial"  # written beside and renamed, as the trainer does
            partial.write_bytes(f"after attempt {request.attempt}".encode())
            os.replace(partial, self.run_dir / "weights" / "last.pt")
        return AttemptResult(0 if end.outcome == Outcome.COMPLETED else 1, 0.01), end

    def batches(self) -> list[tuple[int, int, bool]]:
        """(per-GPU batch, val batch, final validation only) of every attempt asked for."""
        return [(r.plan.per_gpu_batch, r.plan.val_batch, r.final_val_only) for r in self.requests]


def plan4():
    return build_plan(model="m.yaml", data="d.yaml", gpus=(0, 1, 2, 3), batch=64, effective_batch=128)


def run(tmp_path: Path, ends: list, max_retries: int = 3, min_batch: int = 1, resume: Path | None = None):
    said: list[str] = []
    child = StubChild(tmp_path, ends)
    loop = AttemptLoop(tmp_path, Story(), child, Limits(max_retries, min_batch), lambda: {}, said.append)
    code = loop.run(plan4(), resume=resume)
    return code, child, loop.story, said


def test_training_ooms_halve_the_per_gpu_batch_until_it_fits_with_the_same_nbs(tmp_path):
    code, child, story, said = run(tmp_path, [OOM_TRAIN, OOM_TRAIN, OOM_TRAIN, DONE])
    assert code == Exit.OK and story.outcome == Outcome.COMPLETED
    assert child.batches() == [(16, 16, False), (8, 16, False), (4, 16, False), (2, 16, False)]
    assert {r.plan.effective_batch for r in child.requests} == {128}
    assert [r.plan.accumulate for r in child.requests] == [2, 4, 8, 16]
    assert [a.outcome for a in story.attempts] == ["oom", "oom", "oom", "completed"]
    # each retry resumes from a kept copy of the checkpoint the attempt before it left
    assert child.requests[0].resume is None
    for request in child.requests[1:]:
        assert request.resume == tmp_path / "weights" / f"last-before-attempt{request.attempt}.pt"
        assert request.resume.read_bytes() == f"after attempt {request.attempt - 1}".encode()
    assert said[0] == "OOM in train at epoch 4/100 on rank 2, GPU 2 (batch 16/GPU, val batch 16/GPU)"
    assert said[1].startswith("retry 1/3: batch 64 -> 32 (16 -> 8 per GPU), accumulate 2 -> 4, effective batch 128")


def test_validation_ooms_halve_the_validation_batch_first_then_the_train_batch(tmp_path):
    code, child, story, _ = run(tmp_path, [OOM_VAL, OOM_VAL, DONE])
    assert code == Exit.OK
    assert child.batches() == [(16, 16, False), (16, 8, False), (8, 8, False)]
    assert story.attempts[1].next == "batch 64 -> 32 (16 -> 8 per GPU), accumulate 2 -> 4, effective batch 128"


def test_final_validation_oom_reruns_only_the_validation_with_half_its_batch(tmp_path):
    code, child, story, said = run(tmp_path, [OOM_FINAL, DONE])
    assert code == Exit.OK
    assert child.batches() == [(16, 16, False), (16, 8, True)]
    assert child.requests[1].resume is None and story.attempts[1].mode == "final_val"
    assert said[-1] == "retry 1/3: final validation again with val batch 8; final validation only"


def test_retries_exhausted_end_with_status_3_and_advice(tmp_path):
    code, child, story, said = run(tmp_path, [OOM_TRAIN] * 3, max_retries=2)
    assert code == Exit.OOM_EXHAUSTED == 3
    assert child.batches() == [(16, 16, False), (8, 16, False), (4, 16, False)]
    assert story.outcome == Outcome.OOM_EXHAUSTED and records.load_story(tmp_path).outcome == "oom_exhausted"
    assert "giving up after 2 retries; next steps:" in said and any(s.startswith("  - ") for s in said)


def test_the_minimum_batch_stops_the_halving_and_says_so(tmp_path):
    code, child, _, said = run(tmp_path, [OOM_TRAIN, OOM_TRAIN], min_batch=8)
    assert code == Exit.OOM_EXHAUSTED
    assert child.batches() == [(16, 16, False), (8, 16, False)]
    assert any("cannot be halved below --min-batch 8" in s for s in said)


@pytest.mark.parametrize(
    ("end", "code", "words"),
    [
        (AttemptEnd(Outcome.INTERRUPTED, message="SIGINT"), Exit.INTERRUPTED, "stopped by SIGINT; resume with"),
        (AttemptEnd(Outcome.KILLED, rank=1, gpu=1, message="rank 1 was killed by SIGKILL"), Exit.FAILED,
         "rank 1 was killed by SIGKILL on GPU 1"),
        (AttemptEnd(Outcome.FAILED, "train", 0, 0, message="RuntimeError: boom"), Exit.FAILED,
         "training failed in train at epoch 1/100 on rank 0, not an OOM, not retried: RuntimeError: boom"),
    ],
)
def test_other_outcomes_end_the_run_with_one_line(tmp_path, end, code, words):
    got, child, story, said = run(tmp_path, [end])
    assert got == code and len(child.requests) == 1 and story.outcome == end.outcome
    assert len(said) == 1 and words in said[0]


def test_ctrl_c_between_attempts_is_recorded_as_interrupted(tmp_path):
    code, child, _, said = run(tmp_path, [OOM_TRAIN, KeyboardInterrupt()])
    assert code == Exit.INTERRUPTED == 130 and len(child.requests) == 2
    assert records.load_story(tmp_path).outcome == "interrupted"
    assert said[-1] == f"stopped; resume with: yolosafe train --resume {tmp_path}"


def test_every_attempt_is_on_disk_with_its_plan_and_outcome(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "last.pt").write_bytes(b"before")
    run(tmp_path, [OOM_TRAIN, DONE], resume=tmp_path / "weights" / "last.pt")
    saved = records.load_story(tmp_path)
    first, second = saved.attempts
    assert (first.per_gpu_batch, first.nbs, first.outcome, first.epoch, first.gpu) == (16, 128, "oom", 3, 2)
    assert (second.per_gpu_batch, second.accumulate, second.outcome) == (8, 4, "completed")
    assert first.resumed_from == str(tmp_path / "weights" / "last-before-attempt1.pt")
    assert (tmp_path / "weights" / "last-before-attempt1.pt").read_bytes() == b"before"  # nothing lost
    assert saved.weights == {"last": str(tmp_path / "weights" / "last.pt")}


HUNG = AttemptEnd(Outcome.HUNG, "train", epoch=1, rank=0, gpu=0)


@pytest.mark.parametrize("ends", [
    [OOM_TRAIN, OOM_VAL, DONE], [OOM_TRAIN] * 3, [OOM_TRAIN, KeyboardInterrupt()], [HUNG, DONE], [HUNG, HUNG],
    [AttemptEnd(Outcome.KILLED, message="killed")], [AttemptEnd(Outcome.FAILED, message="boom")],
    [AttemptEnd(Outcome.INTERRUPTED, message="SIGTERM")],
])
def test_the_run_moves_only_along_the_states_transitions_and_exits_with_its_last_states_status(tmp_path, ends):
    """One state machine (``rundir.outcome``): every outcome the loop writes to ``yolosafe.json`` follows from the one
    before it, and the exit status is the last state's."""
    written: list[Outcome] = []

    class Watched(AttemptLoop):
        def save(self) -> None:
            if not written or written[-1] != self.story.outcome:
                written.append(self.story.outcome)
            super().save()

    loop = Watched(tmp_path, Story(), StubChild(tmp_path, ends), Limits(2, 1, max_hang_restarts=1), lambda: {},
                   lambda _: None)
    code = loop.run(plan4())
    assert written[0] == Outcome.RUNNING
    assert all(before.may_become(after) for before, after in itertools.pairwise(written)), written
    assert code == Outcome(written[-1]).exit_status
    assert all(a.outcome != Outcome.RUNNING for a in loop.story.attempts)
