"""Objects per image from the dataset's own labels: the busiest image decides the loss's assigner tensors.

Ultralytics pads every image's targets to the busiest image of its batch, and the task-aligned assigner builds
``batch × most objects × anchors`` tensors, so a crowded dataset needs far more memory than a sparse one at the same
batch. This module counts the label lines of every image of the train and val splits (YOLO format: one object per line),
over the label files Ultralytics pairs with the images it lists (the input check asks it:
:mod:`yolosafe.training.inputcheck`), and keeps the largest and the 99th percentile per split. The
counts are cached in the cache directory under a fingerprint of the label files' names, sizes and mtimes, so a
COCO-sized set is read once and then answered from its file listing.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from yolosafe.planning import datasets
from yolosafe.planning.memory import model as memmodel
from yolosafe.planning.memory import valshapes

CACHE = "objects"


def _listing(label_files: list[str]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every image's label file, a missing one (a background image) as empty: what the
    cache's fingerprint covers."""
    found = []
    for path in label_files:
        try:
            stat = os.stat(path)
            found.append((str(path), stat.st_size, stat.st_mtime_ns))
        except OSError:
            found.append((str(path), 0, 0))
    return sorted(found)


def _count(listing: list[tuple[str, int, int]]) -> dict[str, float]:
    counts = []
    for path, size, _ in listing:
        if size == 0:
            counts.append(0)
            continue
        with open(path, "rb") as handle:
            counts.append(sum(1 for line in handle if line.strip()))
    counts.sort()
    if not counts:
        return {}
    p99 = counts[min(len(counts) - 1, int(0.99 * len(counts)))]
    return {"images": len(counts), "max": counts[-1], "p99": p99, "mean": round(sum(counts) / len(counts), 2)}


def label_counts(label_files: list[str], cache_dir: Path | None = None) -> dict[str, float]:
    """``{"images", "max", "p99", "mean"}`` objects per image over these label files (one per image of a split, as
    Ultralytics pairs them); {} without any. Cached under a fingerprint of the files' names, sizes and mtimes."""
    listing = _listing(label_files)
    if not listing:
        return {}
    fingerprint = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:24]
    cache = (cache_dir or datasets.cache_dir()) / CACHE / f"{fingerprint}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    counts = _count(listing)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(counts))
    return counts


def apply(setup: memmodel.Setup, figures: dict[str, Any] | None) -> memmodel.Setup:
    """The setup with the dataset's busiest train and val images (the largest count: some batch holds it) and its
    validation images' largest rect batch; ``figures`` is what the input check measured on the images Ultralytics
    lists (``{"objects": {"train": ..., "val": ...}, "val_ratios": [...]}``), None or {} when unknown."""
    figures = figures or {}
    ratios = figures.get("val_ratios") or []
    if ratios:
        setup = replace(setup, val_area=valshapes.largest_area(ratios, setup.imgsz),
                        val_area_source=f"the validation images' shapes: {len(ratios)} aspect ratios, "
                                        f"h/w {min(ratios):g}-{max(ratios):g}")
    counts = figures.get("objects") or {}
    train = counts.get("train")
    if not train:
        return setup
    val = counts.get("val") or train
    source = (f"the dataset's labels: train {train['images']} images, max {train['max']}, p99 {train['p99']}; "
              f"val {val['images']} images, max {val['max']}, p99 {val['p99']}")
    return replace(setup, objects_per_image=train["max"], val_objects_per_image=val["max"], objects_source=source)
