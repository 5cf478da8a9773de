"""The memory model against every public data point of tests/data/memory_points.yaml (not a test: a report).

    python benchmarks/memory_model.py

For each point it prints what the model predicts for the same quantity and the error (predicted / measured - 1), and
Ultralytics AutoBatch's own prediction where the source gives one; then the median and worst error per group
(steady-state GPU_mem, first-epoch GPU_mem, dense scenes apart, AutoBatch's profile) and, for every public OOM or ran
report, the batch ``--batch auto`` would choose on that GPU and whether it is below the batch that died.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from yolosafe import gpus
from yolosafe.planning import options
from yolosafe.planning.memory import model as memmodel
from yolosafe.planning.memory import planner

POINTS = Path(__file__).resolve().parents[1] / "tests" / "data" / "memory_points.yaml"
FRACTION = options.DEFAULTS["memory_fraction"]  # --memory-fraction's default
DRIVER_MIB = 400.0  # an idle GPU's used memory (driver, ECC): its free memory is total minus this


@dataclass(frozen=True)
class Row:
    group: str
    label: str
    measured_mib: float
    predicted_mib: float
    autobatch_mib: float | None = None  # AutoBatch's own prediction of the same quantity, where the source gives one

    @property
    def error(self) -> float:
        return self.predicted_mib / self.measured_mib - 1

    @property
    def autobatch_error(self) -> float | None:
        return None if self.autobatch_mib is None else self.autobatch_mib / self.measured_mib - 1


def to_mib(value: float, unit: str) -> float:
    return value * (1e9 if unit == "GB" else 2**30) / memmodel.MIB


def load_points() -> list[dict]:
    return yaml.safe_load(POINTS.read_text())["points"]


def setup_of(point: dict, steady: bool = False) -> memmodel.Setup:
    return memmodel.Setup(imgsz=point["imgsz"], amp=point.get("amp", True), optimizer=point.get("optimizer", "auto"),
                          worst_case=not steady)


def profile_prediction(terms: memmodel.Terms, setup: memmodel.Setup, batch: int) -> float:
    """AutoBatch's profile: weights, gradients, the AMP casts and the activations of batch, reserved; no loss."""
    t = terms.at(setup.imgsz)
    state = terms.params * (memmodel.BYTES_WEIGHTS + memmodel.BYTES_GRADS + memmodel.BYTES_AMP_CAST) / memmodel.MIB
    return (state + t.train_act_fixed_mib + t.train_act_per_image_mib * batch) * memmodel.ALLOCATOR_STEADY


def group_of(point: dict) -> str:
    group = f"gpu_mem {point['phase']}"
    return f"{group} (dense)" if point.get("dense") else group


def rows_for(point: dict) -> list[Row]:
    """What the model (and AutoBatch, where the source says) predicts for each measured figure of one point."""
    terms = memmodel.table_terms(point["model"])
    label = f"{point['model']} {point['imgsz']}px"
    if point["kind"] == "gpu_mem":
        setup = setup_of(point, steady=point["phase"] == "steady")
        predicted = memmodel.predict(terms, setup, "train", point["batch"]).reserved_mib
        autobatch = to_mib(point["autobatch_predicted"], "GB") if "autobatch_predicted" in point else None
        return [Row(group_of(point), f"{label} b{point['batch']} {point['gpu']} ep {point.get('epoch', '?')}",
                    to_mib(point["value"], point["unit"]), predicted, autobatch)]
    if point["kind"] == "autobatch_profile":
        setup = setup_of(point, steady=True)
        return [Row("autobatch_profile", f"{label} b{b} {point['gpu']}", to_mib(v, point["unit"]),
                    profile_prediction(terms, setup, int(b))) for b, v in point["profile"].items()]
    return []


def auto_batch_on(point: dict) -> int:
    """The per-GPU batch ``--batch auto`` (planner.auto_batch, no history) chooses for this model and imgsz on an
    idle GPU of the report's size."""
    idle = gpus.GPU(0, point["gpu"], None, point["gpu_total_mib"], DRIVER_MIB, 0)
    per_gpu, _ = planner.auto_batch(memmodel.table_terms(point["model"]), setup_of(point), [idle], FRACTION, None,
                                    history_file=None)
    return per_gpu


def oom_verdicts(points: list[dict]) -> list[tuple[dict, int, float]]:
    """(report, --batch auto's choice, the model's predicted peak at the report's batch) for each oom/ran report."""
    out = []
    for point in points:
        if point["kind"] in ("oom", "ran"):
            terms, setup = memmodel.table_terms(point["model"]), setup_of(point)
            out.append((point, auto_batch_on(point), memmodel.predict(terms, setup, "train", point["batch"]).peak_mib))
    return out


def fmt(error: float | None) -> str:
    return "-" if error is None else f"{error:+.0%}"


def summary(rows: list[Row]) -> dict[str, tuple[int, float, float]]:
    """Per group: (n, median error, worst error by magnitude)."""
    groups: dict[str, list[float]] = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row.error)
    return {g: (len(v), statistics.median(v), max(v, key=abs)) for g, v in groups.items()}


def print_report() -> None:
    points = load_points()
    rows = [row for point in points for row in rows_for(point)]
    order = ["gpu_mem steady", "gpu_mem first-epoch", "gpu_mem steady (dense)", "gpu_mem first-epoch (dense)",
             "autobatch_profile"]
    rows.sort(key=lambda r: order.index(r.group))
    print(f"{'group':<28} {'point':<60} {'measured':>9} {'model':>9} {'error':>6} {'AutoBatch':>9}")
    for r in rows:
        print(f"{r.group:<28} {r.label[:60]:<60} {r.measured_mib:>7.0f}Mi {r.predicted_mib:>7.0f}Mi {fmt(r.error):>6} "
              f"{fmt(r.autobatch_error):>9}")
    print()
    print(f"Summary (error = predicted / measured - 1; steady: allocated x {memmodel.ALLOCATOR_STEADY}, first-epoch: "
          f"the plan's x {memmodel.ALLOCATOR_PEAK})")
    for group, (n, median, worst) in sorted(summary(rows).items(), key=lambda kv: order.index(kv[0])):
        print(f"  {group:<28} n={n:<3} median {median:+.0%}, worst {worst:+.0%}")
    autobatch_rows = [r for r in rows if r.autobatch_error is not None]
    print(f"  AutoBatch's own prediction beside a GPU_mem figure: n={len(autobatch_rows)}"
          + (f", median {statistics.median(r.autobatch_error for r in autobatch_rows):+.0%}" if autobatch_rows else ""))
    print()
    print("OOM / ran reports: the batch that died (or ran); AutoBatch's choice and predicted memory (a batch that died")
    print("needed more than the GPU: AutoBatch's error is at most predicted / GPU - 1); the model's predicted peak at")
    print("that batch; the batch --batch auto would choose there")
    print(f"{'report':<48} {'batch':>9} {'AutoBatch':>9} {'its pred.':>9} {'its err.':>8} {'model':>9} {'GPU':>9} "
          f"{'auto':>5}")
    unsafe = 0
    for point, ours, at_batch in oom_verdicts(points):
        total = point["gpu_total_mib"]
        their, their_err = "-", "-"
        if "autobatch_predicted" in point:
            predicted = to_mib(point["autobatch_predicted"], "GB")
            their = f"{predicted:.0f}Mi"
            if point["kind"] == "oom":
                their_err = f"<={predicted / total - 1:+.0%}"
        verdict = ""
        if point["kind"] == "oom":
            verdict = "safe" if ours < point["batch"] else "WOULD DIE"
            unsafe += ours >= point["batch"]
        label = f"{point['model']} {point['imgsz']}px {point['gpu']}" + (" dense" if point.get("dense") else "")
        print(f"{label[:48]:<48} {point['kind'] + ' ' + str(point['batch']):>9} {point.get('autobatch_batch', '-'):>9} "
              f"{their:>9} {their_err:>8} {at_batch:>7.0f}Mi {total:>7.0f}Mi {ours:>5}  {verdict}")
    n_oom = sum(p["kind"] == "oom" for p in points)
    print(f"\n--batch auto below the batch that died in {n_oom - unsafe} of {n_oom} OOM reports")


if __name__ == "__main__":
    print_report()
