"""OOM messages, classification and the retry policy: pure, no training."""

from __future__ import annotations

import pytest

from yolosafe import oom
from yolosafe.planning.trainplan import build_plan
from yolosafe.rundir.records import Failure as FailureRecord
from yolosafe.supervisor.advice import advice
from yolosafe.supervisor.policy import AttemptEnd as Failure
from yolosafe.supervisor.policy import AttemptResult, classify, next_step

# Verbatim OOM messages of two real runs: 4 x 48 GB dying in validation at epoch 134, and a first validation.
SEED_003 = """CUDA out of memory. Tried to allocate 300.00 MiB
GPU 3 has a total capacity of 47.50 GiB of which 194.56 MiB is free"""
SEED_004 = """torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 15.82 GiB.
GPU 0 has a total capacity of 47.40 GiB of which 6.17 GiB is free.
Including non-PyTorch memory, this process has 41.20 GiB memory in use.
Of the allocated memory 36.79 GiB is allocated by PyTorch,
and 3.95 GiB is reserved by PyTorch but unallocated."""
# torch >= 2.1 when other processes share the GPU; and the pre-2.1 format.
NEWER = ("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.11 GiB of which 6.44 MiB "
         "is free. Process 3066 has 79.10 GiB memory in use. Of the allocated memory 78.05 GiB is allocated by "
         "PyTorch, and 499.74 MiB is reserved by PyTorch but unallocated.")
OLDER = ("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.90 GiB total capacity; 12.42 GiB already "
         "allocated; 1.38 GiB free; 13.48 GiB reserved in total by PyTorch)")


def test_parse_seed_messages():
    assert oom.parse_message(SEED_003) == {"gpu": 3, "tried_mib": 300.0, "total_mib": 48640.0, "free_mib": 194.56}
    figures = oom.parse_message(SEED_004)
    assert figures["gpu"] == 0 and figures["tried_mib"] == pytest.approx(15.82 * 1024)
    assert figures["free_mib"] == pytest.approx(6.17 * 1024) and figures["process_mib"] == pytest.approx(41.2 * 1024)
    assert figures["allocated_mib"] == pytest.approx(36.79 * 1024)
    assert figures["reserved_unallocated_mib"] == pytest.approx(3.95 * 1024)


def test_parse_other_formats():
    newer = oom.parse_message(NEWER)
    assert newer["processes"] == {3066: pytest.approx(79.10 * 1024)} and newer["free_mib"] == 6.44
    older = oom.parse_message(OLDER)
    assert (older["gpu"], older["tried_mib"], older["free_mib"]) == (0, 2048.0, pytest.approx(1.38 * 1024))
    assert older["reserved_mib"] == pytest.approx(13.48 * 1024)


def test_injected_message_is_parsed_like_a_real_one():
    figures = oom.parse_message(oom.fake_message(2))
    assert figures["gpu"] == 2 and figures["tried_mib"] == 300.0 and figures["free_mib"] == 194.56


@pytest.mark.parametrize(
    "text",
    ["RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
     "RuntimeError: cuDNN error: CUDNN_STATUS_ALLOC_FAILED", SEED_003, "torch.OutOfMemoryError: CUDA out of memory."],
)
def test_oom_markers(text):
    assert oom.is_oom_text(text)


def test_injection_spec():
    spec = oom.parse_injection("phase=val,epoch=1,rank=2,times=0")
    assert spec == oom.Injection(phase="val", epoch=1, rank=2, times=0)
    assert spec.matches("val", 1, 0, 2) and not spec.matches("train", 1, 0, 2)
    assert oom.parse_injection("") is None
    for bad in ("phase=test", "when=now", "epoch", "error=segfault"):
        with pytest.raises(ValueError):
            oom.parse_injection(bad)


def ok(code=1):
    return AttemptResult(exit_code=code, duration_s=1.0)


def test_classify_oom_on_one_rank_beats_nccl_errors_on_others():
    records = [
        FailureRecord.new(t=2.0, oom=False, rank=0, message="NCCL watchdog timeout", phase="val"),
        FailureRecord.new(t=1.0, oom=True, rank=3, gpu=3, phase="val", epoch=134, message="CUDA out of memory."),
    ]
    failure = classify(ok(), records, "")
    assert (failure.outcome, failure.phase, failure.epoch, failure.rank, failure.gpu) == ("oom", "val", 134, 3, 3)


def test_classify_other_outcomes():
    assert classify(ok(0), [], "").outcome == "completed"
    assert classify(ok(1), [], "...\n" + SEED_003).outcome == "oom"  # no record written: the log still tells
    assert classify(ok(-9), [], "").outcome == "killed"
    failed = classify(ok(1), [FailureRecord.new(oom=False, message="boom", phase="train", epoch=2)], "")
    assert (failed.outcome, failed.message, failed.epoch) == ("failed", "boom", 2)
    assert classify(AttemptResult(1, 1.0, interrupted=15), [], "").outcome == "interrupted"


def plan4():
    return build_plan(model="m.yaml", data="d.yaml", gpus=(0, 1, 2, 3), batch=64, effective_batch=128)


def test_policy_train_oom_halves_batch_keeps_nbs():
    step = next_step(plan4(), Failure("oom", "train"), val_ooms=0, min_batch=1)
    new = step.plan
    assert (new.batch, new.per_gpu_batch, new.effective_batch, new.accumulate) == (32, 8, 128, 4)
    assert step.plan.val_batch == 16 and not step.final_val_only


def test_policy_val_oom_first_val_batch_then_train_batch():
    first = next_step(plan4(), Failure("oom", "val"), val_ooms=1, min_batch=1)
    assert (first.plan.batch, first.plan.val_batch) == (64, 8)
    second = next_step(first.plan, Failure("oom", "val"), val_ooms=2, min_batch=1)
    assert (second.plan.batch, second.plan.val_batch) == (32, 8)


def test_policy_final_val_only_and_limits():
    step = next_step(plan4(), Failure("oom", "final"), val_ooms=0, min_batch=1)
    assert step.final_val_only and step.plan.val_batch == 8 and step.plan.batch == 64
    assert next_step(plan4(), Failure("oom", "train"), 0, min_batch=16) is None


def test_advice_names_busy_gpu_and_fragmentation():
    failure = Failure("oom", "val", records=[FailureRecord.new(figures=oom.parse_message(SEED_004))])
    tips = advice(failure, plan4(), others_mib={2: 13000.0})
    assert any("--gpus 0,1,3" in t for t in tips)
    assert any("fragmentation" in t for t in tips)
    assert any("--val-batch" in t for t in tips)
