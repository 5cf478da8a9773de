"""`yolosafe plan`, `--batch auto` and `--gpus auto` through the installed CLI, on fake GPUs."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import tinysets
from tests.conftest import run_dir_of, story
from yolosafe.planning import options
from yolosafe.planning.memory import model as memmodel
from yolosafe.planning.memory import table as memtable

FOUR_TWO_BUSY = json.dumps({"gpus": [
    {"name": "Fake A", "total_mib": 24576, "used_mib": 13000, "processes": [{"pid": 4242, "used_mib": 13000}]},
    {"name": "Fake A", "total_mib": 24576, "used_mib": 200},
    {"name": "Fake A", "total_mib": 24576, "used_mib": 9000, "processes": [{"pid": 77, "used_mib": 9000}]},
    {"name": "Fake A", "total_mib": 24576, "used_mib": 100},
]})


def test_plan_without_gpus_uses_the_table_and_says_so(run_cli):
    result = run_cli("plan", "--model", "yolov8s.yaml", "--imgsz", "640", "--batch", "16",
                     env={"YOLOSAFE_FAKE_GPUS": "none"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "figures from: table" in out and "no GPU here" in out
    assert "gpu_mem_gib" in out and "required_mib" in out and "context" in out and "fragmentation" in out
    assert "train at 16 images" in out and "val   at 16 images" in out
    data = json.loads(run_cli("plan", "--model", "yolov8s.yaml", "--imgsz", "640", "--json",
                              env={"YOLOSAFE_FAKE_GPUS": "none"}).stdout)
    assert data["memory"]["terms_source"] == "table" and data["memory"]["gpus"] == []
    assert data["memory"]["predicted"]["train"]["batch"] == 16
    for phase in ("train", "val"):
        figures = data["memory"]["predicted"][phase]
        assert figures["gpu_mem_gib"] > 0 and figures["required_mib"] > figures["gpu_mem_gib"] * 1024
        assert set(figures["sources"]) == {"gpu_mem_gib", "required_mib"}


def test_plan_tier_table_is_generated_and_monotonic(run_cli):
    result = run_cli("plan", "--vram", "8,12,24,48,80", "--imgsz", "640", "--json", env={"YOLOSAFE_FAKE_GPUS": "none"})
    assert result.returncode == 0, result.stderr
    table = json.loads(result.stdout)
    assert table["vram_gib"] == [8, 12, 24, 48, 80] and table["imgsz"] == 640
    for row in table["batches"].values():
        assert list(row.values()) == sorted(row.values())
    text = run_cli("plan", "--vram", "8,24", env={"YOLOSAFE_FAKE_GPUS": "none"}).stdout
    assert "largest safe per-GPU batch" in text and "yolo11x" in text and "24 GiB" in text
    bad = run_cli("plan", "--vram", "8,big")
    assert bad.returncode == 2 and bad.stderr.startswith("yolosafe: error: --vram 8,big")


def test_plan_gpus_auto_2_on_four_gpus_two_busy(run_cli):
    result = run_cli("plan", "--gpus", "auto:2", "--batch", "auto", "--imgsz", "640", "--json",
                     env={"YOLOSAFE_FAKE_GPUS": FOUR_TWO_BUSY})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["plan"]["gpus"] == [1, 3] and data["auto"]["gpus"] == [1, 3]
    assert any("GPU 0 left out" in r for r in data["auto"]["reasons"])
    per_gpu = data["auto"]["per_gpu_batch"]
    assert data["plan"]["batch"] == 2 * per_gpu and data["plan"]["per_gpu_batch"] == per_gpu
    limit = options.DEFAULTS["memory_fraction"] * (24576 - 200)
    for g in data["memory"]["gpus"]:
        assert g["train_required_mib"] <= limit and g["val_required_mib"] <= limit and g["calibrated_runs"] == 0
        assert g["gpu_mem_column_gib"] >= g["train_gpu_mem_gib"] and g["train_required_mib"] > 0
    text = run_cli("plan", "--gpus", "auto:2", "--batch", "auto", env={"YOLOSAFE_FAKE_GPUS": FOUR_TWO_BUSY}).stdout
    assert "auto: chose GPUs 1,3" in text and "not calibrated here" in text
    too_many = run_cli("plan", "--gpus", "auto:3", env={"YOLOSAFE_FAKE_GPUS": FOUR_TWO_BUSY})
    assert too_many.returncode == 2 and "only 2 of 4 GPUs are idle" in too_many.stderr


@pytest.mark.slow  # Ultralytics in a child process, seconds a case
def test_plan_warns_about_a_busy_gpu_a_thin_margin_and_a_batch_that_cannot_fit(run_cli):
    free, args = 24576 - 13000, ("--gpus", "0", "--imgsz", "640", "--model", "yolov8m.yaml")
    one = json.loads(run_cli("plan", *args, "--batch", "1", "--json", env={"YOLOSAFE_FAKE_GPUS": FOUR_TWO_BUSY}).stdout)
    train = one["memory"]["predicted"]["train"]  # the dataset's own objects per image decide the per-image term

    def required(b: int) -> float:
        return (train["fixed_mib"] + train["per_image_mib"] * b) * (1 + train["fragmentation"]) + train["context_mib"]

    thin = next(b for b in range(1, 200) if 0 < free - required(b) < 2457)
    for batch, expected in ((thin, "under 10% of the GPU"), (96, "does not fit the 11.3 GiB free")):
        result = run_cli("plan", "--gpus", "0", "--batch", str(batch), "--imgsz", "640", "--model", "yolov8m.yaml",
                         env={"YOLOSAFE_FAKE_GPUS": FOUR_TWO_BUSY})
        assert result.returncode == 0, result.stderr
        assert "another process uses 12.7 GiB" in result.stdout and expected in result.stdout


GPU_MIB = st.integers(min_value=1024, max_value=200 * 1024)


@settings(max_examples=60, deadline=None)
@given(gpus_mib=st.lists(st.tuples(GPU_MIB, st.floats(0.0, 0.9)), min_size=1, max_size=3),
       model=st.sampled_from(["yolov8n.yaml", "yolov8m.yaml", "yolo11x.yaml"]),
       imgsz=st.sampled_from([32, 320, 640, 1280]), fraction=st.sampled_from([0.5, 0.85, 0.95, 1.0]),
       images=st.one_of(st.none(), st.integers(1, 500)))
def test_batch_auto_never_warns_about_its_own_choice(tmp_path_factory, gpus_mib, model, imgsz, fraction, images):
    """Over fake GPUs of every size, partly used: the batch ``--batch auto`` chose fills the memory share it was
    given, so the plan warns of no thin margin and no misfit for it; the same batch given by hand does warn of a
    margin under 10% of the GPU."""
    from yolosafe import gpus
    from yolosafe.api import trainrun
    from yolosafe.planning.memory import planner
    from yolosafe.planning.trainoptions import TrainOptions
    from yolosafe.planning.trainplan import PlanError

    inventory = gpus.Inventory("fake", tuple(gpus.GPU(i, "Fake A", None, float(total), used * total, 0)
                                             for i, (total, used) in enumerate(gpus_mib)))
    history = tmp_path_factory.getbasetemp() / "no-history.jsonl"  # no calibration: the model's figures alone
    opts = TrainOptions(model=model, gpus=",".join(map(str, inventory.ids)), batch="auto", imgsz=imgsz,
                        memory_fraction=fraction, train_images=images)
    try:
        chosen, auto = planner.resolve_auto(opts, inventory, history_file=history)
    except PlanError:
        return  # not even one image fits: refused, nothing chosen
    built = trainrun.build(chosen, inventory)
    memory = planner.memory_plan(built, inventory, chosen, history_file=history, auto=auto)
    assert memory["predicted"]["train"]["batch"] == auto["per_gpu_batch"] == built.per_gpu_batch
    assert not [w for w in planner.warnings(memory) if "margin" in w or "does not fit" in w], memory["gpus"]
    by_hand = planner.memory_plan(built, inventory, chosen, history_file=history)
    for gpu, entry in zip(inventory.gpus, by_hand["gpus"], strict=True):
        thin = entry["headroom_mib"] < planner.LOW_MARGIN * gpu.total_mib
        assert thin == any("is under 10% of the GPU" in w for w in entry["warnings"]), entry


@pytest.mark.slow  # Ultralytics in a child process, seconds a case
def test_plan_batch_auto_says_no_margin_warning_a_given_batch_does(run_cli):
    """A 4 GiB GPU with 1.5 GB in use (fewer images fit than the training set holds): --batch auto fills 95% of the
    free memory and says nothing of it; the same batch given by hand is warned about."""
    spec = json.dumps({"gpus": [{"name": "Fake A", "total_mib": 4096, "used_mib": 1500}]})
    auto = run_cli("plan", "--gpus", "0", "--batch", "auto", "--imgsz", "640", "--model", "yolov8n.yaml",
                   env={"YOLOSAFE_FAKE_GPUS": spec})
    assert auto.returncode == 0, auto.stderr
    per_gpu = int(re.search(r"batch (\d+) total = \d+ per GPU", auto.stdout).group(1))
    assert "another process uses" in auto.stdout and "under 10% of the GPU" not in auto.stdout, auto.stdout
    given = run_cli("plan", "--gpus", "0", "--batch", str(per_gpu), "--imgsz", "640", "--model", "yolov8n.yaml",
                    env={"YOLOSAFE_FAKE_GPUS": spec})
    assert given.returncode == 0 and "under 10% of the GPU: an OOM is likely" in given.stdout, given.stdout


def test_batch_auto_dry_run_keeps_the_effective_batch(run_cli):
    result = run_cli("train", "--gpus", "auto:2", "--batch", "auto", "--imgsz", "640", "--effective-batch", "256",
                     "--dry-run", env={"YOLOSAFE_FAKE_GPUS": FOUR_TWO_BUSY})
    assert result.returncode == 0, result.stderr
    fraction = options.DEFAULTS["memory_fraction"]
    assert "note: chose GPUs 1,3" in result.stderr and f"images fit {fraction:.0%}" in result.stderr
    assert "nbs 256" in result.stdout
    bad = run_cli("train", "--batch", "lots", "--dry-run", env={"YOLOSAFE_FAKE_GPUS": "1x24GB"})
    assert bad.returncode == 2 and "--batch" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    cpu = run_cli("train", "--batch", "auto", "--gpus", "cpu", "--dry-run")  # yolo's AutoBatch on the CPU: its default
    assert cpu.returncode == 0 and "using Ultralytics' default batch 16" in cpu.stderr, cpu.stderr
    assert "16 total = 16 per GPU" in cpu.stdout


def fake_gpu_for_batch(per_gpu: int, imgsz: int, world_size: int) -> float:
    """The smallest fake GPU (MiB) on which --batch auto picks ``per_gpu`` images of yolov8n at ``imgsz``."""
    terms, setup = memtable.table_terms("yolov8n"), memmodel.Setup(imgsz=imgsz, world_size=world_size)
    peak = max(memmodel.predict(terms, setup, p, per_gpu).required_mib for p in ("train", "val"))
    return float(int(peak / options.DEFAULTS["memory_fraction"]) + 1)


@pytest.mark.slow
def test_batch_auto_trains_end_to_end_and_the_history_learns(run_cli, tmp_path, shared_cache):
    total = fake_gpu_for_batch(4, 64, world_size=2)
    scripted = {"phase_mib": {"train": 500, "val": 450}, "per_image_mib": {"train": 50, "val": 25}}
    spec = json.dumps({"gpus": [{"name": "Fake Tiny", "total_mib": total, **scripted} for _ in range(2)]})
    result = run_cli("train", "--gpus", "auto", "--batch", "auto", "--imgsz", "64", "--epochs", "1",
                     "--effective-batch", "16", "--watch-interval", "0.02", "workers=0", "plots=False",
                     env={"YOLOSAFE_FAKE_GPUS": spec})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    run = story(run_dir_of(tmp_path))
    assert run["batch_auto"]["per_gpu_batch"] == 4 and run["plan"]["batch"] == 8 and run["plan"]["gpus"] == [0, 1]
    assert run["plan"]["effective_batch"] == 16 and run["memory_plan"]["predicted"]["train"]["batch"] == 4
    lines = [json.loads(x) for x in (shared_cache / "yolosafe" / "memory_history.jsonl").read_text().splitlines()]
    mine = [x for x in lines if x["run_dir"] == str(run_dir_of(tmp_path).resolve())]
    assert {(x["gpu"], x["phase"], x["measured_peak_mib"]) for x in mine} == {  # fixed + per image x 4 images
        (0, "train", 700.0), (1, "train", 700.0), (0, "val", 550.0), (1, "val", 550.0)}
    again = json.loads(run_cli("plan", "--gpus", "0", "--batch", "4", "--imgsz", "64", "--json",
                               env={"YOLOSAFE_FAKE_GPUS": spec}).stdout)
    assert again["memory"]["gpus"][0]["calibrated_runs"] >= 1
    assert "calibrated on" in again["memory"]["predicted"]["train"]["sources"]["required_mib"]["calibration"]


@pytest.mark.slow
def test_plan_runs_the_fake_pass_for_a_custom_yaml_once(run_cli, tmp_path, shared_cache):
    from importlib import resources

    base = (resources.files("ultralytics") / "cfg" / "models" / "v8" / "yolov8.yaml").read_text()
    (tmp_path / "my-net.yaml").write_text(base.replace("nc: 80", "nc: 3"))  # first scale (n) is used
    args = ("plan", "--model", "my-net.yaml", "--imgsz", "640", "--batch", "8", "--json")
    first = run_cli(*args, env={"YOLOSAFE_FAKE_GPUS": "1x24GB"})
    assert first.returncode == 0, first.stderr[-2000:]
    memory = json.loads(first.stdout)["memory"]
    assert memory["terms_source"].startswith("fake pass (torch") and memory["model"] == "my-net"
    table = memtable.table_terms("yolov8n")
    per_image = memory["predicted"]["train"]["per_image_mib"]
    assert 0.8 < per_image / (table.train_act_per_image_mib + table.loss_per_image_mib) < 1.2
    assert list((shared_cache / "yolosafe" / "memterms").glob("my-net-*.json"))
    again = run_cli(*args, env={"YOLOSAFE_FAKE_GPUS": "1x24GB"})
    assert json.loads(again.stdout)["memory"]["predicted"] == memory["predicted"]  # from the cache: no second pass


@pytest.mark.slow
def test_plan_vram_honours_model_and_prints_the_rows_asked_for(run_cli, shared_cache):
    result = run_cli("plan", "--vram", "8,24", "--model", "yolo26n.yaml,yolov8s.yaml", "--imgsz", "640", "--json",
                     env={"YOLOSAFE_FAKE_GPUS": "none"})
    assert result.returncode == 0, result.stderr[-2000:]
    table = json.loads(result.stdout)
    assert list(table["batches"]) == ["yolo26n", "yolov8s"] and table["figure"] == "required_mib"
    assert table["sources"]["yolo26n"].startswith("fake pass") and table["sources"]["yolov8s"] == "table"
    assert table["batches"]["yolo26n"]["24"] > table["batches"]["yolo26n"]["8"] > 0


def _data_with_objects(root, per_image: list[int]) -> str:
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i, n in enumerate(per_image):
            tinysets.image(root / "images" / split / f"{i}.png", i)  # Ultralytics checks the images are there
            (root / "labels" / split / f"{i}.txt").write_text("0 0.5 0.5 0.01 0.01\n" * n)
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames: {{0: face}}\n")
    return str(data)


@pytest.mark.slow  # Ultralytics in a child process, seconds a case
def test_batch_auto_reads_the_dataset_labels_a_crowded_set_gets_a_smaller_batch(run_cli, tmp_path):
    chosen = {}
    for name, per_image in (("sparse", [2] * 20), ("crowded", [5] * 19 + [1000])):
        data = _data_with_objects(tmp_path / name, per_image)
        result = run_cli("plan", "--gpus", "0", "--batch", "auto", "--imgsz", "640", "--model", "yolov8n.yaml",
                         "--data", data, "--json", env={"YOLOSAFE_FAKE_GPUS": "1x24GB"})
        assert result.returncode == 0, result.stderr
        memory = json.loads(result.stdout)["memory"]
        assert "the dataset's labels" in memory["objects_per_image"]["source"]
        assert memory["objects_per_image"]["train"] == max(per_image)
        assert "public check" in memory["predicted"]["val"]["sources"]["required_mib"]
        chosen[name] = json.loads(result.stdout)["auto"]["memory_per_gpu_batch"]  # before the cap at 20 images
    assert chosen["crowded"] < 0.6 * chosen["sparse"]  # 1000 objects in one image: the assigner decides


@pytest.mark.slow  # Ultralytics in a child process, seconds a case
@pytest.mark.parametrize("layout", ["roboflow", "listed"])
def test_the_plan_measures_the_images_ultralytics_lists_in_every_layout(run_cli, tmp_path, layout):
    """A Roboflow export (``../train/images``, no ``path:``) and image lists in ``.txt`` files: the labels and shapes
    the memory model reads are those of the images Ultralytics' own dataset code lists, not a copy of its rules."""
    data = getattr(tinysets, layout)(tmp_path / layout, "detect")
    result = run_cli("plan", "--gpus", "0", "--batch", "8", "--imgsz", "64", "--model", "yolov8n.yaml",
                     "--data", str(data), "--json", env={"YOLOSAFE_FAKE_GPUS": "1x24GB"})
    assert result.returncode == 0, result.stderr
    memory = json.loads(result.stdout)["memory"]
    source = memory["objects_per_image"]["source"]
    assert f"train {tinysets.TRAIN} images, max 1" in source and f"val {tinysets.VAL} images, max 1" in source
    assert memory["objects_per_image"]["train"] == 1

