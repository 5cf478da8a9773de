"""The shipped memory table (``data/memtable.json``, computed by ``tools/make_memtable.py`` with the fake-tensor
pass of :mod:`yolosafe.training.fakepass`) and its entries as :class:`~yolosafe.planning.memory.model.Terms`."""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path

from yolosafe.planning.memory.model import Terms, UnknownModel
from yolosafe.rundir.childrecords import FakePassResult

MEASURED = ("train_act_fixed_mib", "train_act_per_image_mib", "val_act_fixed_mib", "val_act_per_image_mib",
            "loss_per_image_mib", "loss_per_object_mib")


def terms_from_entry(name: str, entry: FakePassResult, source: str) -> Terms:
    """A table or fake-pass entry. An entry without a loss term (a loss the CPU pass could not run) is refused:
    another task's loss is never borrowed."""
    if entry.loss_per_image_mib is None or entry.loss_per_object_mib is None:
        raise UnknownModel(f"{name}: the fake pass could not measure its loss ({entry.loss_error or 'no error'})")
    if entry.params is None or any(getattr(entry, k) is None for k in MEASURED):
        raise UnknownModel(f"{name}: the fake pass measured its loss alone, not the network")
    task = entry.task or "detect"
    loss_source = entry.loss_source or f"{source}: {task} loss measured on CPU"
    return Terms(name=name, params=int(entry.params), imgsz=int(entry.imgsz),
                 **{k: float(getattr(entry, k)) for k in MEASURED},
                 source=source, task=task, head_outputs=int(entry.head_outputs or 84), loss_source=loss_source,
                 loss_curve=tuple((float(n), float(mib)) for n, mib in entry.loss_curve or ()))


@functools.cache
def load_table() -> dict[str, Terms]:
    """The shipped table, read once."""
    data = json.loads(resources.files("yolosafe").joinpath("data/memtable.json").read_text())
    ordered = sorted(data["models"], key=lambda n: (n.rstrip("nsmlx"), "nsmlx".find(n[-1])))  # family, then size
    return {name: terms_from_entry(name, FakePassResult.from_dict(data["models"][name], f"memtable.json: {name}"),
                                   "table") for name in ordered}


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
