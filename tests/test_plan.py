"""The train-arg builder: pure, no torch, no Ultralytics import."""

from __future__ import annotations

import json

import pytest

from tests import tinysets
from yolosafe.planning.accumulation import warmup_accumulate
from yolosafe.planning.gpuselect import parse_gpus
from yolosafe.planning.trainplan import (
    PlanError,
    build_plan,
    check_passthrough,
    describe_accumulation,
    parse_passthrough,
)


def plan(**overrides):
    args = {"model": "yolov8n.yaml", "data": "d.yaml", "gpus": (0, 1, 2, 3), "batch": 64, "effective_batch": 128}
    return build_plan(**{**args, **overrides})


def test_four_gpus_split_and_accumulate():
    p = plan()
    assert p.device == "0,1,2,3"
    assert p.per_gpu_batch == 16
    assert p.accumulate == 2
    assert p.val_batch == 16  # the per-GPU train batch, not Ultralytics' 2x
    kwargs = p.train_kwargs()
    assert kwargs["batch"] == 64 and kwargs["nbs"] == 128 and kwargs["device"] == "0,1,2,3"


def test_cpu_plan_and_default_effective_batch():
    p = plan(gpus=(), batch=16, effective_batch=None)
    assert p.device == "cpu" and p.per_gpu_batch == 16
    assert p.effective_batch == 64 and p.accumulate == 4  # what Ultralytics' nbs=64 gives
    assert plan(gpus=(), batch=48, effective_batch=None).effective_batch == 48  # round(64/48) = 1


def test_halving_keeps_effective_batch():
    p = plan()
    half = p.halved()
    assert (half.batch, half.per_gpu_batch, half.accumulate, half.real_effective_batch) == (32, 8, 4, 128)
    assert half.val_batch == p.val_batch
    assert plan(batch=4, effective_batch=8).halved() is None  # 1 per GPU cannot be halved
    assert plan().halved(min_per_gpu=16) is None


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"batch": 6}, "does not split evenly over 4 GPUs"),
        ({"batch": 0}, "--batch 0"),
        ({"batch": 16, "effective_batch": 8, "gpus": ()}, "smaller than --batch"),
        ({"val_batch": 0}, "--val-batch 0"),
        ({"epochs": 0}, "--epochs 0"),
    ],
)
def test_bad_numbers(overrides, words):
    with pytest.raises(PlanError, match=words):
        plan(**overrides)


def test_batch_split_suggests_multiples():
    with pytest.raises(PlanError, match="4 or 8"):
        plan(batch=6)


@pytest.mark.parametrize(
    ("text", "words"),
    [("0,0", "listed twice"), ("9", "no GPU 9"), ("a,b", "not a GPU id")],
)
def test_bad_gpus(text, words):
    with pytest.raises(PlanError, match=words):
        parse_gpus(text, (0, 1, 2, 3))


def test_gpus_without_any_gpu_names_cpu():
    with pytest.raises(PlanError, match="--gpus cpu"):
        parse_gpus("0,1,2,3", (), "no NVIDIA driver")
    assert parse_gpus("cpu", ()) == ()
    assert parse_gpus(None, ()) == ()
    assert parse_gpus(None, (0, 1)) == (0,)
    assert parse_gpus("all", (0, 1)) == (0, 1)


def test_passthrough_checked_against_ultralytics_config():
    assert check_passthrough(parse_passthrough(["lr0=0.02", "cache=False", "workers=2"])) == {
        "lr0": 0.02,
        "cache": False,
        "workers": 2,
    }
    with pytest.raises(PlanError, match="--effective-batch"):
        check_passthrough({"accumulate": 4})
    with pytest.raises(PlanError, match="did you mean 'epochs'"):
        check_passthrough({"epoch": 3})
    with pytest.raises(PlanError, match="use --batch"):
        check_passthrough({"batch": 8})
    with pytest.raises(PlanError, match="missing an '=' sign"):  # Ultralytics' own words for it
        parse_passthrough(["lr0"])


def test_effective_batch_not_multiple_is_noted():
    from yolosafe.planning.trainplan import plan_warnings

    p = plan(effective_batch=100)
    assert p.accumulate == 2 and p.real_effective_batch == 128
    assert "not a multiple" in plan_warnings(p)[0]
    small = plan(gpus=(), batch=8, effective_batch=None, epochs=1, train_images=8)  # yolo's own nbs on a small set
    assert small.accumulate == 1 and plan_warnings(small) == []  # Ultralytics says nothing of it either
    asked = plan(gpus=(), batch=8, effective_batch=128, epochs=1, train_images=8)
    assert plan_warnings(asked) == ["effective batch 128 is more than the run's iterations of batch 8: Ultralytics "
                                    "will accumulate 1 step, an effective batch of 8"]


def test_accumulation_is_capped_and_ramped_like_ultralytics():
    # Ultralytics caps accumulate at len(train_loader) * epochs: 8 images, batch 8, one epoch -> 1 step, not 8.
    small = plan(gpus=(), batch=8, effective_batch=64, epochs=1, train_images=8)
    assert (small.batches_per_epoch, small.accumulate, small.real_effective_batch) == (1, 1, 8)
    assert plan(gpus=(), batch=8, effective_batch=64, epochs=1).accumulate == 8  # size unknown: not capped
    assert plan(gpus=(), batch=8, effective_batch=64, epochs=1, train_images=8, extra={"time": 1.0}).accumulate == 8
    # The tests' TINY run: shapes' 32 images, batch 8, nbs 16, 2 epochs: warm-up is 1 epoch = 4 iterations.
    tiny = plan(gpus=(), batch=8, effective_batch=16, epochs=2, train_images=32)
    assert (tiny.batches_per_epoch, tiny.accumulate, tiny.warmup_iterations) == (4, 2, 4)
    assert [warmup_accumulate(i, 4, 2) for i in range(6)] == [1, 1, 2, 2, 2, 2]  # np.interp rounds half to even
    four = plan(train_images=32, epochs=3)  # 4 GPUs x 16: 8 images per rank, one batch per epoch
    assert (four.batches_per_epoch, four.warmup_iterations) == (1, 2)
    assert "ramped 1 -> 2 over its first 2" in describe_accumulation(four)
    assert "dataset size unknown" in describe_accumulation(plan())


@pytest.mark.parametrize("layout", ["roboflow", "listed"])
def test_the_plans_image_count_is_ultralytics_own(run_cli, tmp_path, layout):
    """One counter, Ultralytics' (its dataset check and ``get_img_files``, in the input check): a Roboflow export
    (``../train/images``, no ``path:``) and image lists in ``.txt`` count the images Ultralytics will train on, which
    the plan's accumulation cap and its host-RAM estimate both use."""
    data = getattr(tinysets, layout)(tmp_path / "set", "detect")
    result = run_cli("plan", "--gpus", "cpu", "--batch", "2", "--imgsz", "32", "--model", "yolov8n.yaml",
                     "--data", str(data), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["plan"]["train_images"] == tinysets.TRAIN
