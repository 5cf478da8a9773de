"""OOM messages, classification and the retry policy: pure, no training."""

from __future__ import annotations

import importlib.util
import mmap
from pathlib import Path

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


def test_classify_a_ranks_own_failure_beats_the_teardown_of_its_peers():
    """Under NCCL's blocking wait the peers of a failed rank wait in their collective until torchrun SIGTERMs them:
    the launcher's records of those signals (whole-second timestamps) never outrank the failed rank's own record."""
    peer = FailureRecord.new(t=7.0, rank=0, gpu=0, signal="SIGTERM", error="SIGTERM", exit_code=-15, by="launcher",
                             message="rank 0 was killed by SIGTERM")
    own = FailureRecord.new(t=7.4, rank=1, gpu=1, error="ValueError", message="boom", phase="train", epoch=0,
                            by="rank")
    failed = classify(ok(), [peer, own], "")
    assert (failed.outcome, failed.rank, failed.gpu, failed.message) == ("failed", 1, 1, "ValueError: boom")
    out = FailureRecord.new(t=7.4, rank=1, gpu=1, oom=True, message=SEED_003, phase="train", epoch=0, by="rank")
    assert (classify(ok(), [peer, out], "").outcome, classify(ok(), [peer, out], "").rank) == ("oom", 1)
    assert classify(ok(), [peer], "").message == "rank 0 was killed by SIGTERM"  # nothing else: the teardown is all
    killed = FailureRecord.new(t=6.0, rank=1, gpu=1, signal="SIGKILL", by="launcher", message="rank 1 was killed by "
                               "SIGKILL")
    gloo = FailureRecord.new(t=7.6, rank=0, error="RuntimeError", message="Connection closed by peer", by="rank")
    assert classify(ok(), [gloo, killed, peer], "").message == "rank 1 was killed by SIGKILL"  # a kill still wins
    assert classify(ok(), [gloo, own], "").rank == 1  # a peer's failed collective comes after the failed rank's own


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


SITE = Path(importlib.util.find_spec("torch").submodule_search_locations[0]).parent  # site-packages


def _shipped(source: str) -> list[Path]:
    """The installed library files a marker's source names (``a + b``: each of them)."""
    return [SITE / part.strip() for part in source.split("+") if "/" in part]


@pytest.mark.parametrize("marker", [m for m, source in oom.OOM_SOURCES.items() if _shipped(source)])
def test_every_library_marker_is_in_the_library_that_says_it(marker):
    """The markers come from the strings of the shipped binaries: each is in every file its source names (a
    printf-style text is checked by its parts: "Cuda failure %d '%s'" and CUDA's "out of memory")."""
    paths = _shipped(oom.OOM_SOURCES[marker])
    if not all(p.is_file() for p in paths):
        pytest.skip(f"{oom.OOM_SOURCES[marker]} is not installed here")
    parts = {"Cuda failure 2 'out of memory'": [b"Cuda failure %d '%s'", b"out of memory"],
             "CUDA error: out of memory": [b"CUDA error: ", b"out of memory"],
             oom.CUBLAS_INIT: [b"CUBLAS_STATUS_NOT_INITIALIZED", b" when calling `cublasCreate(handle)`"],
             }.get(marker, [marker.encode()])
    for path in paths:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            found = [part for part in parts if data.find(part) >= 0]
        assert found, f"{marker!r} not in {path}"
        if marker == oom.CUBLAS_INIT and path.name.startswith("libtorch"):  # torch's check macro says both parts
            assert found == parts, f"{marker!r} not in {path}"
    assert "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE" not in oom.OOM_MARKERS  # in no shipped library


# Every real GPU out-of-memory form (as torch 2.14 words it around CUDA's, NCCL's, cuBLAS' and cuDNN 9's strings)
# and the texts that must not count: host RAM, cuDNN's other internal errors, a plain failure.
OOM_TABLE = [
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.11 "
     "GiB of which 0 bytes is free.", True),
    ("torch.AcceleratorError: CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported", True),
    ("torch.distributed.DistBackendError: NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.cpp:77, "
     "unhandled cuda error (run with NCCL_DEBUG=INFO for details), NCCL version 2.30.7\nncclUnhandledCudaError: "
     "Call to CUDA function failed.\nLast error:\nCuda failure 2 'out of memory'", True),
    ("RuntimeError: cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED", True),
    ("RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),
    ("RuntimeError: CUDA ran out of memory outside PyTorch's allocator. If this workload uses many dynamic shapes",
     True),
    ("RuntimeError: CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`", True),
    ("RuntimeError: CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasSetStream(handle, stream)`", False),
    ("torch.OutOfMemoryError: expandable_segments: memory mapping failed with OOM on device 0", True),
    # cuDNN's bare internal error is an OOM only with an allocator's message beside it (cuDNN 9 has its own code)
    ("RuntimeError: cuDNN error: CUDNN_STATUS_INTERNAL_ERROR", False),
    ("RuntimeError: cuDNN error: CUDNN_STATUS_INTERNAL_ERROR\nCUDA out of memory. Tried to allocate 2.00 MiB", True),
    ("RuntimeError: FIND was unable to find an engine to execute this computation", True),
    ("RuntimeError: cusolver error: CUSOLVER_STATUS_ALLOC_FAILED", True),
    ("CUDA out of memory. Allocation was preemptively rejected because it would exceed per_process_memory_fraction "
     "limit. Requested size: 2.00 GiB", True),
    ("RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes. Error code 12 "
     "(Cannot allocate memory)", False),
    ("LLVM ERROR: out of memory", False),
    ("RuntimeError: cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED", False),
    ("RuntimeError: cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_COMPILATION_FAILED", False),
    ("MemoryError", False),
    ("ValueError: boom", False),
]


@pytest.mark.parametrize(("text", "is_oom"), OOM_TABLE)
def test_every_real_oom_form_is_an_oom_and_host_ram_is_not(text, is_oom):
    assert oom.is_oom_text(text) is is_oom
    not_memory = ("ValueError", "COMPILATION", "CUBLAS", "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")
    if not is_oom and not any(w in text for w in not_memory):
        assert oom.is_host_oom(text)


def test_sizes_in_bytes_parse():
    figures = oom.parse_message("CUDA out of memory. Tried to allocate 512 bytes. GPU 0 has a total capacity of "
                                "79.11 GiB of which 0 bytes is free. Process 77 has 1024 bytes memory in use.")
    assert (figures["tried_mib"], figures["free_mib"]) == (round(512 / 2**20, 2), 0.0)
    assert figures["processes"] == {77: 0.0} and figures["total_mib"] == pytest.approx(79.11 * 1024)


@pytest.mark.parametrize("error", ["accelerator", "nccl", "cudnn", "cublas-init", "cudnn-internal"])
def test_injected_errors_are_the_real_types_with_the_real_texts(error):
    import torch
    import torch.distributed

    from yolosafe.training.callbacks import injected_error

    exc = injected_error(oom.parse_injection(f"error={error}").error, 1)
    expected = {"accelerator": torch.AcceleratorError, "nccl": torch.distributed.DistBackendError,
                "cudnn": RuntimeError, "cublas-init": RuntimeError, "cudnn-internal": RuntimeError}[error]
    assert type(exc) is expected and not isinstance(exc, torch.OutOfMemoryError)
    assert oom.is_oom_text(str(exc)) is (error != "cudnn-internal") and str(exc).endswith(oom.INJECTED)


def test_an_injection_of_several_forms_raises_them_in_turn():
    injection = oom.parse_injection("phase=train,times=3,error=accelerator+nccl+cudnn")
    assert [injection.error_at(n) for n in range(4)] == ["accelerator", "nccl", "cudnn", "accelerator"]
    with pytest.raises(oom.InjectionError, match="error oom/accelerator"):
        oom.parse_injection("error=accelerator+cuda")
