"""Tiny datasets of every task, in the layouts users bring (a Roboflow export, a ``path:`` root, image lists, an
ImageFolder), written once per test session: a handful of 32-pixel images each, enough for Ultralytics to train an
epoch on the CPU in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

SIZE = 32
TRAIN, VAL = 4, 2
LABELS = {  # one object per image, in each task's YOLO label format
    "detect": "0 0.5 0.5 0.4 0.4",
    "segment": "0 0.3 0.3 0.7 0.3 0.7 0.7 0.3 0.7",
    "pose": "0 0.5 0.5 0.4 0.4 0.4 0.4 2 0.6 0.6 2",
    "obb": "0 0.3 0.3 0.7 0.3 0.7 0.7 0.3 0.7",
}
POSE_KEYS = {"kpt_shape": [2, 3], "flip_idx": [1, 0]}


def image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    pixels[8:24, 8:24] = 255
    Image.fromarray(pixels).save(path)


def split(images: Path, labels: Path | None, count: int, task: str, seed: int = 0) -> list[Path]:
    written = []
    for i in range(count):
        image(images / f"im{seed}{i}.png", seed * 100 + i)
        if labels is not None:
            labels.mkdir(parents=True, exist_ok=True)
            (labels / f"im{seed}{i}.png").with_suffix(".txt").write_text(LABELS[task] + "\n")
        written.append(images / f"im{seed}{i}.png")
    return written


def data_yaml(path: Path, body: dict, task: str) -> Path:
    body = {**body, **(POSE_KEYS if task == "pose" else {})}
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def roboflow(root: Path, task: str) -> Path:
    """A Roboflow export: ``train/images``, ``valid/images`` beside ``data.yaml``, paths ``../train/images``, no
    ``path:``, names as a list."""
    split(root / "train" / "images", root / "train" / "labels", TRAIN, task, 1)
    split(root / "valid" / "images", root / "valid" / "labels", VAL, task, 2)
    return data_yaml(root / "data.yaml", {"train": "../train/images", "val": "../valid/images", "nc": 1,
                                          "names": ["thing"]}, task)


def rooted(root: Path, task: str, path_value: str | None = None) -> Path:
    """``path:``-rooted, names as a dict; ``path_value`` as written in the YAML (default: the absolute root)."""
    split(root / "images" / "train", root / "labels" / "train", TRAIN, task, 3)
    split(root / "images" / "val", root / "labels" / "val", VAL, task, 4)
    return data_yaml(root / "data.yaml", {"path": path_value or str(root), "train": "images/train",
                                          "val": "images/val", "names": {0: "thing"}}, task)


def listed(root: Path, task: str) -> Path:
    """Image lists in ``.txt`` files (``./`` relative to the list), names as a dict."""
    train = split(root / "images" / "train", root / "labels" / "train", TRAIN, task, 5)
    val = split(root / "images" / "val", root / "labels" / "val", VAL, task, 6)
    (root / "train.txt").write_text("".join(f"./{p.relative_to(root)}\n" for p in train))
    (root / "val.txt").write_text("".join(f"./{p.relative_to(root)}\n" for p in val))
    return data_yaml(root / "data.yaml", {"path": str(root), "train": "train.txt", "val": "val.txt",
                                          "names": {0: "thing"}}, task)


def imagefolder(root: Path) -> Path:
    """A classification ImageFolder: ``train/<class>/``, ``val/<class>/``."""
    for name, count, seed in (("train", TRAIN, 7), ("val", VAL, 8)):
        for cls in ("cat", "dog"):
            split(root / name / cls, None, count, "detect", seed + len(cls))
    return root
