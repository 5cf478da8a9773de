"""The training side without training: the run context loaded from a run spec and torchrun's variables, the
injection parsed once, the callbacks and the fake phase files driven by stand-in trainers, the failure record, the
trainer composed per task, and the launcher's records in the run directory of the spec on its command line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.contexts import run_context, spec_file
from yolosafe import oom
from yolosafe.rundir import files as rundir
from yolosafe.rundir.records import Failure as FailureRecord
from yolosafe.rundir.records import load_failures, save_failure
from yolosafe.supervisor import launchcmd as launch
from yolosafe.training import callbacks, launcher, worker
from yolosafe.training.callbacks import TrainingCallbacks
from yolosafe.training.context import Rank, RunContext
from yolosafe.training.failure import write_failure
from yolosafe.training.fake import phases as fakephase
from yolosafe.training.fake.phases import FakePhaseFile
from yolosafe.training.heartbeat import HeartbeatCallbacks

RANK_1_OF_2 = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
CPU = torch.device("cpu")


class StandInModel:
    """What ``add_callbacks`` uses of an Ultralytics ``Model``: its callbacks and ``add_callback``."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list] = {}

    def add_callback(self, event: str, hook) -> None:
        self.callbacks.setdefault(event, []).append(hook)

    def fire(self, event: str, obj) -> None:
        for hook in self.callbacks.get(event, []):
            hook(obj)


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / rundir.EVENTS).read_text().splitlines()]


def test_context_of_a_single_process_and_of_a_rank(tmp_path):
    path = spec_file(tmp_path, attempt=3, val_batch=2)
    single = RunContext.load(path, environ={})
    assert (single.rank, single.injection, single.run_dir, single.attempt) == (Rank(), None, tmp_path, 3)
    assert single.spec.val_batch == 2 and not single.rank.distributed and single.rank.leads
    rank = RunContext.load(path, environ={**RANK_1_OF_2, oom.INJECT_ENV: "phase=val,rank=1"})
    assert rank.rank == Rank(1, 1, 2) and rank.rank.distributed and not rank.rank.leads
    assert rank.injection == oom.Injection(phase="val", rank=1)
    assert rank.gpu_index(CPU) == 1 and single.gpu_index(CPU) is None  # a CPU rank stands for its local GPU
    assert single.gpu_index(torch.device("cuda", 2)) == 2


def test_injection_is_parsed_once_and_fires_times_across_attempts(tmp_path, monkeypatch):
    context = run_context(tmp_path, {oom.INJECT_ENV: "phase=val,epoch=2,iteration=1"})
    monkeypatch.setattr(oom, "parse_injection", lambda text: pytest.fail("the injection was parsed again"))
    context.progress.epoch, context.progress.iteration = 2, 0
    callbacks.maybe_inject(context, "val")  # not this batch
    context.progress.iteration = 1
    with pytest.raises(torch.OutOfMemoryError, match=r"GPU 0 .* \[injected by yolosafe\]"):
        callbacks.maybe_inject(context, "val")
    callbacks.maybe_inject(context, "val")  # times=1: fired once, counted in the run directory
    assert (tmp_path / rundir.INJECTED).read_text() == "1"


def test_fake_phase_callbacks_only_with_fake_gpus_around_yolosafes(tmp_path):
    real, fake = StandInModel(), StandInModel()
    worker.install_callbacks(real, run_context(tmp_path / "real"))
    worker.install_callbacks(fake, run_context(tmp_path / "fake", fake_gpus=True))
    owners = {event: [type(hook.__self__) for hook in hooks] for event, hooks in fake.callbacks.items()}
    assert not any(isinstance(h.__self__, FakePhaseFile) for hooks in real.callbacks.values() for h in hooks)
    beats = HeartbeatCallbacks  # last: it reads the progress the others keep
    assert owners["on_train_epoch_start"] == owners["on_val_start"] == [TrainingCallbacks, FakePhaseFile, beats]
    assert owners["on_train_epoch_end"] == [FakePhaseFile, TrainingCallbacks, beats]
    assert owners["on_val_end"] == [FakePhaseFile, TrainingCallbacks]
    context = run_context(tmp_path / "x")
    assert set(real.callbacks) == set(TrainingCallbacks(context).hooks()) | set(HeartbeatCallbacks(context).hooks())


def test_a_ranks_epoch_in_events_progress_and_its_gpus_phase_file(tmp_path):
    """Rank 1 of a plan on GPUs 2,3, its callbacks run as Ultralytics runs them (in the order added): its events say
    rank 1 and CUDA device 1, its phase file is GPU 3's."""
    plan = {"gpus": [2, 3], "per_gpu_batch": 4, "val_batch": 2}
    context = run_context(tmp_path, RANK_1_OF_2, plan=plan, fake_gpus=True, attempt=2)
    model = StandInModel()
    worker.install_callbacks(model, context)
    phase_file = tmp_path / ".fake-phase-gpu3.json"
    trainer = SimpleNamespace(epoch=5, batch_size=8, world_size=2, device=CPU)
    model.fire("on_train_epoch_start", trainer)
    assert trainer._oom_retries == 3 and (context.progress.phase, context.progress.epoch) == ("train", 5)
    assert json.loads(phase_file.read_text()) == {"phase": "train", "pid": os.getpid(), "epoch": 5, "batch": 4}
    model.fire("on_train_batch_start", trainer)
    model.fire("on_train_epoch_end", trainer)
    assert json.loads(phase_file.read_text())["phase"] is None
    validator = SimpleNamespace(device=CPU, dataloader=SimpleNamespace(batch_size=2))
    model.fire("on_val_start", validator)
    assert json.loads(phase_file.read_text()) == {"phase": "val", "pid": os.getpid(), "epoch": 5, "batch": 2}
    model.fire("on_fit_epoch_end", trainer)  # rank 1 closes its validation here: no on_val_end off rank 0
    assert [e["event"] for e in events(tmp_path)] == ["train_start", "train_end", "val_start", "val_end"]
    assert {(e["rank"], e["gpu"], e["attempt"], e["epoch"]) for e in events(tmp_path)} == {(1, 1, 2, 5)}
    assert events(tmp_path)[0]["batch"] == 4 and events(tmp_path)[2]["batch"] == 2
    assert json.loads(phase_file.read_text())["phase"] is None and context.progress.phase is None
    assert not (tmp_path / rundir.FAKE_PHASE).exists()  # a rank writes only its own GPU's file


def test_failure_record_says_where_the_process_was(tmp_path):
    context = run_context(tmp_path, RANK_1_OF_2, val_batch=3)
    context.progress.phase, context.progress.epoch, context.progress.iteration = "val", 7, 12
    write_failure(context, torch.OutOfMemoryError(oom.fake_message(1)), 4, CPU)
    record = json.loads((tmp_path / "failure-1-rank1.json").read_text())
    assert (record["oom"], record["phase"], record["epoch"], record["iteration"]) == (True, "val", 7, 12)
    assert (record["rank"], record["gpu"], record["batch"], record["val_batch"], record["attempt"]) == (1, 1, 4, 3, 1)
    context.progress.final = True
    write_failure(context, KeyboardInterrupt(), 4, CPU)  # stopped by yolosafe: no record
    write_failure(context, RuntimeError("boom"), None, CPU)
    assert json.loads((tmp_path / "failure-1-rank1.json").read_text())["phase"] == "final"


def test_trainer_is_composed_per_task_and_cpu_rank(tmp_path):
    from yolosafe.training import trainer
    from yolosafe.training.fake import cpuranks

    single = trainer.trainer_class("segment", run_context(tmp_path / "a"))
    assert single.__bases__ == (*trainer.MIXINS, trainer.TRAINERS["segment"])
    assert single.run_context.spec.run_dir == str(tmp_path / "a")
    rank = trainer.trainer_class("detect", run_context(tmp_path / "b", RANK_1_OF_2, fake_gpus=True))
    assert rank.__mro__[1] is cpuranks.CpuRankMixin and rank.run_context.rank.index == 1
    real_rank = trainer.trainer_class("detect", run_context(tmp_path / "c", RANK_1_OF_2))
    assert cpuranks.CpuRankMixin not in real_rank.__mro__


def test_launcher_records_a_killed_rank_in_the_run_dir_of_the_spec_on_its_command_line(tmp_path):
    from torch.distributed.run import parse_args

    path = spec_file(tmp_path / "run", attempt=2)
    args = parse_args(launch.torchrun_args(launch.Launch(2, 29500, tmp_path), launch.WORKER, [str(path)]))
    spec = launcher.worker_spec(args)
    assert spec is not None and spec.attempt == 2
    killed = SimpleNamespace(exitcode=-9, signal_name=lambda: "SIGKILL", timestamp=1.0, local_rank=1, pid=4242,
                             error_file="", error_file_data={})
    launcher.record_failures({1: killed}, spec)
    record = json.loads((tmp_path / "run" / "failure-2-rank1.json").read_text())
    assert (record["message"], record["attempt"], record["gpu"], record["by"]) == ("rank 1 was killed by SIGKILL", 2,
                                                                                  1, "launcher")
    rank_record = FailureRecord.new(attempt=2, rank=0, oom=True, phase="val", by="rank")
    save_failure(tmp_path / "run", rank_record)
    both = load_failures(tmp_path / "run", 2)  # one type for both writers, read by the policy and the readers
    assert [(f.rank, f.by, f.signal) for f in both] == [(0, "rank", None), (1, "launcher", "SIGKILL")]
    other = parse_args(launch.torchrun_args(launch.Launch(2, 29500, tmp_path), "other.module", [str(path)]))
    assert launcher.worker_spec(other) is None


def test_no_module_keeps_state_or_reads_the_run_variables():
    """The training side's modules keep no per-process state of their own (it lives in each process's context) and
    never read the supervisor's run marker: their run directory comes from the run spec."""
    from yolosafe.training import context, peakmetrics, torchmem, trainer
    from yolosafe.training import failure as failurerecord
    from yolosafe.training.fake import cpuranks

    for module in (callbacks, context, cpuranks, failurerecord, fakephase, launch, peakmetrics, torchmem, trainer,
                   worker):
        assert not hasattr(module, "STATE")
        source = Path(module.__file__).read_text()
        assert "RUN_DIR_ENV" not in source and "SPEC_ENV" not in source and "functools" not in source
