"""The shipped memory table (``data/memtable.json``, computed by ``tools/make_memtable.py`` with the fake-tensor
pass of :mod:`yolosafe.training.fakepass`) and its entries as :class:`~yolosafe.planning.memory.model.Terms`."""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

from yolosafe.planning.memory.model import Terms, UnknownModel


def terms_from_entry(name: str, entry: dict[str, Any], source: str) -> Terms:
    """A table or fake-pass entry. An entry without a loss term (a loss the CPU pass could not run) is refused:
    another task's loss is never borrowed."""
    missing = [k for k in ("loss_per_image_mib", "loss_per_object_mib") if k not in entry]
    if missing:
        raise UnknownModel(f"{name}: the fake pass could not measure its loss ({entry.get('loss_error', 'no error')})")
    task = str(entry.get("task", "detect"))
    loss_source = entry.get("loss_source") or f"{source}: {task} loss measured on CPU"
    return Terms(name=name, params=int(entry["params"]), imgsz=int(entry["imgsz"]),
                 **{k: float(entry[k]) for k in ("train_act_fixed_mib", "train_act_per_image_mib",
                                                  "val_act_fixed_mib", "val_act_per_image_mib",
                                                  "loss_per_image_mib", "loss_per_object_mib")},
                 source=source, task=task, head_outputs=int(entry.get("head_outputs", 84)), loss_source=loss_source,
                 loss_curve=tuple((float(n), float(mib)) for n, mib in entry.get("loss_curve", ())))


@functools.cache
def load_table() -> dict[str, Terms]:
    """The shipped table, read once."""
    data = json.loads(resources.files("yolosafe").joinpath("data/memtable.json").read_text())
    ordered = sorted(data["models"], key=lambda n: (n.rstrip("nsmlx"), "nsmlx".find(n[-1])))  # family, then size
    return {name: terms_from_entry(name, data["models"][name], "table") for name in ordered}


def model_key(model: str) -> str:
    """``yolov8n.pt``, ``path/to/yolo11s.yaml`` -> ``yolov8n``, ``yolo11s`` (the table's names)."""
    return Path(model).stem.lower()


def table_terms(model: str) -> Terms:
    table = load_table()
    key = model_key(model)
    if key not in table:
        raise UnknownModel(f"{model}: not in yolosafe's memory table ({', '.join(sorted(table))}); "
                           "give its YAML (--model my.yaml) for a fake-tensor pass")
    return table[key]
