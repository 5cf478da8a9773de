"""Objects per image from the dataset's own labels: the busiest image decides the loss's assigner tensors.

Ultralytics pads every image's targets to the busiest image of its batch, and the task-aligned assigner builds
``batch × most objects × anchors`` tensors, so a crowded dataset needs far more memory than a sparse one at the same
batch. This module counts the label lines of every image of the train and val splits of a data YAML (YOLO format:
one object per line, ``labels/`` beside ``images/``), and keeps the largest and the 99th percentile per split. The
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

import yaml

from yolosafe.planning import datasets
from yolosafe.planning.memory import model as memmodel
from yolosafe.planning.memory import valshapes

CACHE = "objects"
SPLITS = ("train", "val")


def _label_dirs(data_yaml: Path, split: str) -> list[Path]:
    """The ``labels`` directories of a split, found as Ultralytics finds them (``/images/`` -> ``/labels/``)."""
    data = yaml.safe_load(data_yaml.read_text()) or {}
    root = Path(str(data.get("path") or data_yaml.parent))
    if not root.is_absolute():
        root = data_yaml.parent / root
    entries = data.get(split)
    dirs = []
    for entry in entries if isinstance(entries, list) else [entries] if entries else []:
        path = root / str(entry)
        if path.is_dir():
            images, labels_part = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
            labels = Path(labels_part.join(f"{path}{os.sep}".rsplit(images, 1)))
            dirs.append(labels if labels.is_dir() else path)
    return dirs


def _listing(dirs: list[Path]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every label file: what the cache's fingerprint covers."""
    found = []
    for top in dirs:
        for folder, _, names in os.walk(top):
            for name in names:
                if name.endswith(".txt"):
                    path = os.path.join(folder, name)
                    stat = os.stat(path)
                    found.append((path, stat.st_size, stat.st_mtime_ns))
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


def split_counts(data_yaml: Path, split: str, cache_dir: Path | None = None) -> dict[str, float]:
    """``{"images", "max", "p99", "mean"}`` objects per image of one split; {} without labels. Cached."""
    listing = _listing(_label_dirs(data_yaml, split))
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


def dataset_counts(data: Any, cache_dir: Path | None = None) -> dict[str, dict[str, float]]:
    """Per split, the counts of a data YAML path; {} when there is no YAML or no label on disk."""
    path = Path(str(data)) if data else None
    if path is None or not path.is_file():
        return {}
    try:
        return {split: c for split in SPLITS if (c := split_counts(path, split, cache_dir))}
    except (OSError, yaml.YAMLError, AttributeError, TypeError):
        return {}


def apply(setup: memmodel.Setup, data: Any, cache_dir: Path | None = None) -> memmodel.Setup:
    """The setup with the dataset's busiest train and val images (the largest count: some batch holds it) and its
    validation images' largest rect batch."""
    ratios = valshapes.val_ratios(data, cache_dir)
    if ratios:
        setup = replace(setup, val_area=valshapes.largest_area(ratios, setup.imgsz),
                        val_area_source=f"the validation images' shapes: {len(ratios)} aspect ratios, "
                                        f"h/w {min(ratios):g}-{max(ratios):g}")
    counts = dataset_counts(data, cache_dir)
    train = counts.get("train")
    if not train:
        return setup
    val = counts.get("val") or train
    source = (f"the dataset's labels: train {train['images']} images, max {train['max']}, p99 {train['p99']}; "
              f"val {val['images']} images, max {val['max']}, p99 {val['p99']}")
    return replace(setup, objects_per_image=train["max"], val_objects_per_image=val["max"], objects_source=source)
