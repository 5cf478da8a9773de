"""The memory model against every public point of tests/data/memory_points.yaml (not a test: a report).

    python benchmarks/memory_model.py

Prints, for the public set: ``gpu_mem_gib`` against the public steady GPU_mem figures (median and worst error; dense
scenes and first-epoch figures apart), the ran / died reports against ``required_mib`` (every batch that ran should
fit the GPU, every batch that died should not), and the batch ``--batch auto`` chooses on each report's GPU as a
share of the largest batch known to run there. An outcome is checked with the allocator of the Ultralytics version
that produced it: the reserved / allocated ratio of that era's own public GPU_mem figures (never of the outcomes).
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from yolosafe.planning import options
from yolosafe.planning.memory import model as memmodel
from yolosafe.planning.memory import table as memtable

POINTS = Path(__file__).resolve().parents[1] / "tests" / "data" / "memory_points.yaml"
FRACTION = options.DEFAULTS["memory_fraction"]  # --memory-fraction's default
DRIVER_MIB = 400.0  # an idle GPU's used memory (driver, ECC): its free memory is total minus this
ERAS = (("8.0 before 8.0.35", (0, 0, 0), (8, 0, 35)), ("8.0.35 to 8.2", (8, 0, 35), (8, 3, 0)),
        ("8.3 and later", (8, 3, 0), (99, 0, 0)))  # cache emptied per epoch from 8.0.35; 8.3: torch 2.4+ allocator
LEAN_ASSIGNER = (8, 4, 0)  # the boolean candidate masks: in the supported 8.4.190; every public point is older
OLD_ASSIGNER_BYTES_PER_PAIR = 32


@dataclass(frozen=True)
class Row:
    group: str
    label: str
    measured_mib: float
    predicted_mib: float

    @property
    def error(self) -> float:
        return self.predicted_mib / self.measured_mib - 1


def to_mib(value: float, unit: str) -> float:
    return value * (1e9 if unit == "GB" else 2**30) / memmodel.MIB


def load_points() -> list[dict]:
    return yaml.safe_load(POINTS.read_text())["points"]


def era_of(point: dict) -> str:
    version = tuple(int(x) for x in str(point.get("ultralytics", "8.0.0")).split(".")[:3])
    return next(name for name, low, high in ERAS if low <= version < high)


def setup_of(point: dict) -> memmodel.Setup:
    objects = point.get("objects_max", memmodel.OBJECTS_PER_IMAGE)
    return memmodel.Setup(imgsz=point["imgsz"], amp=point.get("amp", True), optimizer=point.get("optimizer", "auto"),
                          objects_per_image=objects, expandable_segments=False)  # Ultralytics leaves it off


def terms_of(point: dict) -> memmodel.Terms:
    """The model's terms as the report's Ultralytics ran them. Where the report states its objects per image, the
    assigner of that version counts too: before the boolean candidate masks of the supported Ultralytics,
    select_candidates_in_gts held two (batch x objects, anchors, 2) float tensors and their (.., 4) concatenation,
    32 bytes per (object, anchor) pair (ultralytics/utils/tal.py); elsewhere the objects are assumed and sparse."""
    terms = memtable.table_terms(point["model"])
    version = tuple(int(x) for x in str(point.get("ultralytics", "8.0.0")).split(".")[:3])
    if "objects_max" not in point or version >= LEAN_ASSIGNER:
        return terms
    extra = OLD_ASSIGNER_BYTES_PER_PAIR * terms.anchors / memmodel.MIB  # per object per image, at the table's imgsz
    return replace(terms, extra_per_object_mib=extra,
                   loss_source=f"{terms.loss_source}; + {extra:.3f} MiB per object: the assigner of Ultralytics "
                               f"{point.get('ultralytics')}")


def allocated(point: dict, phase: str = "train", batch: int | None = None) -> float:
    terms = terms_of(point)
    return memmodel.predict(terms, setup_of(point), phase, batch or point["batch"]).allocated_mib


def group_of(point: dict) -> str:
    group = f"gpu_mem {point['phase']}"
    return f"{group} (dense)" if point.get("dense") else group


def gpu_mem_rows(points: list[dict]) -> list[Row]:
    rows = []
    for p in points:
        if p["kind"] == "gpu_mem":
            predicted = memmodel.predict(terms_of(p), setup_of(p), "train", p["batch"])
            rows.append(Row(group_of(p), f"{p['model']} {p['imgsz']}px b{p['batch']} {p['gpu']} ep {p['epoch']} "
                            f"{p.get('ultralytics', '?')}", to_mib(p["value"], p["unit"]), predicted.gpu_mem_mib))
    return rows


def held_out_steady(points: list[dict]) -> list[float]:
    """Each steady figure's error when the reserved ratio is the median of the other steady figures only."""
    steady = [p for p in points if p["kind"] == "gpu_mem" and p["phase"] == "steady" and not p.get("dense")]
    ratios = [to_mib(p["value"], p["unit"]) / allocated(p) for p in steady]
    return [statistics.median(ratios[:i] + ratios[i + 1:]) / r - 1 for i, r in enumerate(ratios)]


def era_ratios(points: list[dict], leave_out: dict | None = None) -> dict[str, float]:
    """Per Ultralytics era: the median of its public GPU_mem figures over this model's allocation (not dense),
    without ``leave_out`` (the outcome being checked, when it is one of the figures)."""
    ratios: dict[str, list[float]] = {}
    for p in points:
        if p["kind"] == "gpu_mem" and not p.get("dense") and p is not leave_out:
            ratios.setdefault(era_of(p), []).append(to_mib(p["value"], p["unit"]) / allocated(p))
    return {era: statistics.median(v) for era, v in ratios.items()}


def era_setup(point: dict, ratios: dict[str, float]) -> memmodel.Setup:
    """The report's setup with its era's allocator: before 8.3 everything its allocator held beyond the allocation
    counts as not returnable (the era's median ratio); from 8.3 on, the supported model's terms."""
    era = era_of(point)
    if era == ERAS[-1][0]:
        return setup_of(point)
    return replace(setup_of(point), reserved_ratio=round(ratios[era], 3), fragmentation=round(ratios[era] - 1, 3),
                   era=f"Ultralytics {era}")


def required(point: dict, ratios: dict[str, float], batch: int | None = None) -> float:
    """``required_mib`` of the report's batch: the larger of training and Ultralytics' validation (2x the batch)."""
    terms, setup, b = terms_of(point), era_setup(point, ratios), batch or point["batch"]
    return max(memmodel.predict(terms, setup, "train", b).required_mib,
               memmodel.predict(terms, setup, "val", 2 * b).required_mib)


def auto_batch_on(point: dict, ratios: dict[str, float]) -> int:
    """The per-GPU batch ``--batch auto`` chooses (memmodel.largest_batch, as planner.auto_batch calls it, at the
    default --memory-fraction) on an idle GPU of the report's size, under the report's own conditions: its
    Ultralytics era's allocator and Ultralytics' validation at 2x the batch."""
    free = point["gpu_total_mib"] - DRIVER_MIB
    return memmodel.largest_batch(terms_of(point), era_setup(point, ratios), FRACTION * free,
                                  lambda b: 2 * b)


def outcomes(points: list[dict]) -> list[dict]:
    """Per ran / died report: required_mib under its era, fits or not, and --batch auto's choice."""
    ratios, rows = era_ratios(points), []
    for p in points:
        if p["kind"] not in ("oom", "ran", "gpu_mem") or "gpu_total_mib" not in p:
            continue
        own = era_ratios(points, leave_out=p) if p["kind"] == "gpu_mem" else ratios  # its figure left out
        p = {**p, "kind": "ran"} if p["kind"] == "gpu_mem" else p  # a GPU_mem figure: a run that ran
        need = required(p, own)
        fits = need <= p["gpu_total_mib"]
        rows.append({"point": p, "required_mib": need, "fits": fits, "right": fits == (p["kind"] == "ran"),
                     "auto": auto_batch_on(p, own), "era": era_of(p)})
    return rows


def auto_shares(rows: list[dict]) -> list[tuple[str, int, int, int | None]]:
    """Per (model, imgsz, GPU, density) with a ran report: (label, --batch auto, the largest batch that ran, the
    smallest that died)."""
    keyed: dict[tuple, dict] = {}
    for r in rows:
        p = r["point"]
        key = (p["model"], p["imgsz"], p["gpu"], bool(p.get("dense")))
        entry = keyed.setdefault(key, {"auto": r["auto"], "ran": 0, "died": None})
        if p["kind"] == "ran":
            entry["ran"] = max(entry["ran"], p["batch"])
        else:
            entry["died"] = min(entry["died"] or p["batch"], p["batch"])
    return [(f"{k[0]} {k[1]}px {k[2]}{' dense' if k[3] else ''}", v["auto"], v["ran"], v["died"])
            for k, v in keyed.items() if v["ran"]]


def summary(rows: list[Row]) -> dict[str, tuple[int, float, float]]:
    """Per group: (n, median error, worst error by magnitude)."""
    groups: dict[str, list[float]] = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row.error)
    return {g: (len(v), statistics.median(v), max(v, key=abs)) for g, v in groups.items()}


def headline(points: list[dict]) -> dict[str, float]:
    """The figures the test guards."""
    steady = summary(gpu_mem_rows(points))["gpu_mem steady"]
    rows = outcomes(points)
    shares = [auto / ran for _, auto, ran, _ in auto_shares(rows)]
    held = held_out_steady(points)
    return {"steady_n": steady[0], "steady_median": steady[1], "steady_worst": steady[2],
            "held_out_median": statistics.median(held), "held_out_worst": max(held, key=abs),
            "ran": sum(r["point"]["kind"] == "ran" for r in rows),
            "ran_fits": sum(r["point"]["kind"] == "ran" and r["fits"] for r in rows),
            "died": sum(r["point"]["kind"] == "oom" for r in rows),
            "died_does_not_fit": sum(r["point"]["kind"] == "oom" and not r["fits"] for r in rows),
            "auto_share_min": min(shares), "auto_share_median": statistics.median(shares),
            "auto_below_died": sum(d is None or a < d for _, a, _, d in auto_shares(rows)),
            "auto_checked": len(auto_shares(rows))}


def print_report() -> None:
    points = load_points()
    rows = sorted(gpu_mem_rows(points), key=lambda r: r.group)
    print(f"{'group':<28} {'point':<66} {'measured':>9} {'gpu_mem':>9} {'error':>6}")
    for r in rows:
        print(f"{r.group:<28} {r.label[:66]:<66} {r.measured_mib:>7.0f}Mi {r.predicted_mib:>7.0f}Mi {r.error:>+6.0%}")
    print(f"\ngpu_mem_gib = allocated x {memmodel.ALLOCATOR_STEADY} (error = predicted / measured - 1)")
    for group, (n, median, worst) in sorted(summary(rows).items()):
        print(f"  {group:<28} n={n:<3} median {median:+.0%}, worst {worst:+.0%}")
    ratios = era_ratios(points)
    print("\nAllocator by Ultralytics era (median public GPU_mem / allocation): "
          + ", ".join(f"{era} x{r:.2f}" for era, r in ratios.items()))
    print(f"\n{'report':<44} {'era':<18} {'outcome':>9} {'required':>9} {'GPU':>9} {'verdict':>8} {'auto':>5}")
    results = outcomes(points)
    for r in results:
        p = r["point"]
        label = f"{p['model']} {p['imgsz']}px {p['gpu']}" + (" dense" if p.get("dense") else "")
        print(f"{label[:44]:<44} {r['era']:<18} {p['kind'] + ' ' + str(p['batch']):>9} {r['required_mib']:>7.0f}Mi "
              f"{p['gpu_total_mib']:>7.0f}Mi {'fits' if r['fits'] else 'no fit':>8} {r['auto']:>5}"
              f"{'' if r['right'] else '  WRONG'}")
    h = headline(points)
    print(f"\nran-fits {h['ran_fits']} of {h['ran']}; died-does-not-fit {h['died_does_not_fit']} of {h['died']}")
    print(f"--batch auto (--memory-fraction {FRACTION}) on each ran report's GPU, under the report's conditions:")
    for label, auto, ran, died in auto_shares(results):
        print(f"  {label:<48} auto {auto:>4} = {auto / ran:>5.0%} of {ran} that ran"
              + (f"; below {died} that died" if died else ""))
    print(f"  share of the largest batch known to run: min {h['auto_share_min']:.0%}, "
          f"median {h['auto_share_median']:.0%}; below the batch that died in {h['auto_below_died']} of "
          f"{h['auto_checked']}")
    print(f"gpu_mem_gib on the public steady figures: n={h['steady_n']}, median {h['steady_median']:+.0%}, "
          f"worst {h['steady_worst']:+.0%}; each left out of the ratio's fit: median {h['held_out_median']:+.0%}, "
          f"worst {h['held_out_worst']:+.0%}")


if __name__ == "__main__":
    print_report()
