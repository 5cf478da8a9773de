"""What yolosafe does per epoch costs only what it buys: the checkpoint a retry resumes from is fsynced (and nothing
else is) beside the training, not in its way; no garbage collection before validation where there is no CUDA cache
to give back, and the benchmark's switches are off unless a benchmark sets them. Real ``BaseTrainer.save_model``
on a tiny model, in milliseconds.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

from tests.test_atomic_save import epoch_of, trainer
from yolosafe import bench
from yolosafe.training import torchmem
from yolosafe.training.durable import durable_replace


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
    t.checkpoints_durable()
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
    t.save_model()  # the sync runs beside the training: its error comes at the next save or the end
    with pytest.raises(OSError, match="No space"):
        t.checkpoints_durable()
    assert (weights / "last.pt").read_bytes() == b"the last good one"
    assert not list(weights.glob(".*.partial"))


def test_a_save_returns_before_its_sync_and_the_old_checkpoint_stays_until_the_new_one_is_durable(tmp_path,
                                                                                                  monkeypatch):
    """The fsync waits on the disk on a thread of its own: until it ends, last.pt is the previous good one (a rank
    killed meanwhile resumes from it); what the new one supersedes goes only after its rename; the next save waits."""
    import threading

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "last.pt").write_bytes(b"the last good one")
    (weights / "step.pt").write_bytes(b"the step checkpoint it supersedes")
    release, syncing = threading.Event(), threading.Event()
    real = os.fsync

    def slow(fd: int) -> None:
        syncing.set()
        assert release.wait(30)
        real(fd)

    monkeypatch.setattr(os, "fsync", slow)
    t = trainer(weights, fitness=0.1, best_fitness=0.5)
    assert t.save_model()  # returns while the sync waits; the trainer's own step.pt removal waits for the rename
    assert syncing.wait(30)
    assert (weights / "last.pt").read_bytes() == b"the last good one" and (weights / "step.pt").exists()
    assert (weights / ".last.pt.partial").is_file()
    waited = threading.Thread(target=t.save_model)  # the next save waits for this one's rename
    waited.start()
    waited.join(0.2)
    assert waited.is_alive()
    release.set()
    waited.join(30)
    t.checkpoints_durable()
    assert epoch_of(weights / "last.pt") == 1 and not (weights / "step.pt").exists()
    assert not list(weights.glob(".*.partial"))
    t.when_durable(lambda: (weights / "done").touch())  # nothing pending: at once
    assert (weights / "done").exists()
