"""What planning asks its two short-lived children and what they answer, as the run spec is for the ranks: typed
records, written and read here only.

- the input check (``python -m yolosafe.training.inputcheck REQUEST.json RESULT.json``): a :class:`CheckRequest` in,
  a :class:`CheckAnswer` (Ultralytics accepts the training) or a :class:`CheckRefusal` (one line why not) out; the
  verdict cache (:mod:`yolosafe.planning.checkcache`) keeps the same :class:`CheckAnswer`;
- the fake-tensor memory pass (``python -m yolosafe.training.fakepass MODEL.yaml [--imgsz N] [--loss-only]``): a
  :class:`FakePassRequest` as its command line, a :class:`FakePassResult` as the last line of its output; the same
  record is an entry of the shipped memory table (``data/memtable.json``) and of the fake pass's cache.

The children are started by :mod:`yolosafe.supervisor.children`; planning receives what they answer. A damaged file
or line is one :class:`~yolosafe.rundir.typed.RecordError` line, never a trusted guess.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from yolosafe.rundir import files
from yolosafe.rundir.typed import RecordError, exact_fields, read_json


@dataclass(frozen=True)
class CheckRequest:
    """What the input check asks Ultralytics: the model, the data, the train arguments as the worker passes them,
    the runs' folder and name, whether to download what is missing."""

    model: str
    data: str | None
    task: str | None  # the task asked for (task=), checked against the model's own
    overrides: dict[str, Any]  # the train arguments (get_cfg's overrides)
    project: str | None  # None: the folder Ultralytics gives the task
    name: str
    download: bool = False
    dry_run: bool = False  # a dry run fetches nothing; data not here is a note
    user_code: dict[str, Any] | None = None  # the user's callbacks and trainer (yolosafe.planning.usercode)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, what: str = "the input check's request") -> CheckRequest:
        return cls(**exact_fields(cls, data, what))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict()), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> CheckRequest:
        return cls.from_dict(read_json(path, "the input check's request"), f"the input check's request {path}")


@dataclass(frozen=True)
class CheckAnswer:
    """Ultralytics accepts the training: the model's task, the folder it puts the task's runs in, the training
    images and the dataset's figures it listed, notes for the user, and what the answer was read from."""

    task: str
    project: str  # the runs' folder, absolute
    project_in_cwd: str | None  # that folder relative to the working directory, when Ultralytics derived it from there
    project_is_asked: bool  # the absolute project= asked for is the folder
    train_images: int | None  # None: not listed (classification, or data not here in a dry run)
    name: str | None = None  # the run's name as Ultralytics makes it (name=model: the model's stem)
    dataset: dict[str, Any] = field(default_factory=dict)  # objects per image, validation shapes (memory model)
    notes: list[str] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)  # the files and folders the answer depends on (checkcache)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, what: str = "the input check's answer") -> CheckAnswer:
        values = exact_fields(cls, data, what)
        if not all(isinstance(x, str) for x in [*values.get("notes", ()), *values.get("reads", ())]):
            raise RecordError(f"{what}: damaged (notes and reads are lists of text)")
        return cls(**values)


@dataclass(frozen=True)
class CheckRefusal:
    """Ultralytics (or the check) refuses the training; ``error`` is the one line the user sees."""

    error: str


CheckResult = CheckAnswer | CheckRefusal


def check_result_dict(result: CheckResult) -> dict[str, Any]:
    return asdict(result)


def check_result_of(data: Any, what: str = "the input check's result") -> CheckResult:
    """A refusal (``{"error": LINE}``) or an answer."""
    if isinstance(data, dict) and "error" in data:
        return CheckRefusal(**exact_fields(CheckRefusal, data, what))
    return CheckAnswer.from_dict(data, what)


def save_check_result(path: Path, result: CheckResult) -> None:
    path.write_text(json.dumps(check_result_dict(result)), encoding="utf-8")


def load_check_result(path: Path) -> CheckResult:
    return check_result_of(read_json(path, "the input check's result"), f"the input check's result {path}")


@dataclass(frozen=True)
class FakePassRequest:
    """The model (a YAML, or a name Ultralytics builds) and the image size the fake pass measures at; ``loss_only``:
    the loss terms alone (``tools/make_memtable.py --loss-only``)."""

    model: str
    imgsz: int = 640
    loss_only: bool = False

    def args(self) -> list[str]:
        """The child's command line after ``python -m yolosafe.training.fakepass``."""
        return [self.model, "--imgsz", str(self.imgsz), *(["--loss-only"] if self.loss_only else [])]

    @classmethod
    def from_args(cls, argv: list[str] | None, description: str = "") -> FakePassRequest:
        parser = argparse.ArgumentParser(prog="python -m yolosafe.training.fakepass", description=description)
        parser.add_argument("model")
        parser.add_argument("--imgsz", type=int, default=640)
        parser.add_argument("--loss-only", action="store_true", help="only the loss terms (the network's are kept)")
        given = parser.parse_args(argv)
        return cls(given.model, given.imgsz, given.loss_only)


@dataclass(frozen=True)
class FakePassResult:
    """A model's memory terms (MiB) as the fake pass measured them at ``imgsz``: the network's activations (fixed and
    per image, training and validation), its parameters, the task's loss (per image, per object, its curve over the
    labels per image); ``loss_error`` where the CPU loss pass could not run. A field the pass did not measure is
    ``None`` and left out of the JSON (``--loss-only`` measures the loss alone)."""

    imgsz: int
    params: int | None = None
    buffers_mib: float | None = None
    train_act_fixed_mib: float | None = None
    train_act_per_image_mib: float | None = None
    val_act_fixed_mib: float | None = None
    val_act_per_image_mib: float | None = None
    source: str | None = None
    task: str | None = None
    head_outputs: int | None = None  # the head's output channels per anchor (NMS's candidates)
    loss_curve: list[list[float]] | None = None  # [labels per image, MiB per image] points
    loss_per_image_mib: float | None = None
    loss_per_object_mib: float | None = None
    loss_source: str | None = None
    loss_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: ([list(point) for point in v] if k == "loss_curve" else v)
                for k, v in asdict(self).items() if v is not None}

    def to_json(self) -> str:
        """One line, as the child prints it."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, what: str = "the fake pass's result") -> FakePassResult:
        values = exact_fields(cls, data, what)
        curve = values.get("loss_curve")
        if curve is not None and not all(isinstance(p, list) and len(p) == 2 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in p) for p in curve):
            raise RecordError(f"{what}: damaged (loss_curve is a list of [labels, MiB] pairs)")
        return cls(**values)

    @classmethod
    def from_json(cls, text: str, what: str = "the fake pass's result") -> FakePassResult:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise RecordError(f"{what}: damaged, not JSON ({' '.join(str(exc).split())})") from None
        return cls.from_dict(data, what)

    def save(self, path: Path) -> None:
        """Written beside, then renamed: a reader never sees half an entry."""
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_text(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> FakePassResult:
        return cls.from_dict(read_json(path, "the fake pass's result"), f"the fake pass's result {path}")
