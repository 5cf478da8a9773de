"""The memory model against every public data point of tests/data/memory_points.yaml (not a test: a report).

    python benchmarks/memory_model.py

For each point it prints what the model predicts for the same quantity and the error, and Ultralytics AutoBatch's
own figure where the source gives one; then the median and worst error per kind (steady-state GPU_mem, first-epoch
GPU_mem, AutoBatch's profile) and, for every public OOM report, the batch ``--batch auto`` would choose on that GPU.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import replace
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from yolosafe import memmodel

POINTS = Path(__file__).resolve().parents[1] / "tests" / "data" / "memory_points.yaml"
FRACTION = 0.85  # --memory-fraction's default
DRIVER_MIB = 400.0  # an idle GPU's used memory (driver, ECC): its free memory is total minus this


def to_mib(value: float, unit: str) -> float:
    return value * (1e9 if unit == "GB" else 2**30) / memmodel.MIB


def profile_prediction(terms: memmodel.Terms, setup: memmodel.Setup, batch: int) -> float:
    """AutoBatch's profile: weights, gradients, the AMP casts and the activations of batch, reserved; no loss."""
    t = terms.at(setup.imgsz)
    state = terms.params * (memmodel.BYTES_WEIGHTS + memmodel.BYTES_GRADS + memmodel.BYTES_AMP_CAST) / memmodel.MIB
    return (state + t.train_act_fixed_mib + t.train_act_per_image_mib * batch) * memmodel.ALLOCATOR_STEADY


def rows_for(point: dict) -> list[tuple[str, str, float, float]]:
    """(kind, label, measured MiB, predicted MiB) for one point."""
    terms = memmodel.table_terms(point["model"])
    setup = memmodel.Setup(imgsz=point["imgsz"], worst_case=point.get("phase") != "steady")
    label = f"{point['model']} {point['imgsz']}px"
    if point["kind"] == "gpu_mem":
        predicted = memmodel.predict(terms, setup, "train", point["batch"]).reserved_mib
        return [(f"gpu_mem {point['phase']}", f"{label} b{point['batch']} {point['gpu']}",
                 to_mib(point["value"], point["unit"]), predicted)]
    if point["kind"] == "autobatch_profile":
        return [("autobatch_profile", f"{label} b{b} {point['gpu']}", to_mib(v, point["unit"]),
                 profile_prediction(terms, replace(setup, worst_case=False), int(b)))
                for b, v in point["profile"].items()]
    return []


def print_errors() -> None:
    points = yaml.safe_load(POINTS.read_text())["points"]
    errors: dict[str, list[float]] = {}
    print(f"{'kind':<22} {'point':<52} {'measured':>9} {'model':>9} {'error':>7}")
    for point in points:
        for kind, label, measured, predicted in rows_for(point):
            error = predicted / measured - 1
            errors.setdefault(kind, []).append(error)
            print(f"{kind:<22} {label[:52]:<52} {measured:>7.0f}Mi {predicted:>7.0f}Mi {error:>+7.0%}")
    print()
    for kind, values in errors.items():
        worst = max(values, key=abs)
        print(f"{kind:<22} n={len(values):<3} median error {statistics.median(values):+.0%}, worst {worst:+.0%}")
    print()
    print("OOM / ran reports: the batch that died (or ran), AutoBatch's choice and its predicted memory, the model's")
    print("predicted peak at that batch against the GPU, and the batch --batch auto would choose there")
    print(f"{'report':<40} {'batch':>9} {'AutoBatch':>9} {'its pred.':>9} {'model':>9} {'GPU':>9} {'auto':>6}")
    for point in points:
        if point["kind"] not in ("oom", "ran"):
            continue
        terms, setup = memmodel.table_terms(point["model"]), memmodel.Setup(imgsz=point["imgsz"])
        total = point["gpu_total_gb"] * 1e9 / memmodel.MIB
        ours = memmodel.largest_batch(terms, setup, FRACTION * (total - DRIVER_MIB))
        at_batch = memmodel.predict(terms, setup, "train", point["batch"]).peak_mib
        verdict = ("safe" if ours < point["batch"] else "WOULD DIE") if point["kind"] == "oom" else ""
        their = f"{to_mib(point['autobatch_predicted'], 'GB'):.0f}Mi" if "autobatch_predicted" in point else "-"
        print(f"{point['model'] + ' ' + str(point['imgsz']) + 'px ' + point['gpu']:<40} "
              f"{point['kind'] + ' ' + str(point['batch']):>9} {point.get('autobatch_batch', '-'):>9} {their:>9} "
              f"{at_batch:>7.0f}Mi {total:>7.0f}Mi {ours:>6}  {verdict}")


if __name__ == "__main__":
    print_errors()
