"""A validation OOM recovered in place: the rank that runs out of memory inside its validation loop halves its own
forward batch and validates its own shard again, inside the running training, with the uninterrupted run's result;
and no epoch is trained twice when a relaunch is still needed. Drills with real CPU ranks (fake GPUs over gloo) and
the real torch.OutOfMemoryError raised inside the real Ultralytics validation loop."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import TINY, run_dir_of, story
from tests.contexts import run_context
from tests.test_terminal import dead_bars
from yolosafe import oom
from yolosafe.proc import AttemptResult
from yolosafe.rundir.layout import RunDir
from yolosafe.rundir.records import Failure, Outcome
from yolosafe.supervisor import loop, policy
from yolosafe.training import compat, valretry
from yolosafe.training.context import Rank

TWO = {"YOLOSAFE_FAKE_GPUS": "2x24GB"}


def events(run: Path, kind: str | None = None) -> list[dict]:
    found = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    return [e for e in found if kind is None or e["event"] == kind]


def trained_once(run: Path, epochs: int, ranks: tuple[int, ...]) -> None:
    """Every epoch trained exactly once on every rank, from the ranks' own events (all attempts together)."""
    counts = Counter((e["rank"], e["epoch"]) for e in events(run, "train_start"))
    assert counts == {(rank, epoch): 1 for rank in ranks for epoch in range(epochs)}, counts


def finished(run: Path, epochs: int, attempts: int = 1) -> dict:
    rows = [r.split(",") for r in (run / "results.csv").read_text().strip().splitlines()[1:]]
    assert [int(float(r[0])) for r in rows] == list(range(1, epochs + 1))  # one row per epoch, none twice
    s = story(run)
    assert s["outcome"] == "completed" and len(s["attempts"]) == attempts, s["attempts"]
    assert (run / "weights" / "best.pt").is_file() and "metrics/mAP50-95(B)" in s["final_metrics"]
    return s


def recovered_records(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run.glob("failure-*-rank*-recovered*.json"))]


# -- without training -------------------------------------------------------------------------------------------------

def test_the_line_names_the_epoch_the_rank_and_its_gpu(tmp_path):
    context = run_context(tmp_path, plan={"gpus": [2, 3]})
    ranked = type(context)(context.spec, Rank(1, 1, 2))
    lost = valretry.Lost(batch=16, epoch=2, final=False)
    assert valretry.recovered_line(ranked, lost, 8, 100) == (
        "OOM in validation at epoch 3/100 on rank 1, GPU 3: val batch 16 -> 8 on that rank, validated again in place")
    final = valretry.Lost(batch=2, epoch=99, final=True)
    assert valretry.recovered_line(context, final, 1, 100) == (
        "OOM in the final validation on GPU 2: val batch 2 -> 1, validated again in place")


def test_a_recovered_record_does_not_end_the_attempt():
    recovered = Failure.new(oom=True, recovered="in_place", phase="val", rank=1, t=1.0)
    assert policy.classify(AttemptResult(0, 1.0), [recovered], "").outcome == Outcome.COMPLETED
    failed = Failure.new(oom=False, error="ValueError", message="bad", phase="train", rank=0, t=2.0)
    end = policy.classify(AttemptResult(1, 1.0), [recovered, failed], "")
    assert (end.outcome, end.phase) == (Outcome.FAILED, "train")  # the recovered OOM is no cause


def test_the_relaunch_resumes_from_the_unvalidated_epoch(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "last.pt").write_bytes(b"epoch 0")
    assert loop.resume_checkpoint(tmp_path) == weights / "last.pt"
    (weights / valretry.UNVALIDATED).write_bytes(b"epoch 1, trained, not validated")
    assert loop.resume_checkpoint(tmp_path) == weights / "unvalidated.pt"
    assert loop.UNVALIDATED == valretry.UNVALIDATED


def test_only_a_checkpoint_marked_for_its_own_epoch_is_pending():
    mark = {"epoch": 3, "train": {}, "lr": {}, "loss_items": {}, "loss": 0.0}
    assert valretry.pending({"epoch": 3, "train_metrics": {valretry.MARK: mark}}) == mark
    assert valretry.pending({"epoch": 4, "train_metrics": {valretry.MARK: mark}}) is None
    assert valretry.pending({"epoch": 3, "train_metrics": {"fitness": 0.1}}) is None
    assert valretry.pending(None) is None


def test_a_validation_loop_with_a_collective_fails_naming_the_assumption(monkeypatch):
    from ultralytics.engine.validator import BaseValidator

    def __call__(self, trainer=None, model=None):  # a loop that meets the other ranks on every batch
        self.loss = {k: torch.zeros_like(v) for k, v in trainer.loss_items.items()}  # noqa: F821
        self.init_metrics(model)
        for batch_i, batch in enumerate(bar):  # noqa: B007, F821
            dist.all_reduce(batch)  # noqa: F821
            self.run_callbacks("on_val_batch_end")
        self.gather_stats()

    monkeypatch.setattr(BaseValidator, "__call__", __call__)
    assumption = next(a for a in compat.ASSUMPTIONS if a.name == "val_loop_without_collective")
    with pytest.raises(compat.CompatError, match=r"'val_loop_without_collective' broken .*a collective inside"):
        assumption.verify()


def test_a_wrong_val_oom_is_one_line_before_anything_starts(run_cli, tmp_path):
    (tmp_path / "c.yaml").write_text("val_oom: sometimes\n")
    for args in (["--val-oom", "sometimes"], ["--config", "c.yaml"]):
        result = run_cli("train", *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "sometimes" in result.stderr and "in-place" in result.stderr and not (tmp_path / "runs").exists()


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 400), st.integers(1, 8), st.integers(1, 64), st.data())
def test_every_image_is_validated_once_whatever_ranks_halve(images, ranks, batch, data):
    """Ultralytics' own shards (the installed ContiguousDistributedSampler, cut as build_dataloader cuts them from
    the dataset's batch), each rank cut into forward passes at its own number of halvings: every image once."""
    from ultralytics.data.build import ContiguousDistributedSampler

    class Dataset:  # what the sampler reads of a YOLODataset: its length and the batch it was built for
        batch_size = batch

        def __len__(self) -> int:
            return images

    halvings = data.draw(st.lists(st.integers(0, 7), min_size=ranks, max_size=ranks))
    loader_batch = min(batch, images)  # build_dataloader's
    seen = []
    for rank, halved in enumerate(halvings):
        shard = list(ContiguousDistributedSampler(Dataset(), num_replicas=ranks, rank=rank))
        forward = max(loader_batch >> halved, 1) if halved else None
        passes = valretry.shard_batches(shard, loader_batch, forward)
        assert all(0 < len(p) <= (forward or loader_batch) for p in passes)
        validated = [i for p in passes for i in p]
        assert validated == shard  # the rank's own shard, in its order, whatever it halved to
        seen += validated
    assert sorted(seen) == list(range(images))


@pytest.mark.parametrize("model", ["yolov8n.yaml", "yolov8n-seg.yaml", "yolov8n-cls.yaml", "yolo26n.yaml",
                                   "yolov8n-pose.yaml", "yolov8n-obb.yaml"])
def test_a_split_forward_pass_gives_the_whole_batchs_output(model):
    """The real network of every task, 5 images: in pieces of 2 (the layers before the head), the head once on the
    joined features: the whole batch's output, every tensor of it; and the class's forward again after."""
    import torch
    from ultralytics import YOLO

    network = YOLO(model).model.eval()
    x = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def flat(out):
        if isinstance(out, torch.Tensor):
            return [out]
        values = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else []
        return [t for v in values for t in flat(v)]

    with torch.inference_mode():
        whole = flat(network(x))
        restore = valretry.split_forward(network, 2)
        split = flat(network(x))
        restore()
    assert "forward" not in vars(network)
    assert [t.shape for t in split] == [t.shape for t in whole] and len(whole) > 1
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(split, whole, strict=True))


def test_the_network_is_found_inside_autobackend_and_pieces_join_only_batch_first():
    import torch
    from ultralytics import YOLO
    from ultralytics.nn.autobackend import AutoBackend

    network = YOLO("yolov8n.yaml").model
    assert valretry.network_of(AutoBackend(model=network, device=torch.device("cpu"), verbose=False)) is network
    assert valretry.network_of(network) is network and valretry.network_of(torch.nn.Linear(1, 1)) is None
    shared = torch.zeros(3)
    joined = valretry.join_pieces([[torch.ones(2, 1), shared, None], [torch.ones(1, 1), shared, None]], [2, 1])
    assert joined[0].shape == (3, 1) and joined[1] is shared and joined[2] is None
    with pytest.raises(valretry._CannotJoin):
        valretry.join_pieces([torch.ones(4, 2), torch.ones(4, 1)], [2, 1])


USER_VAL_ARGS = {"classes": [0, 2], "max_det": 50, "iou": 0.6, "conf": 0.01, "single_cls": True, "split": "test",
                 "save_json": True, "agnostic_nms": True}


def test_a_relaunched_final_validation_is_the_trainers_own(tmp_path, monkeypatch):
    """The validation of best.pt relaunched alone: Ultralytics' model.val with the user's validation arguments, the
    trainer's precision (FP16 on a GPU with AMP) and yolosafe's halved validation batch, on the first GPU."""
    import torch
    from ultralytics import YOLO
    from ultralytics.engine.model import Model

    from yolosafe.rundir import runspec
    from yolosafe.training import worker

    kwargs = {"data": "d.yaml", "imgsz": 64, "device": "0,1", "project": str(tmp_path.parent), "name": tmp_path.name,
              "epochs": 3, "batch": 16, "nbs": 64, "rect": False, "model": "yolov8n.yaml", **USER_VAL_ARGS}
    context = run_context(tmp_path, mode=runspec.FINAL_VAL, val_batch=2, train_kwargs=kwargs)
    context.run.best_checkpoint.parent.mkdir(parents=True, exist_ok=True)
    YOLO("yolov8n.yaml").save(context.run.best_checkpoint)
    calls = []
    monkeypatch.setattr(Model, "val", lambda self, **kw: calls.append(kw) or {"metrics/mAP50(B)": 0.5})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    worker.final_validation(context)
    [call] = calls
    assert {k: call[k] for k in USER_VAL_ARGS} == USER_VAL_ARGS and (call["data"], call["imgsz"]) == ("d.yaml", 64)
    assert (call["quantize"], call["batch"], call["device"], call["plots"], call["compile"]) == (16, 2, "0", False,
                                                                                                 False)
    assert "rect" not in call and "model" not in call  # the validation loader is rectangular, as in training
    assert json.loads(context.run.final_metrics.read_text()) == {"metrics/mAP50(B)": 0.5}
    for amp, cuda in ((False, True), ("fp32", True), (True, False)):
        plain = run_context(tmp_path / f"{amp}{cuda}", train_kwargs={**kwargs, "amp": amp})
        assert worker.final_validation_args(plain, cuda)["quantize"] is None  # FP32, as the trainer validated
    assert worker.final_validation_args(run_context(tmp_path / "bf16", train_kwargs={**kwargs, "amp": "bf16"}),
                                        True)["quantize"] == 16


# an interval the user chose keeps the trained state before every validation (auto: where it is worth its save)
KEEP_EVERY_EPOCH = ["--save-every", "1h"]


# -- drills: real trainings -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_rank_1_validation_oom_is_recovered_in_place_in_one_attempt(run_cli, tmp_path):
    result = run_cli("train", "--gpus", "0,1", "--epochs", "2", *TINY,
                     env={**TWO, "YOLOSAFE_INJECT_OOM": "phase=val,epoch=1,rank=1"})
    assert result.returncode == 0, result.stderr[-3000:]
    run = run_dir_of(tmp_path)
    finished(run, 2)
    trained_once(run, 2, (0, 1))
    assert ("OOM in validation at epoch 2/2 on rank 1, GPU 1: val batch 4 -> 2 on that rank, validated again in "
            "place") in result.stdout  # the ranks' output reaches the terminal through the supervisor
    [record] = recovered_records(run)
    assert (record["rank"], record["phase"], record["epoch"], record["recovered"]) == (1, "val", 1, "in_place")
    assert (record["val_batch"], record["next_val_batch"], record["error"]) == (4, 2, "OutOfMemoryError")
    [recovery] = events(run, "val_oom_recovered")
    assert (recovery["rank"], recovery["batch"], recovery["next_batch"]) == (1, 4, 2)
    batches = [(e["rank"], e["phase"], e["epoch"], e["batch"]) for e in events(run, "val_start")]
    assert (1, "val", 1, 2) in batches and (1, "final", 1, 2) in batches  # later validations keep the batch that worked
    assert (0, "final", 1, 4) in batches  # the other rank untouched
    assert not (run / "weights" / valretry.UNVALIDATED).exists()  # every epoch validated and kept in last.pt
    # --save-every auto: the trained state before validation is kept while no save is timed (epoch 1), then only
    # where it costs at most 0.5 % of the training it keeps: not this epoch of a second
    assert [(e["rank"], e["epoch"]) for e in events(run, "unvalidated_saved")] == [(0, 0)]
    report = run_cli("doctor", str(run))
    assert "recovered in place at val batch 2" in report.stdout and "--val-batch 2" in report.stdout


@pytest.mark.slow
def test_rank_0_final_validation_oom_is_recovered_in_place(run_cli, tmp_path):
    result = run_cli("train", "--gpus", "0,1", "--epochs", "1", *TINY,
                     env={**TWO, "YOLOSAFE_INJECT_OOM": "phase=final,epoch=0,rank=0"})
    assert result.returncode == 0, result.stderr[-3000:]
    run = run_dir_of(tmp_path)
    finished(run, 1)
    trained_once(run, 1, (0, 1))
    assert "OOM in the final validation on rank 0, GPU 0: val batch 4 -> 2 on that rank" in result.stdout
    [record] = recovered_records(run)
    assert (record["rank"], record["phase"], record["next_val_batch"]) == (0, "final", 2)


@pytest.mark.slow
def test_repeated_validation_ooms_down_to_batch_1_relaunch_without_training_again(run_cli, tmp_path):
    """Rank 0's validation of the last epoch fails at 4, 2 and 1: the relaunch validates that epoch first (its
    results.csv row, last.pt, best.pt) and runs only the final validation: no epoch trained twice."""
    result = run_cli("train", "--gpus", "0,1", "--epochs", "2", *TINY, *KEEP_EVERY_EPOCH,
                     env={**TWO, "YOLOSAFE_INJECT_OOM": "phase=val,epoch=1,rank=0,times=3"})
    assert result.returncode == 0, result.stderr[-3000:]
    run = run_dir_of(tmp_path)
    first, second = finished(run, 2, attempts=2)["attempts"]
    trained_once(run, 2, (0, 1))
    assert (first["outcome"], first["phase"], first["epoch"], first["rank"]) == ("oom", "val", 1, 0)
    assert [r["val_batch"] for r in recovered_records(run)] == [4, 2]
    assert f"resuming from {run / 'weights' / 'unvalidated.pt'}" in result.stderr
    assert second["resumed_from_epoch"] == 1 and second["val_batch"] == 2
    assert {(e["phase"], e["epoch"]) for e in events(run, "val_start") if e["attempt"] == 2} == {("val", 1),
                                                                                                  ("final", 1)}
    assert not (run / "weights" / valretry.UNVALIDATED).exists()


@pytest.mark.slow
def test_a_relaunch_after_a_middle_epochs_validation_validates_it_and_trains_on(run_cli, tmp_path):
    result = run_cli("train", "--gpus", "0,1", "--epochs", "3", *TINY, *KEEP_EVERY_EPOCH,
                     env={**TWO, "YOLOSAFE_INJECT_OOM": "phase=val,epoch=1,rank=1,times=3"})
    assert result.returncode == 0, result.stderr[-3000:]
    run = run_dir_of(tmp_path)
    finished(run, 3, attempts=2)
    trained_once(run, 3, (0, 1))
    second = [(e["event"], e["phase"], e["epoch"]) for e in events(run) if e["attempt"] == 2 and e["rank"] == 0]
    assert second[:3] == [("val_start", "val", 1), ("val_end", "val", 1), ("train_start", "train", 2)]


def epoch_row(run: Path) -> dict[str, str]:
    """results.csv's first epoch: its metrics, validation losses and training losses."""
    header, row = (line.split(",") for line in (run / "results.csv").read_text().strip().splitlines()[:2])
    return {k: v for k, v in zip(header, row, strict=True) if k.startswith(("metrics/", "val/", "train/"))}


@pytest.mark.slow
def test_one_process_retry_gives_the_uninterrupted_runs_metrics(run_cli, tmp_path):
    """One process: validation at 8 fails on its first batch and runs again with forward passes of 4; the run
    without the OOM (same seed, same val batch) has the same results.csv row."""
    retried = run_cli("train", "--epochs", "1", "--name", "retried", *TINY, "--val-batch", "8",
                      env={"YOLOSAFE_INJECT_OOM": "phase=val,epoch=0,iteration=0"}, keep_cr=True)
    assert retried.returncode == 0, retried.stderr[-3000:]
    plain = run_cli("train", "--epochs", "1", "--name", "plain", *TINY, "--val-batch", "8")
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "OOM in validation at epoch 1/1: val batch 8 -> 4, validated again in place" in retried.stdout
    # the bar the OOM cut short, at 0 of its batches: in train.log, not left dead on the terminal
    log = (run_dir_of(tmp_path, "retried") / "train.log").read_text()
    assert re.search(r"\b0% \S+ 0/2\b", log) and f"{oom.BAR_CUT_SHORT}" in log
    assert not dead_bars(retried.stdout) and oom.BAR_CUT_SHORT not in retried.stdout, retried.stdout[-3000:]
    rows = {}
    for name in ("retried", "plain"):
        finished(run_dir_of(tmp_path, name), 1)
        rows[name] = epoch_row(run_dir_of(tmp_path, name))
    assert any(k.startswith("metrics/") for k in rows["plain"]) and rows["retried"] == rows["plain"]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 square validation images: at val batch 4 on 2 ranks, Ultralytics' shards are 8 and 2 images."""
    from yolosafe.planning import datasets

    return datasets.ensure_shapes(tmp_path_factory.mktemp("uneven"), train=8, val=10, size=64)


@pytest.fixture(scope="module")
def uneven_baseline(uneven: Path, tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Path:
    """The 2-rank run without an OOM that each drill on the uneven set compares with (one for all of them)."""
    import subprocess

    from tests.conftest import YOLOSAFE, cli_env

    cwd = tmp_path_factory.mktemp("uneven-baseline")
    done = subprocess.run([YOLOSAFE, "train", *UNEVEN, "--data", str(uneven)], cwd=cwd, env=cli_env(shared_cache, TWO),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir_of(cwd)


UNEVEN = ["--gpus", "0,1", "--epochs", "1", *TINY, "--val-batch", "4"]


@pytest.mark.slow
@pytest.mark.parametrize("rank, iteration", [(1, 0), (0, 1)])
def test_an_in_place_retry_on_either_rank_leaves_the_epochs_results_as_without_it(run_cli, tmp_path, uneven,
                                                                                    uneven_baseline, rank, iteration):
    """2 ranks, 10 validation images at val batch 4 (shards of 8 and 2): an OOM on rank 1's only batch, or on rank
    0's second one, is recovered in place, and the epoch's results.csv row (metrics, validation and training losses)
    and the final validation's metrics are those of the run without it; the validator counted all 10 images."""
    result = run_cli("train", *UNEVEN, "--data", str(uneven),
                     env={**TWO, "YOLOSAFE_INJECT_OOM": f"phase=val,epoch=0,rank={rank},iteration={iteration}"},
                     keep_cr=True)  # the terminal's bytes: its redraws too
    assert result.returncode == 0, result.stderr[-3000:]
    run = run_dir_of(tmp_path)
    finished(run, 1)
    assert f"on rank {rank}, GPU {rank}: val batch 4 -> 2 on that rank, validated again in place" in result.stdout
    # rank 0's bar cut at 1 of its 2 batches: the log's, not the terminal's (other ranks draw no bar)
    assert (f"[rank0]: {oom.BAR_CUT_SHORT}" in (run / "train.log").read_text()) == (rank == 0)
    assert not dead_bars(result.stdout), result.stdout[-3000:]
    assert epoch_row(run) == epoch_row(uneven_baseline) and any(k.startswith("val/") for k in epoch_row(run))
    assert story(run)["final_metrics"] == story(uneven_baseline)["final_metrics"]
    assert re.search(r"^\s*all\s+10\s", result.stdout + result.stderr, re.M), result.stdout[-3000:]


# -- the GPU check's figures, without a GPU ----------------------------------------------------------------------------

def gpu_check():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_check_caps_between_the_peaks_it_measured():
    check = gpu_check()
    assert check.cap_between(2000, 6000, 100_000) == 0.044  # 60 % of the way from 2000 to 6000 MiB of 100000
    assert check.cap_between(2000, 2200, 100_000) is None  # too close to make validation alone run out
    assert check.cap_between(2000, 6000, 0) is None


def test_the_gpu_check_compares_the_watch_and_the_plan_with_torch(tmp_path):
    check = gpu_check()
    summary = {"gpus": {"0": {"phases": {
        "train": {"peak_used_mib": 3100, "peak_ours_mib": 3000, "torch_max_reserved_mib": 2500},
        "val": {"peak_used_mib": 5200, "peak_ours_mib": 5000, "torch_max_reserved_mib": 4400},
        "final": {"peak_used_mib": 5300, "peak_ours_mib": 5100, "torch_max_reserved_mib": None}}}}}
    (tmp_path / "memory_summary.json").write_text(json.dumps(summary))
    measured = check.watch_vs_torch(tmp_path)
    assert measured["train"]["nvml_minus_torch_mib"] == 500 and measured["final"]["nvml_minus_torch_mib"] is None
    plan = {"memory": {"predicted": {"train": {"peak_mib": 2400}, "val": {"peak_mib": 6000}}}}
    found = check.plan_vs_measured(plan, measured)
    assert found["train"] == {"predicted_mib": 2400, "measured_mib": 3000, "measured_over_predicted": 1.25}
    assert found["val"]["measured_mib"] == 5100 and found["val"]["measured_over_predicted"] == 0.85
    (tmp_path / "events.jsonl").write_text("\n".join(json.dumps(e) for e in (
        {"event": "train_end", "phase": "train", "max_reserved_mib": 2500.0},
        {"event": "val_end", "phase": "val", "max_reserved_mib": 4400.0},
        {"event": "val_start", "phase": "val", "batch": 8})))
    assert check.torch_peaks(tmp_path) == {"train": 2500.0, "val": 4400.0}
    (tmp_path / "failure-1-rank0-recovered1.json").write_text(json.dumps(
        {"oom": True, "phase": "val", "val_batch": 256, "next_val_batch": 128, "recovered": "in_place",
         "message": "CUDA out of memory. Tried to allocate 2.00 GiB"}))
    assert check.run_summary(tmp_path)["ooms"] == [{"phase": "val", "epoch": None, "val_batch": 256,
                                                    "next_val_batch": 128, "recovered": "in_place", "batch": None,
                                                    "real": True}]


# -- near misses: the assigner's own OOM fallback ----------------------------------------------------------------------

def test_the_assigners_oom_fallback_is_recorded_reported_and_diagnosed(tmp_path):
    """Ultralytics' own warning, on its own logger, as TaskAlignedAssigner words it: one event, in the report's
    near misses and in doctor's causes."""
    from types import SimpleNamespace

    from ultralytics.utils import LOGGER

    from yolosafe.readers import report
    from yolosafe.readers.doctor.causes import _near_misses
    from yolosafe.readers.doctor.diagnosis import RunView
    from yolosafe.training import callbacks

    context = run_context(tmp_path)
    context.progress.epoch, context.progress.iteration = 2, 5
    callbacks.watch_assigner(context, SimpleNamespace(device=None))
    callbacks.watch_assigner(context, SimpleNamespace(device=None))  # once per process
    try:
        LOGGER.warning("CUDA out of memory in TaskAlignedAssigner with batch_size=32 and max_num_obj=412; retrying "
                       "assignment one image at a time on GPU. Model forward batch size is unchanged.")
    finally:
        for handler in [h for h in LOGGER.handlers if isinstance(h, callbacks.AssignerNearMiss)]:
            LOGGER.removeHandler(handler)
    [miss] = report.near_misses(RunDir(tmp_path))
    assert (miss["batch"], miss["max_num_obj"], miss["epoch"], miss["iteration"]) == (32, 412, 2, 5)
    [cause] = _near_misses(RunView(str(tmp_path), memory={"near_misses": [miss]}))
    assert cause.finding.startswith("the training step ran out of memory in the assigner at batch 32 in epoch 3 and "
                                    "went on slowly")


def test_the_history_keeps_the_ooms_a_run_went_on_from(tmp_path):
    from yolosafe.planning.memory import history

    (tmp_path / "failure-1-rank1-recovered1.json").write_text(json.dumps(
        {"oom": True, "recovered": "in_place", "phase": "val", "gpu": 1}))
    (tmp_path / "failure-1-rank0.json").write_text(json.dumps({"oom": True, "phase": "val", "gpu": 0}))  # relaunched
    (tmp_path / "events.jsonl").write_text(json.dumps({"event": "assigner_oom", "phase": "train", "gpu": 0}) + "\n")
    assert history.near_misses(tmp_path, [2, 3]) == {(3, "val"): 1, (2, "train"): 1}  # the plan's GPUs 2 and 3


def test_every_ranks_own_yolosafe_line_reaches_the_terminal():
    """Of several ranks the terminal shows the first rank's output, and yolosafe's own lines of any rank (the line
    of an OOM rank 1 recovered in place)."""
    import io

    from yolosafe.supervisor.terminal import RankStream

    out = io.BytesIO()
    RankStream(out).write(b"[rank0]: epoch 1\n[rank1]: epoch 1 again\n[rank1]: yolosafe: OOM in validation at epoch "
                          b"1/2 on rank 1, GPU 1: val batch 4 -> 2 on that rank, validated again in place\n")
    assert out.getvalue() == (b"epoch 1\nyolosafe: OOM in validation at epoch 1/2 on rank 1, GPU 1: val batch 4 -> 2 "
                              b"on that rank, validated again in place\n")


def test_the_gpu_check_dry_probes_run_here_and_end_in_verdicts(tmp_path):
    """``--dry --parts probes``: the OOM forms (the injection's texts), the memory after them and NVML's release
    step run without a GPU in about a second; every verdict passes and the exit status says so."""
    import subprocess
    import sys

    out = tmp_path / "gpu_check.json"
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(path), "--dry", "--parts", "probes", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    verdicts = json.loads(out.read_text())["verdicts"]
    assert set(verdicts) == {"gpus", "oom_context", "oom_cublas", "oom_cudnn", "oom_allocator", "nvml_release"}
    assert all(v["pass"] for v in verdicts.values()) and done.stdout.count("pass ") == len(verdicts)


def test_the_gpu_check_fails_what_a_gpu_would_get_wrong():
    """A bare cuDNN internal error, no error at all, memory not back after an OOM, a release slower than the
    relaunch's wait, a training that took other attempts than expected: each a failed verdict, saying why."""
    check = gpu_check()
    figures = {"oom_forms": {
        "cudnn": {"error": "RuntimeError", "text": "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR", "freed": True},
        "cublas": {"error": None, "freed": True},
        "allocator": {"error": "OutOfMemoryError", "text": "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 "
                      "has a total capacity of 79.19 GiB of which 1.50 MiB is free.", "freed": False},
        "context": {"error": "AcceleratorError", "text": "CUDA error: out of memory"}},
        "nvml_release": {"listed_s": 0.4, "memory_s": 75.0, "bound_s": 60.0},
        "train_oom": {"exit": 0, "attempts": [{"outcome": "completed"}], "ooms": []}}
    verdicts = check.verdicts(figures)
    assert {k for k, v in verdicts.items() if not v["pass"]} == {"oom_cudnn", "oom_cublas", "oom_allocator",
                                                                  "nvml_release", "train_oom"}
    assert verdicts["oom_context"]["pass"] and "no error raised" in verdicts["oom_cublas"]["why"]
    assert "75.0 s" in verdicts["nvml_release"]["why"]
