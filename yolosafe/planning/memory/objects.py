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

from dataclasses import replace
from pathlib import Path
from typing import Any

from yolosafe.planning.memory import filestamps, valshapes
from yolosafe.planning.memory import model as memmodel

CACHE = "objects"


def _count(listing: filestamps.Listing) -> dict[str, float]:
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
    stamps = filestamps.listing(label_files, missing_as_empty=True)
    return filestamps.cached(CACHE, stamps, _count, cache_dir) if stamps else {}


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
