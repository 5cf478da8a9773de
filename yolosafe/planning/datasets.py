"""Datasets by name: the team's ``datasets.yaml`` and the built-in synthetic ``shapes`` set.

``shapes`` exists so that ``yolosafe train`` works on a fresh machine with no GPU and no internet: a small,
deterministic detection set (coloured squares, circles and triangles on noise) generated offline on first use into
a cache directory, in Ultralytics' YOLO layout.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from yolosafe.errors import UsageError
from yolosafe.planning import bounded

REGISTRY_ENV = "YOLOSAFE_DATASETS"
CACHE_ENV = "YOLOSAFE_CACHE"
SHAPES = "shapes"
SHAPES_VERSION = 1
SHAPES_CLASSES = ("square", "circle", "triangle")
SHAPES_DEFAULTS = MappingProxyType({"imgsz": 128, "epochs": 3, "batch": 16})
KERNEL_FILE_SYSTEMS = ("/proc", "/sys", "/dev")  # no images there, and listing them may never end
ARCHIVE_SUFFIXES = (".zip", ".tar", ".gz", ".tgz", ".xz", ".bz2", ".txz", ".tbz2")  # Ultralytics unpacks these itself


class DatasetError(UsageError):
    """A dataset name or file that cannot be used; ``str()`` is one line for the user."""


@dataclass(frozen=True)
class Dataset:
    name: str
    yaml_path: Path
    defaults: dict[str, Any] = field(default_factory=dict)  # imgsz / epochs / batch suggested by the registry
    hint: str | None = None  # a name yolosafe does not know: said first if Ultralytics does not know it either


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "yolosafe")


def registry_path(explicit: str | None = None) -> Path | None:
    """``--datasets FILE``, else ``$YOLOSAFE_DATASETS``, else ``./datasets.yaml`` when present."""
    for candidate in (explicit, os.environ.get(REGISTRY_ENV)):
        if candidate:
            path = Path(candidate)
            if not path.is_file():
                try:
                    bounded.check_file(path, "--datasets")  # a FIFO, a device: said as what it is
                except bounded.ReadError as exc:
                    raise DatasetError(str(exc)) from None
                raise DatasetError(f"dataset registry {path} not found")
            return path
    local = Path("datasets.yaml")
    return local if local.is_file() else None


def load_registry(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return {}
    try:
        data = bounded.yaml_file(path, "--datasets") or {}
    except bounded.ReadError as exc:
        raise DatasetError(str(exc)) from None
    entries = data.get("datasets", {}) if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise DatasetError(f"{path}: expected 'datasets:' mapping names to entries with 'path:' or 'builtin:'")
    for name, entry in entries.items():
        if "path" in entry and not isinstance(entry["path"], str):
            raise DatasetError(f"{path}: dataset '{name}': path: {str(entry['path'])[:80]!r} is not a path; give "
                               "the data YAML's path as text")
    return entries


def resolve(name_or_path: str, registry: Path | None = None) -> Dataset:
    """A ``--data`` value to a dataset: a name in the registry, the built-in ``shapes``, or what Ultralytics resolves
    (a data YAML, a classification directory, a name from its own datasets; the input check asks it)."""
    path = Path(name_or_path)
    try:
        bounded.check_file(path, "--data")  # a FIFO would block the input check forever, /dev/zero never end
    except bounded.ReadError as exc:
        raise DatasetError(str(exc)) from None
    if path.is_dir():
        return Dataset(path.name, path.resolve())  # an ImageFolder (classification), or a folder with its data YAML
    if path.is_file():
        if not name_or_path.endswith((".yaml", ".yml", *ARCHIVE_SUFFIXES)):
            raise DatasetError(f"--data {name_or_path}: a file, but not a data YAML (.yaml) with train:, val:, names:")
        check_data_yaml(path)
        return Dataset(path.stem, path.resolve())
    if os.sep in name_or_path or "://" in name_or_path:
        if "://" in name_or_path:
            return Dataset(path.stem, path)  # a URL: Ultralytics fetches it when --download asks
        raise DatasetError(f"--data {name_or_path}: file not found")
    entries = load_registry(registry)
    entry = entries.get(name_or_path)
    if entry is None and name_or_path == SHAPES:
        entry = {"builtin": SHAPES, **SHAPES_DEFAULTS}
    if entry is None:  # e.g. coco8.yaml, or a folder in Ultralytics' datasets dir: the input check decides
        known = sorted({*entries, SHAPES})
        where = f" in {registry}" if registry else " (no datasets.yaml here)"
        hint = f"--data {name_or_path}: unknown dataset{where}; known: {', '.join(known)}"
        return Dataset(path.stem, path, hint=hint)
    defaults = {k: entry[k] for k in ("imgsz", "epochs", "batch") if k in entry}
    if entry.get("builtin") == SHAPES:
        return Dataset(name_or_path, ensure_shapes(), defaults)
    if "path" not in entry:
        raise DatasetError(f"{registry}: dataset '{name_or_path}' has neither 'path:' nor 'builtin: shapes'")
    path = Path(entry["path"])
    if not path.is_absolute() and registry is not None:
        path = registry.parent / path
    if not path.exists():
        raise DatasetError(f"{registry}: dataset '{name_or_path}' points to {path}, which does not exist")
    return Dataset(name_or_path, path.resolve(), defaults)


def check_data_yaml(path: Path) -> None:
    """A data YAML read within bounds (no billion laughs for Ultralytics to expand), whose image folders are not in
    the kernel's file systems (``path: /`` with ``train: proc`` would list ``/proc`` without end)."""
    if not str(path).endswith((".yaml", ".yml")):
        return  # an archive: Ultralytics unpacks it
    try:
        data = bounded.yaml_file(path, "--data")
    except bounded.ReadError as exc:
        raise DatasetError(str(exc)) from None
    if not isinstance(data, dict):
        return  # Ultralytics names what is missing
    root = data.get("path")
    base = Path(root) if isinstance(root, str) and root else path.parent
    base = base if base.is_absolute() else path.parent / base
    for key in ("train", "val", "test"):
        for split in data.get(key) if isinstance(data.get(key), list) else [data.get(key)]:
            if not isinstance(split, str):
                continue
            where = os.path.realpath(base / split)
            if any(where == top or where.startswith(f"{top}/") for top in KERNEL_FILE_SYSTEMS):
                raise DatasetError(f"--data {path}: {key}: {where} is in the kernel's file system {where[:5]}, not "
                                   "a folder of images")


def ensure_shapes(root: Path | None = None, train: int = 32, val: int = 16, size: int = 128) -> Path:
    """Generate ``shapes`` once (atomically, so parallel runs can race safely) and return its data YAML."""
    target = (root or cache_dir() / "datasets") / f"shapes-v{SHAPES_VERSION}"
    data_yaml = target / "data.yaml"
    if data_yaml.is_file():
        return data_yaml
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".shapes-", dir=target.parent))
    try:
        _write_shapes(staging, train, val, size)
        (staging / "data.yaml").write_text(
            yaml.safe_dump({"path": str(target), "train": "images/train", "val": "images/val",
                            "names": dict(enumerate(SHAPES_CLASSES))}, sort_keys=False)
        )
        try:
            staging.rename(target)
        except OSError:  # another process won the race; its copy is identical
            if not data_yaml.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return data_yaml


def _write_shapes(root: Path, train: int, val: int, size: int) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(SHAPES_VERSION)
    for split, count in (("train", train), ("val", val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(count):
            noise = rng.integers(0, 64, (size, size, 3), dtype=np.uint8)
            image = Image.fromarray(noise)
            draw = ImageDraw.Draw(image)
            lines = []
            for _ in range(int(rng.integers(1, 4))):
                cls = int(rng.integers(len(SHAPES_CLASSES)))
                w = int(rng.integers(size // 6, size // 3))
                x0, y0 = (int(v) for v in rng.integers(0, size - w, 2))
                box = (x0, y0, x0 + w, y0 + w)
                colour = tuple(int(c) for c in rng.integers(96, 256, 3))
                if cls == 0:
                    draw.rectangle(box, fill=colour)
                elif cls == 1:
                    draw.ellipse(box, fill=colour)
                else:
                    draw.polygon([(x0 + w / 2, y0), (x0, y0 + w), (x0 + w, y0 + w)], fill=colour)
                lines.append(f"{cls} {(x0 + w / 2) / size:.6f} {(y0 + w / 2) / size:.6f} {w / size:.6f} {w / size:.6f}")
            image.save(root / "images" / split / f"{i:04d}.png")
            (root / "labels" / split / f"{i:04d}.txt").write_text("\n".join(lines) + "\n")
