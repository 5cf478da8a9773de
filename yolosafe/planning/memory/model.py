"""The memory model: a GPU's predicted peak in training and in validation, as fixed + per image × batch.

Pure and cheap (no torch): ``yolosafe plan`` and ``--batch auto`` call it many times. Each figure it uses names its
source: the shipped table (``data/memtable.json``, computed by ``tools/make_memtable.py`` with the fake-tensor pass
of :mod:`yolosafe.training.fakepass`), a fake pass run for a custom model YAML, an assumption documented here,
or this
machine's own runs (:mod:`yolosafe.planning.memory.history`). The model (docs/memory-model.md):

    allocated = weights, gradients, optimizer state, EMA, AMP weight copies   (bytes per parameter)
              + activations saved for backward + the loss's tensors          (per image, ∝ imgsz², measured)
    reserved  = allocated × allocator factor   (the caching allocator's blocks: Ultralytics' ``GPU_mem`` column)
    peak      = (reserved + CUDA context + NCCL buffers in DDP) × calibration   (NVML's view; what must fit)

Validation runs the EMA model in half precision with its own batch while the training state stays allocated.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from yolosafe.errors import UsageError

MIB = 2**20
TABLE_IMGSZ = 640
# Assumptions, each with where it comes from (docs/memory-model.md):
CONTEXT_MIB = 500.0  # CUDA context + cuDNN/cuBLAS workspaces, outside memory_reserved: 0.3-0.6 GiB measured (issue 11)
NCCL_MIB = 300.0  # NCCL's buffers per rank in DDP, outside the caching allocator (assumption, NCCL defaults)
ALLOCATOR_STEADY = 1.05  # reserved / allocated in steady state: the median, 1.045, of the public steady GPU_mem
# figures over this model's allocation (tests/data/memory_points.yaml; 1.09 without the largest source): 1.01-1.06 on
# Ultralytics 8.3 / torch 2.4+, 1.11 on 8.2.5 / torch 2.2, 1.33 on 8.0.227 / torch 2.1. It was 1.3 (issue 11's
# 1.2-1.45), which over-predicted the 8.3 figures by a median 24 %. Plans use ALLOCATOR_PEAK, not this.
ALLOCATOR_PEAK = 2.5  # a run's peak: first epoch, or validation blocks kept cached: up to ~2.5x (issue 11); public
# first-epoch GPU_mem figures reach 2.1-2.5x this model's allocation on Ultralytics 0.0.x / early 8.0 (1.0-1.5x on 8.3),
# and --batch auto with it stays below every public OOM report (benchmarks/memory_model.py): plans use it, until
# calibrated
FP32_ACTIVATIONS = 1.95  # fp32 / AMP activation bytes: 187.2 / 96.0 MiB per image, yolov8n fake pass at 640
OBJECTS_PER_IMAGE = 100  # the loss pads targets to the most objects in a batch: assume a busy scene
# Bytes per parameter kept through the training step: fp32 weights, gradients, EMA copy, AMP's fp16 weight casts.
BYTES_WEIGHTS, BYTES_GRADS, BYTES_EMA, BYTES_AMP_CAST = 4, 4, 4, 2
OPTIMIZER_BYTES = MappingProxyType({"adamw": 8, "adam": 8, "adamax": 8, "nadam": 8, "radam": 8, "sgd": 4, "rmsprop": 4,
                                   "auto": 8})


class UnknownModel(UsageError, LookupError):
    """No figures for this model in the table; the message says how to get them (its YAML for a fake pass)."""


@dataclass(frozen=True)
class Terms:
    """One model's measured terms at ``imgsz`` (MiB): what the fake pass reports."""

    name: str
    params: int
    imgsz: int
    train_act_fixed_mib: float
    train_act_per_image_mib: float
    val_act_fixed_mib: float
    val_act_per_image_mib: float
    loss_per_image_mib: float
    loss_per_object_mib: float
    source: str

    def at(self, imgsz: int) -> Terms:
        """The same model at another image size: activations and loss scale with the pixel count (imgsz²)."""
        if imgsz == self.imgsz:
            return self
        k = (imgsz / self.imgsz) ** 2
        return replace(self, imgsz=imgsz, train_act_fixed_mib=self.train_act_fixed_mib * k,
                       train_act_per_image_mib=self.train_act_per_image_mib * k,
                       val_act_fixed_mib=self.val_act_fixed_mib * k,
                       val_act_per_image_mib=self.val_act_per_image_mib * k,
                       loss_per_image_mib=self.loss_per_image_mib * k, loss_per_object_mib=self.loss_per_object_mib * k,
                       source=f"{self.source}, scaled from {self.imgsz} to {imgsz} px (imgsz²)")


def terms_from_entry(name: str, entry: dict[str, Any], source: str) -> Terms:
    """A table or fake-pass entry; a missing loss term (a task the CPU loss pass could not run) falls back to the
    yolov8n detection loss, and says so."""
    loss_source = ""
    if "loss_per_image_mib" not in entry:
        fallback = load_table()["yolov8n"]
        entry = {**entry, "loss_per_image_mib": fallback.loss_per_image_mib,
                 "loss_per_object_mib": fallback.loss_per_object_mib}
        loss_source = "; loss term of yolov8n (this task's loss not measured: masks/keypoints not modelled)"
    return Terms(name=name, params=int(entry["params"]), imgsz=int(entry["imgsz"]),
                 **{k: float(entry[k]) for k in ("train_act_fixed_mib", "train_act_per_image_mib",
                                                  "val_act_fixed_mib", "val_act_per_image_mib",
                                                  "loss_per_image_mib", "loss_per_object_mib")},
                 source=source + loss_source)


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


@dataclass(frozen=True)
class Setup:
    """What decides a GPU's memory besides the model."""

    imgsz: int = TABLE_IMGSZ
    amp: bool = True
    optimizer: str = "auto"
    world_size: int = 1
    objects_per_image: int = OBJECTS_PER_IMAGE
    worst_case: bool = True  # the run's peak (first epoch included); False: the steady-state GPU_mem


@dataclass(frozen=True)
class Prediction:
    """One phase on one GPU: ``allocated = fixed + per_image × batch``; the rest are explicit factors and terms."""

    phase: str
    batch: int
    fixed_mib: float
    per_image_mib: float
    allocator_factor: float
    context_mib: float
    outside_mib: float  # NCCL buffers in DDP
    calibration: float = 1.0
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def allocated_mib(self) -> float:
        return self.fixed_mib + self.per_image_mib * self.batch

    @property
    def reserved_mib(self) -> float:
        """What torch's ``memory_reserved`` (Ultralytics' ``GPU_mem``) should show."""
        return self.allocated_mib * self.allocator_factor

    @property
    def peak_mib(self) -> float:
        """What NVML should show for this process at the peak: what has to fit in the GPU's free memory."""
        return (self.reserved_mib + self.context_mib + self.outside_mib) * self.calibration

    def as_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "batch": self.batch, "fixed_mib": round(self.fixed_mib, 1),
                "per_image_mib": round(self.per_image_mib, 2), "allocated_mib": round(self.allocated_mib, 1),
                "allocator_factor": self.allocator_factor, "reserved_mib": round(self.reserved_mib, 1),
                "calibration": round(self.calibration, 3), "context_mib": self.context_mib,
                "outside_mib": self.outside_mib, "peak_mib": round(self.peak_mib, 1), "sources": self.sources}


def state_bytes_per_param(setup: Setup, phase: str) -> int:
    """What the trainer keeps per parameter: the whole step in training; during validation the gradients are gone
    (zero_grad sets them to None) and the EMA runs in half precision."""
    optimizer = OPTIMIZER_BYTES.get(setup.optimizer.lower(), OPTIMIZER_BYTES["auto"])
    if phase == "val":
        return BYTES_WEIGHTS + optimizer + (2 if setup.amp else BYTES_EMA)
    ddp_buckets = BYTES_GRADS if setup.world_size > 1 else 0  # DDP's gradient buckets: a second copy
    amp_cast = BYTES_AMP_CAST if setup.amp else 0
    return BYTES_WEIGHTS + BYTES_GRADS + optimizer + BYTES_EMA + amp_cast + ddp_buckets


def predict(terms: Terms, setup: Setup, phase: str, batch: int, calibration: float = 1.0,
            calibration_source: str = "none (no runs of this GPU type here)") -> Prediction:
    """The predicted peak of ``phase`` ("train" or "val") at ``batch`` images per GPU."""
    t = terms.at(setup.imgsz)
    precision = 1.0 if setup.amp else FP32_ACTIVATIONS
    state = terms.params * state_bytes_per_param(setup, phase) / MIB
    if phase == "train":
        per_image = (t.train_act_per_image_mib + t.loss_per_image_mib
                     + t.loss_per_object_mib * setup.objects_per_image) * precision
        fixed = state + t.train_act_fixed_mib * precision
    else:
        val_precision = 1.0 if setup.amp else 2.0  # validation runs in half precision with AMP, else fp32
        per_image, fixed = t.val_act_per_image_mib * val_precision, state + t.val_act_fixed_mib * val_precision
    factor = ALLOCATOR_PEAK if setup.worst_case else ALLOCATOR_STEADY
    sources = {
        "activations": t.source,
        "state": f"{terms.params:,} parameters x {state_bytes_per_param(setup, phase)} bytes ({setup.optimizer}, "
                 f"{'AMP' if setup.amp else 'fp32'}, world size {setup.world_size})",
        "allocator": f"x{factor} ("
                     + ("peak, first epoch: issue 11 figures" if setup.worst_case
                        else "steady state: public GPU_mem figures, tests/data/memory_points.yaml") + ")",
        "context": f"{CONTEXT_MIB:.0f} MiB CUDA context (assumption: issue 11)",
        "calibration": calibration_source,
    }
    outside = NCCL_MIB if setup.world_size > 1 else 0.0
    return Prediction(phase, batch, fixed, per_image, factor, CONTEXT_MIB, outside, calibration, sources)


def largest_batch(terms: Terms, setup: Setup, budget_mib: float, val_batch_of: Any = None,
                  calibration: float = 1.0, limit: int = 65536) -> int:
    """The largest per-GPU batch whose train and val peaks both fit ``budget_mib`` (0 if not even 1 fits).
    ``val_batch_of(batch)`` gives the validation batch (default: the same as training, yolosafe's default)."""
    val_of = val_batch_of or (lambda b: b)

    def fits(b: int) -> bool:
        return all(predict(terms, setup, phase, n, calibration).peak_mib <= budget_mib
                   for phase, n in (("train", b), ("val", val_of(b))))

    low, high = 0, 1
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:  # peaks grow with the batch: bisect between the last fit and the first miss
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
