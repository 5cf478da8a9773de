"""What yolosafe does per epoch costs only what it buys: the checkpoint a retry resumes from is fsynced (and nothing
else is), no garbage collection before validation where there is no CUDA cache to give back, and the benchmark's
switches are off unless a benchmark sets them. Real ``BaseTrainer.save_model`` on a tiny model, in milliseconds.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

from tests.test_atomic_save import epoch_of, trainer
from yolosafe import bench
from yolosafe.training import torchmem
from yolosafe.training.trainer import durable_replace


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    """The paths os.fsync is called on, in order (the real fsync still runs)."""
    seen: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return seen


@pytest.mark.parametrize("improved", [False, True])
def test_a_save_fsyncs_last_pt_before_its_rename_and_the_folder_after_and_nothing_else(tmp_path, fsynced, improved):
    weights = tmp_path / "weights"
    weights.mkdir()
    t = trainer(weights, fitness=0.9 if improved else 0.1, best_fitness=0.9 if improved else 0.5)
    assert t.save_model()
    assert fsynced == [str(weights / ".last.pt.partial"), str(weights)]  # best.pt, when written, is not fsynced
    assert epoch_of(weights / "last.pt") == 1
    assert (weights / "best.pt").is_file() is improved
    assert not list(weights.glob(".*.partial"))


def test_durable_replace_without_sync_is_a_plain_rename(tmp_path, fsynced):
    partial, final = tmp_path / ".x.partial", tmp_path / "x"
    partial.write_bytes(b"new")
    final.write_bytes(b"old")
    durable_replace(partial, final, sync=False)
    assert final.read_bytes() == b"new" and not partial.exists() and fsynced == []


def test_no_collection_before_validation_off_cuda():
    collections: list[str] = []

    def seen(phase: str, _info: dict) -> None:
        collections.append(phase)

    gc.callbacks.append(seen)
    try:
        assert torchmem.clear_cache(torch.device("cpu")) is None
        assert torchmem.clear_cache(None) is None
    finally:
        gc.callbacks.remove(seen)
    assert collections == []


def test_benchmark_switches_are_off_unless_set(monkeypatch, tmp_path):
    monkeypatch.delenv(bench.BENCH_OFF_ENV, raising=False)
    assert not any(bench.bench_off(part) for part in ("tee", "filter", "tree", "events", "checkpoint", "peaks"))
    monkeypatch.setenv(bench.BENCH_OFF_ENV, "events,checkpoint")
    assert bench.bench_off("events") and bench.bench_off("checkpoint") and not bench.bench_off("tee")
    monkeypatch.delenv(bench.BENCH_PROFILE_ENV, raising=False)
    assert bench.bench_profiled("worker", lambda a, b: a + b, 1, 2) == 3
    monkeypatch.setenv(bench.BENCH_PROFILE_ENV, str(tmp_path))
    assert bench.bench_profiled("worker", lambda a, b: a + b, 1, 2) == 3
    assert [p.name for p in tmp_path.iterdir()] == [f"worker-{os.getpid()}.prof"]


CLI_IMPORTS = """
import sys
from yolosafe.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(sorted(m for m in ("torch", "ultralytics", "torchvision") if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["gpus", "--json"], ["report", "{tmp}"],
                                  ["doctor", "{tmp}"]])
def test_commands_that_train_nothing_never_import_torch(tmp_path, argv):
    import subprocess
    import sys

    args = [a.format(tmp=tmp_path) for a in argv]
    done = subprocess.run([sys.executable, "-c", CLI_IMPORTS, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "YOLOSAFE_FAKE_GPUS": "1x24GB"})
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-1000:] + done.stderr[-1000:]


def test_an_fsync_that_fails_leaves_the_last_good_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    import errno

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "last.pt").write_bytes(b"the last good one")

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    t = trainer(weights, fitness=0.9, best_fitness=0.9)
    with pytest.raises(OSError, match="No space"):
        t.save_model()
    assert (weights / "last.pt").read_bytes() == b"the last good one"
    assert not list(weights.glob(".*.partial"))
