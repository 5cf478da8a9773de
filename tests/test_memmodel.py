"""The memory model, the planner's choices and the history correction: pure functions, no training."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from yolosafe import gpus
from yolosafe.planning import trainplan as plan
from yolosafe.planning.memory import history, hostram, objects, planner, valshapes
from yolosafe.planning.memory import model as memmodel
from yolosafe.planning.memory import table as memtable
from yolosafe.planning.trainoptions import TrainOptions
from yolosafe.rundir.layout import RunDir

FAMILIES = [[f"yolov8{s}" for s in "nsmlx"], [f"yolo11{s}" for s in "nsmlx"]]
OPTIONS = TrainOptions.of({"imgsz": 640, "args": [], "memory_fraction": 0.85})
PUBLIC_POINTS = Path(__file__).parent / "data" / "memory_points.yaml"
POINT_FIELDS = {"gpu_mem": {"batch", "value", "unit", "phase", "epoch"}, "autobatch_profile": {"profile", "unit"},
                "oom": {"batch", "gpu_total_mib"}, "ran": {"batch", "gpu_total_mib"}}
IDLE_USED_MIB = 400.0  # an idle GPU's used memory (driver, ECC), as benchmarks/memory_model.py assumes


def gpu(index: int, total_gib: float, used_mib: float = 0.0, name: str = "Fake GPU", pids: tuple = ()) -> gpus.GPU:
    procs = tuple(gpus.GPUProcess(pid, used_mib / max(len(pids), 1)) for pid in pids)
    return gpus.GPU(index, name, f"GPU-{index}", total_gib * 1024, used_mib, 0, procs)


def test_the_table_covers_the_common_models_with_sources():
    table = memtable.load_table()
    assert set(table) >= {name for family in FAMILIES for name in family}
    for terms in table.values():
        assert terms.source == "table" and terms.imgsz == 640
        assert terms.train_act_per_image_mib > terms.val_act_per_image_mib > 0 and terms.loss_per_image_mib > 0


def test_a_prediction_is_fixed_plus_per_image_times_batch_with_explicit_terms():
    terms = memtable.table_terms("yolov8n.pt")
    one, eight = (memmodel.predict(terms, memmodel.Setup(), "train", b) for b in (1, 8))
    assert eight.allocated_mib - one.allocated_mib == pytest.approx(7 * one.per_image_mib)
    frag = memmodel.FRAGMENTATION[True]  # yolosafe's default: expandable_segments
    assert eight.required_mib == pytest.approx(eight.allocated_mib * (1 + frag) + memmodel.CONTEXT_MIB)
    assert eight.gpu_mem_mib == pytest.approx(eight.allocated_mib * memmodel.ALLOCATOR_STEADY)
    assert eight.gpu_mem_gib == pytest.approx(eight.gpu_mem_mib / 1024)
    plain = memmodel.predict(terms, memmodel.Setup(expandable_segments=False), "train", 8)
    assert plain.required_mib > eight.required_mib and plain.gpu_mem_mib == eight.gpu_mem_mib
    assert 100 < one.per_image_mib < 140  # ~120 MB per image for yolov8n at 640 with 100 objects per image
    assert set(one.sources) == {"gpu_mem_gib", "required_mib"}
    assert {"activations", "loss", "objects per image", "state", "reserved ratio"} <= set(one.sources["gpu_mem_gib"])
    assert {"fragmentation", "context", "calibration"} <= set(one.sources["required_mib"])
    crowded = memmodel.predict(terms, memmodel.Setup(objects_per_image=1000), "train", 8)
    assert crowded.per_image_mib - eight.per_image_mib == pytest.approx(terms.loss_at(1000) - terms.loss_at(100))
    ddp = memmodel.predict(terms, memmodel.Setup(world_size=2), "train", 8)
    assert ddp.outside_mib == memmodel.NCCL_MIB and ddp.fixed_mib > eight.fixed_mib  # NCCL, DDP buckets
    fp32 = memmodel.predict(terms, memmodel.Setup(amp=False), "train", 8)
    assert fp32.per_image_mib == pytest.approx(eight.per_image_mib * memmodel.FP32_ACTIVATIONS)
    at_1280 = memmodel.predict(terms, memmodel.Setup(imgsz=1280), "train", 8)
    assert at_1280.per_image_mib == pytest.approx(4 * eight.per_image_mib)  # quadratic in imgsz
    assert "scaled from 640 to 1280" in at_1280.sources["required_mib"]["activations"]


@pytest.mark.parametrize(("names", "env", "nvls"), [
    (["NVIDIA H100 80GB HBM3"] * 8, {}, True),  # HGX H100: SXM parts on NVSwitch
    (["NVIDIA H200", "NVIDIA H200"], {}, True),
    (["NVIDIA B200"] * 4, {"NCCL_NVLS_ENABLE": "0"}, False),  # turned off
    (["NVIDIA H100 PCIe"] * 2, {}, False),
    (["NVIDIA H100 NVL"] * 2, {}, False),  # bridged pairs, no NVSwitch
    (["NVIDIA A100-SXM4-80GB"] * 8, {}, False),  # NVSwitch without NVLink SHARP
    (["NVIDIA H100 80GB HBM3", "NVIDIA L4"], {}, False),
])
def test_the_plans_nccl_term_follows_the_interconnect(names, env, nvls):
    """DDP's NCCL buffers per rank: the NCCL default over PCIe or NVLink, about 1 GiB more where NCCL uses NVLink
    SHARP (NVSwitch nodes of Hopper and later GPUs), an estimate that says where it comes from; one GPU has none."""
    assert planner.nvls_node(names, env) is nvls
    if not env:  # the planner's set-up of these GPUs (its own environment: NCCL_NVLS_ENABLE unset here)
        assert planner.setup_of(OPTIONS, len(names), gpu_names=names).nvls is nvls
        assert not planner.setup_of(OPTIONS, 1, gpu_names=names[:1]).nvls
    terms = memtable.table_terms("yolov8n.pt")
    p = memmodel.predict(terms, memmodel.Setup(world_size=len(names), nvls=nvls), "train", 8)
    assert p.outside_mib == memmodel.NCCL_MIB + (memmodel.NVLS_MIB if nvls else 0)
    said = p.sources["required_mib"]["nccl"]
    assert said.startswith(f"{p.outside_mib:.0f} MiB per rank") and ("estimate" in said and "NVLS" in said) is nvls
    assert memmodel.predict(terms, memmodel.Setup(nvls=nvls), "train", 8).outside_mib == 0


def test_largest_batch_is_the_edge_of_the_budget():
    terms, setup = memtable.table_terms("yolo11s"), memmodel.Setup()
    budget = 20_000
    best = memmodel.largest_batch(terms, setup, budget)
    peak = lambda b: max(memmodel.predict(terms, setup, p, b).required_mib for p in ("train", "val"))  # noqa: E731
    assert peak(best) <= budget < peak(best + 1)
    assert memmodel.largest_batch(terms, setup, 100) == 0


def test_tier_table_is_monotonic():
    vram = [4, 8, 12, 24, 48, 80]
    small, large = (planner.tier_table(vram, size, OPTIONS, 0.85)["batches"] for size in (640, 1280))
    for model, row in small.items():
        batches = [row[f"{v:g}"] for v in vram]
        assert batches == sorted(batches), f"more VRAM, smaller batch: {model}"
        assert all(large[model][k] <= row[k] for k in row), f"larger imgsz, larger batch: {model}"
    for family in FAMILIES:
        for v in vram:
            batches = [small[m][f"{v:g}"] for m in family]
            assert batches == sorted(batches, reverse=True), f"bigger model, larger batch at {v} GiB: {family}"
    assert small["yolov8n"]["80"] > small["yolov8x"]["80"] > 0


def test_the_smallest_free_gpu_decides():
    terms, setup = memtable.table_terms("yolov8m"), memmodel.Setup(world_size=2)
    roomy, tight = gpu(0, 24), gpu(1, 24, used_mib=12 * 1024, pids=(4242,))
    per_gpu, reasons = planner.auto_batch(terms, setup, [roomy, tight], 0.85, None, history_file=None)
    alone = memmodel.largest_batch(terms, setup, 0.85 * tight.free_mib)
    assert per_gpu == alone < memmodel.largest_batch(terms, setup, 0.85 * roomy.free_mib)
    assert len(reasons) == 2 and "GPU 1" in reasons[1]


def test_gpus_auto_leaves_out_busy_gpus_and_takes_the_most_free():
    inventory = gpus.Inventory("fake", (gpu(0, 24, 13000, pids=(4242,)), gpu(1, 24, 300), gpu(2, 24, 9000, pids=(7,)),
                                        gpu(3, 24, 100)))
    chosen, reasons = planner.choose_gpus("auto:2", inventory, inventory.ids)
    assert chosen == (1, 3)
    assert any("GPU 0 left out" in r and "4242" in r for r in reasons) and "chose GPUs 1,3" in reasons[-1]
    assert planner.choose_gpus("auto", inventory, inventory.ids)[0] == (1, 3)
    assert planner.choose_gpus("auto:1", inventory, inventory.ids)[0] == (3,)  # the most free
    with pytest.raises(plan.PlanError, match="only 2 of 4 GPUs are idle"):
        planner.choose_gpus("auto:3", inventory, inventory.ids)
    with pytest.raises(plan.PlanError, match="auto:N"):
        planner.choose_gpus("auto:x", inventory, inventory.ids)


def _history_line(tmp_path, run: int, predicted: memmodel.Prediction, measured: float) -> dict:
    return {"run_dir": str(tmp_path / f"run{run}"), "gpu": 0, "gpu_name": "Fake GPU", "phase": "train",
            "predicted_required_mib": predicted.required_mib, "calibration": 1.0,
            "predicted_uncalibrated_mib": predicted.required_mib, "measured_peak_mib": measured}


def test_history_moves_the_prediction_toward_what_this_machine_measured(tmp_path):
    terms, setup = memtable.table_terms("yolov8s"), memmodel.Setup()
    base = memmodel.predict(terms, setup, "train", 32)
    measured = 1.5 * base.required_mib  # this GPU type needs 50 % more than the model says
    path = tmp_path / "history.jsonl"
    assert history.calibration("Fake GPU", path) == (1.0, 0)
    errors = []
    for run in range(1, 5):
        path.open("a").write(json.dumps(_history_line(tmp_path, run, base, measured)) + "\n")
        factor, n = history.calibration("Fake GPU", path)
        assert n == run
        errors.append(abs(memmodel.predict(terms, setup, "train", 32, factor).required_mib - measured))
    assert errors == sorted(errors, reverse=True) and errors[0] < abs(base.required_mib - measured)
    assert history.calibration("Other GPU", path) == (1.0, 0)  # per GPU type
    lines = planner.gpu_memory(terms, setup, gpu(0, 24), 32, 32, path)
    assert lines.calibrated_runs == 4
    assert "calibrated on 4 earlier run(s)" in lines.train.sources["required_mib"]["calibration"]
    assert history.calibration("Fake GPU", path, "val") == (1.0, 0)  # validation learns from validation peaks only
    assert lines.val.calibration == 1.0 and lines.train.calibration > 1.0


def test_a_finished_run_is_appended_to_the_history(tmp_path):
    from yolosafe.rundir import files as rundir

    run = tmp_path / "run"
    run.mkdir()
    train = memmodel.predict(memtable.table_terms("yolov8n"), memmodel.Setup(), "train", 16).as_dict()
    val = memmodel.predict(memtable.table_terms("yolov8n"), memmodel.Setup(), "val", 16).as_dict()
    story = {"gpus": [{"index": 2, "name": "Fake GPU"}], "versions": {"torch": "2.x", "driver": "550"},
             "memory_plan": {"model": "yolov8n", "imgsz": 640, "amp": True, "world_size": 1,
                             "predicted": {"train": train, "val": val}}}
    rundir.write_json(run / rundir.MEMORY_SUMMARY, {"gpus": {"2": {"phases": {
        "train": {"peak_ours_mib": 3000.0}, "val": {"peak_ours_mib": 1500.0}, "final": {"peak_ours_mib": 1700.0}}}}})
    path = tmp_path / "h.jsonl"
    assert history.record(RunDir(run), story, path) == 2
    lines = history.read(path)
    assert [(x["phase"], x["measured_peak_mib"], x["gpu_name"]) for x in lines] == [
        ("train", 3000.0, "Fake GPU"), ("val", 1700.0, "Fake GPU")]
    assert lines[0]["torch"] == "2.x" and lines[0]["predicted_required_mib"] == train["required_mib"]
    assert history.record(RunDir(tmp_path / "missing"), story, path) == 0  # never raises


def test_host_ram_cache_per_rank_and_workers():
    est = hostram.estimate({"cache": "ram", "workers": 8}, 4, 640, 100_000, available=64 * 1024)
    assert not est.fits and est.per_rank_cache_mib > 80 * 1024  # 100k decoded 640 px images
    advice = hostram.advice(est)
    assert any("cache=disk" in a and "per rank" in a for a in advice)
    lean = hostram.estimate({"workers": 16}, 8, 640, None, available=24 * 1024)
    assert not lean.fits and any("workers=" in a for a in hostram.advice(lean))
    assert hostram.advice(hostram.estimate({}, 1, 640, 1000, available=None)) == []  # unknown RAM: no advice


def test_fake_gpu_memory_follows_fixed_plus_per_image(tmp_path):
    phase = tmp_path / "phase.json"
    spec = {"gpus": [{"total_mib": 24576, "phase_mib": {"train": 500}, "per_image_mib": {"train": 100, "val": 10}}]}
    backend = gpus.FakeBackend(json.dumps(spec), {gpus.PHASE_FILE_ENV: str(phase)})
    for name, batch, used in (("train", 4, 900), ("train", 8, 1300), ("val", 16, 160)):
        phase.write_text(json.dumps({"phase": name, "pid": 1, "epoch": 0, "batch": batch}))
        assert backend.read_memory(0).used_mib == used



def public_points() -> list[dict]:
    return yaml.safe_load(PUBLIC_POINTS.read_text())["points"]


def test_every_public_memory_point_cites_its_source_and_has_the_fields_of_its_kind():
    points = public_points()
    for point in points:
        what = f"{point.get('model')} {point.get('kind')} {point.get('source')}"
        assert point["kind"] in POINT_FIELDS, what
        missing = ({"model", "imgsz", "gpu", "source"} | POINT_FIELDS[point["kind"]]) - set(point)
        assert not missing, f"{what}: missing {sorted(missing)}"
        assert re.match(r"https://\S+$", point["source"]), what
        memtable.table_terms(point["model"])  # a model the table knows
        assert point.get("unit", "GB") in ("GB", "GiB"), what
        if point["kind"] == "gpu_mem":
            assert point["phase"] in ("steady", "first-epoch"), what
            epoch, epochs = map(int, re.fullmatch(r"(\d+)/(\d+)", str(point["epoch"])).groups())
            assert 1 <= epoch <= epochs and (point["phase"] == "first-epoch" or epoch >= 4), what
            assert point["value"] > 0 and point["batch"] >= 1, what
    steady = [p for p in points if p["kind"] == "gpu_mem" and p["phase"] == "steady" and not p.get("dense")]
    assert len(steady) >= 8 and len({p["model"] for p in steady}) >= 4


def test_the_public_outcomes_and_figures_hold():
    """The benchmark's headline figures (benchmarks/memory_model.py prints them; docs/memory-model.md quotes them)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_model.py"
    spec = importlib.util.spec_from_file_location("memory_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    h = bench.headline(public_points())
    assert h["steady_n"] >= 14 and abs(h["steady_median"]) <= 0.15 and abs(h["held_out_median"]) <= 0.15, h
    assert abs(h["steady_worst"]) <= 0.25, h
    assert h["ran"] >= 30 and h["ran_fits"] == h["ran"], h
    assert h["died"] >= 3 and h["died_does_not_fit"] == h["died"], h
    assert h["auto_share_min"] >= 0.90 and h["auto_below_died"] == h["auto_checked"], h


def test_every_phase_has_both_figures_and_the_fit_uses_required():
    terms, setup = memtable.table_terms("yolov8s"), memmodel.Setup()
    budget = 45434 - 400
    best = memmodel.largest_batch(terms, setup, budget)
    for phase in ("train", "val"):
        p = memmodel.predict(terms, setup, phase, best)
        assert p.required_mib <= budget and p.gpu_mem_mib > p.allocated_mib and p.required_mib > p.allocated_mib
        assert set(p.as_dict()) >= {"gpu_mem_gib", "required_mib", "sources"}
    val = memmodel.predict(terms, setup, "val", 32)
    assert val.per_image_mib > terms.val_act_per_image_mib + terms.loss_per_image_mib  # loss, NMS candidates


def _labelled_set(root: Path, per_image: list[int]) -> Path:
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i, n in enumerate(per_image):
            (root / "labels" / split / f"{i}.txt").write_text("".join("0 0.5 0.5 0.01 0.01\n" for _ in range(n)))
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames: {{0: face}}\n")
    return data


def _figures(root: Path, cache: Path) -> dict:
    """What the input check hands the memory model, over label files as Ultralytics pairs them with images."""
    labels = {split: sorted(str(p) for p in (root / "labels" / split).glob("*.txt")) for split in ("train", "val")}
    return {"objects": {split: objects.label_counts(files, cache) for split, files in labels.items()}}


def test_the_dataset_labels_decide_objects_per_image_and_are_cached(tmp_path, monkeypatch):
    _labelled_set(tmp_path / "sparse", [1, 2, 3] * 40)
    _labelled_set(tmp_path / "crowded", [5] * 118 + [400, 900])
    cache = tmp_path / "cache"
    setup = objects.apply(memmodel.Setup(), _figures(tmp_path / "crowded", cache))
    assert setup.objects_per_image == 900 and setup.val_objects_per_image == 900
    assert "the dataset's labels" in setup.objects_source and "p99 400" in setup.objects_source
    assert objects.apply(memmodel.Setup(), _figures(tmp_path / "sparse", cache)).objects_per_image == 3
    missing = objects.label_counts([str(tmp_path / "none.txt"), str(tmp_path / "crowded/labels/val/119.txt")], cache)
    assert (missing["images"], missing["max"]) == (2, 900)  # an image without a label file: a background image
    monkeypatch.setattr(objects, "_count", lambda listing: pytest.fail("read again"))
    assert objects.apply(memmodel.Setup(), _figures(tmp_path / "crowded", cache)).objects_per_image == 900  # cached
    terms, budget = memtable.table_terms("yolov8n"), 24 * 1024
    dense = memmodel.largest_batch(terms, setup, budget)
    assert dense < 0.7 * memmodel.largest_batch(terms, memmodel.Setup(), budget)  # 900 vs 100 objects
    assert objects.apply(memmodel.Setup(), None) == objects.apply(memmodel.Setup(), {}) == memmodel.Setup()


def test_rect_validation_batches_follow_the_validation_images_shapes(tmp_path):
    from PIL import Image

    assert valshapes.square_area(640) == pytest.approx((672 / 640) ** 2)  # ceil(640 / 32 + 0.5) x 32
    for name, sizes in (("wide", [(64, 36), (64, 40)]), ("mixed", [(64, 36), (36, 64)])):
        images = []
        for i, size in enumerate(sizes):
            images.append(str(tmp_path / f"{name}{i}.jpg"))
            Image.new("RGB", size).save(images[-1])
        ratios = valshapes.image_ratios(images, tmp_path / "cache")
        setup = objects.apply(memmodel.Setup(), {"val_ratios": ratios})
        assert "the validation images' shapes" in setup.val_area_source
        if name == "wide":  # landscape only: [40/64, 1] -> 416 x 672
            assert setup.val_area == pytest.approx(416 * 672 / 640**2)
            wide = memmodel.predict(memtable.table_terms("yolov8n"), setup, "val", 16)
        else:
            assert setup.val_area == pytest.approx(valshapes.square_area(640))
            mixed = memmodel.predict(memtable.table_terms("yolov8n"), setup, "val", 16)
    assert wide.per_image_mib < mixed.per_image_mib
    assert memmodel.Setup().val_area_share == pytest.approx(valshapes.square_area(640))  # no shapes: the worst
    assert valshapes.image_ratios([str(tmp_path / "gone.jpg")], tmp_path / "cache") == []


def test_the_loss_follows_its_measured_curve():
    terms = memtable.table_terms("yolov8n")
    (x0, y0), (x1, y1) = terms.loss_curve[:2]
    assert len(terms.loss_curve) >= 3 and terms.loss_at(x0) == pytest.approx(y0)
    assert terms.loss_at(x1) == pytest.approx(y1)
    assert y0 < terms.loss_at((x0 + x1) / 2) < y1  # linear between the measured points
    (xa, ya), (xb, yb) = terms.loss_curve[-2:]
    assert terms.loss_at(2 * xb) == pytest.approx(yb + (yb - ya) / (xb - xa) * xb)  # the last slope beyond
    at_1280 = terms.at(1280)
    assert at_1280.loss_at(100) == pytest.approx(4 * terms.loss_at(100))
    flat = memmodel.Terms("x", 1, 640, 1, 1, 1, 1, loss_per_image_mib=10, loss_per_object_mib=0.5, source="t")
    assert flat.loss_at(10) == 15  # no curve: per image + per object
