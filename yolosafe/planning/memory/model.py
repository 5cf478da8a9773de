"""The memory model: two figures per phase (train, val) on one GPU, each as fixed + per image × batch.

Pure and cheap (no torch): ``yolosafe plan`` and ``--batch auto`` call it many times. Each figure names its sources:
the shipped table (``data/memtable.json``, computed by ``tools/make_memtable.py`` with the fake-tensor pass of
:mod:`yolosafe.training.fakepass`), a fake pass run for a custom model YAML, the public figure set
(``tests/data/memory_points.yaml``), the dataset's own labels, or this machine's runs
(:mod:`yolosafe.planning.memory.history`). The model (docs/memory-model.md):

    allocated    = weights, gradients, optimizer state, EMA, AMP weight copies   (bytes per parameter)
                 + activations saved for backward + the loss and its assigner     (per image, ∝ imgsz², measured)
    gpu_mem      = allocated × the caching allocator's steady ratio   (what Ultralytics' GPU_mem column shows)
    required_mib = (allocated × (1 + fragmentation) + CUDA context + NCCL in DDP) × calibration   (what must be free)

The caching allocator returns its unused blocks and retries before it raises an OOM, so what it happens to keep
cached on a roomy GPU (``gpu_mem``) is not a requirement; the peak allocation, the blocks it cannot return
(fragmentation) and what lives outside it are. Validation runs the EMA model in half precision at its own batch,
computes the loss on every batch (the trainer's validation reports val losses) and keeps NMS candidates at
``conf=0.001``, while the training state stays allocated.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from yolosafe.errors import UsageError

MIB = 2**20
TABLE_IMGSZ = 640
# Terms that are not measured by the fake pass, each with where it comes from (docs/memory-model.md):
CONTEXT_MIB = 500.0  # CUDA context + cuDNN/cuBLAS workspaces, outside the caching allocator: 0.3-0.6 GiB (assumption)
NCCL_MIB = 300.0  # NCCL's buffers per rank in DDP, outside the caching allocator (assumption, NCCL defaults)
# NVLink SHARP (NVLS): on NVSwitch nodes of Hopper and later GPUs NCCL enables it by default (NCCL_NVLS_ENABLE), and
# its buffers take about 1 GiB more per rank (estimate: NVIDIA/nccl#864 reports ~1.6 GB per communicator after one
# all-reduce; NVIDIA/NeMo-Framework-Launcher#127 and NVIDIA/JAX-Toolbox#383 turn NVLS off to save that memory).
NVLS_MIB = 1024.0
NCCL_SOURCES = MappingProxyType({
    False: "assumption, NCCL's defaults over PCIe or NVLink without NVLS",
    True: f"estimate: {NCCL_MIB:.0f} MiB plus NVLS buffers of about {NVLS_MIB / 1024:.0f} GiB on an NVSwitch node of "
          "Hopper or later GPUs (NVIDIA/nccl#864; NCCL_NVLS_ENABLE=0 turns NVLS off)"})
ALLOCATOR_STEADY = 1.04  # memory_reserved / allocated in steady epochs: the median, 1.041, of the public steady
# GPU_mem figures over this model's allocation (tests/data/memory_points.yaml); 0.98-1.05 on Ultralytics 8.3
FRAGMENTATION = MappingProxyType({True: 0.01, False: 0.02})  # what the allocator cannot return under pressure, as a
# share of the allocation, with / without expandable_segments (assumption: below the public steady median, which also
# holds returnable cache; expandable segments grow in place, so fewer partly used segments are stranded)
FP32_ACTIVATIONS = 1.95  # fp32 / AMP activation bytes: 187.2 / 96.0 MiB per image, yolov8n fake pass at 640
OBJECTS_PER_IMAGE = 100  # without the dataset's labels: the loss pads targets to the busiest image of a batch; COCO's
# busiest images hold about 90 objects (assumption)
NMS_BYTES_PER_ANCHOR_OUTPUT = 4  # NMS at conf=0.001 keeps a float copy of an image's candidates (ultralytics nms.py)
# Bytes per parameter kept through the training step: fp32 weights, gradients, EMA copy, AMP's fp16 weight casts.
BYTES_WEIGHTS, BYTES_GRADS, BYTES_EMA, BYTES_AMP_CAST = 4, 4, 4, 2
OPTIMIZER_BYTES = MappingProxyType({"adamw": 8, "adam": 8, "adamax": 8, "nadam": 8, "radam": 8, "sgd": 4, "rmsprop": 4,
                                   "auto": 8})
GPU_MEM_UNIT = "GiB"  # Ultralytics 8.3.76 and later print memory_reserved() / 2**30


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
    task: str = "detect"
    head_outputs: int = 84  # channels per anchor of the head's output (4 box + classes + masks/keypoints/angle)
    loss_source: str = ""
    loss_curve: tuple[tuple[float, float], ...] = ()  # (labels per image, loss MiB per image), as measured
    extra_per_object_mib: float = 0.0  # another Ultralytics version's assigner (the public benchmark's)

    def loss_at(self, objects: float) -> float:
        """The loss's MiB per image with ``objects`` labels in the busiest image: the measured curve, linear between
        its points and along its last slope beyond (a loss whose mask stage saturates keeps its measured shape);
        without a curve, per image + per object × objects."""
        extra = self.extra_per_object_mib * objects
        curve = self.loss_curve
        if len(curve) < 2:
            return self.loss_per_image_mib + self.loss_per_object_mib * objects + extra
        pairs = itertools.pairwise(curve)
        (x0, y0), (x1, y1) = next(((a, b) for a, b in pairs if objects <= b[0]), curve[-2:])
        return y0 + (y1 - y0) * (objects - x0) / (x1 - x0) + extra

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
                       loss_curve=tuple((n, mib * k) for n, mib in self.loss_curve),
                       extra_per_object_mib=self.extra_per_object_mib * k,
                       source=f"{self.source}, scaled from {self.imgsz} to {imgsz} px (imgsz²)")

    @property
    def anchors(self) -> int:
        """Anchor points at this imgsz (strides 8, 16, 32); a classifier has none."""
        return 0 if self.task == "classify" else sum((self.imgsz // s) ** 2 for s in (8, 16, 32))


@dataclass(frozen=True)
class Setup:
    """What decides a GPU's memory besides the model."""

    imgsz: int = TABLE_IMGSZ
    amp: bool = True
    optimizer: str = "auto"
    world_size: int = 1
    objects_per_image: float = OBJECTS_PER_IMAGE  # the busiest training image (the loss pads every image to it)
    val_objects_per_image: float | None = None  # the busiest validation image (default: as training)
    objects_source: str = f"assumption: {OBJECTS_PER_IMAGE} (no labels read)"
    expandable_segments: bool = True  # yolosafe's allocator default
    nvls: bool = False  # DDP over NVSwitch with NVLink SHARP (planner.nvls_node): NCCL's buffers are larger
    reserved_ratio: float = ALLOCATOR_STEADY  # memory_reserved / allocated in steady epochs
    fragmentation: float | None = None  # default: FRAGMENTATION[expandable_segments]
    era: str = ""  # where reserved_ratio / fragmentation come from when not the supported Ultralytics
    val_area: float | None = None  # the largest rect=True validation batch's pixels over imgsz² (None: square, padded)
    val_area_source: str = "assumption: a square rect batch, padded as Ultralytics pads it (image shapes not read)"

    @property
    def val_area_share(self) -> float:
        if self.val_area is not None:
            return self.val_area
        padded = math.ceil(self.imgsz / 32 + 0.5) * 32  # Ultralytics' rect batch side: ceil(imgsz / stride + pad)
        return (padded / self.imgsz) ** 2

    @property
    def fragmentation_share(self) -> float:
        return FRAGMENTATION[self.expandable_segments] if self.fragmentation is None else self.fragmentation


@dataclass(frozen=True)
class Prediction:
    """One phase on one GPU: ``allocated = fixed + per_image × batch``; the two figures follow from it."""

    phase: str
    batch: int
    fixed_mib: float
    per_image_mib: float
    reserved_ratio: float
    fragmentation: float
    context_mib: float
    outside_mib: float  # NCCL buffers in DDP
    calibration: float = 1.0
    sources: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def allocated_mib(self) -> float:
        return self.fixed_mib + self.per_image_mib * self.batch

    @property
    def gpu_mem_mib(self) -> float:
        """torch's ``memory_reserved`` in steady epochs: Ultralytics' ``GPU_mem`` column for training; for validation
        what it reserves while validating (Ultralytics 8.3.92+ empties its cache after validation only above half the
        GPU, so the next epoch's GPU_mem shows the larger of the two below that)."""
        return self.allocated_mib * self.reserved_ratio

    @property
    def gpu_mem_gib(self) -> float:
        return self.gpu_mem_mib / 1024

    @property
    def required_mib(self) -> float:
        """What must be free on the GPU for this phase to run at this batch."""
        return (self.allocated_mib * (1 + self.fragmentation) + self.context_mib + self.outside_mib) * self.calibration

    def as_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "batch": self.batch, "fixed_mib": round(self.fixed_mib, 1),
                "per_image_mib": round(self.per_image_mib, 2), "allocated_mib": round(self.allocated_mib, 1),
                "reserved_ratio": self.reserved_ratio, "gpu_mem_gib": round(self.gpu_mem_gib, 2),
                "fragmentation": self.fragmentation, "context_mib": self.context_mib,
                "outside_mib": self.outside_mib, "calibration": round(self.calibration, 3),
                "required_mib": round(self.required_mib, 1), "sources": self.sources}


def state_bytes_per_param(setup: Setup, phase: str) -> int:
    """What the trainer keeps per parameter: the whole step in training; during validation the gradients are gone
    (zero_grad sets them to None) and the EMA runs in half precision."""
    optimizer = OPTIMIZER_BYTES.get(setup.optimizer.lower(), OPTIMIZER_BYTES["auto"])
    if phase == "val":
        return BYTES_WEIGHTS + optimizer + (2 if setup.amp else BYTES_EMA)
    ddp_buckets = BYTES_GRADS if setup.world_size > 1 else 0  # DDP's gradient buckets: a second copy
    amp_cast = BYTES_AMP_CAST if setup.amp else 0
    return BYTES_WEIGHTS + BYTES_GRADS + optimizer + BYTES_EMA + amp_cast + ddp_buckets


def _per_image(t: Terms, setup: Setup, phase: str) -> tuple[float, float, str]:
    """(fixed activations, per image, what the per-image term holds) of one phase, in MiB."""
    if phase == "train":
        precision = 1.0 if setup.amp else FP32_ACTIVATIONS
        loss = t.loss_at(setup.objects_per_image)
        return (t.train_act_fixed_mib * precision, (t.train_act_per_image_mib + loss) * precision,
                "activations saved for backward + the loss and its assigner")
    precision = 1.0 if setup.amp else 2.0  # validation runs in half precision with AMP, else fp32
    objects = setup.objects_per_image if setup.val_objects_per_image is None else setup.val_objects_per_image
    loss = t.loss_at(objects)  # forward + backward peak: an upper bound
    nms = t.head_outputs * t.anchors * NMS_BYTES_PER_ANCHOR_OUTPUT / MIB
    area = setup.val_area_share  # rect=True batches: activations, loss and NMS scale with the batch's pixels
    return (t.val_act_fixed_mib * precision * area, (t.val_act_per_image_mib * precision + loss + nms) * area,
            f"half-precision forward + the loss (validation reports val losses) + NMS candidates at conf=0.001, "
            f"at rect batches of {area:.2f} x imgsz² ({setup.val_area_source})")


def _sources(terms: Terms, t: Terms, setup: Setup, phase: str, held: str, calibration_source: str
             ) -> dict[str, dict[str, str]]:
    state = (f"{terms.params:,} parameters x {state_bytes_per_param(setup, phase)} bytes ({setup.optimizer}, "
             f"{'AMP' if setup.amp else 'fp32'}, world size {setup.world_size})")
    era = f" ({setup.era})" if setup.era else ""
    allocated = {"activations": f"{t.source}: {held}", "loss": t.loss_source, "objects per image": setup.objects_source,
                 "state": state}
    if phase == "val":
        allocated["public check"] = ("none: no public figure backs the validation terms (GPU_mem is printed while "
                                     "training); this machine's validation peaks calibrate them")
    return {
        "gpu_mem_gib": {**allocated, "reserved ratio": f"x{setup.reserved_ratio}{era or ''}: the median of the "
                        "public steady GPU_mem figures over this allocation (tests/data/memory_points.yaml)",
                        "unit": f"{GPU_MEM_UNIT} as the supported Ultralytics prints it"},
        "required_mib": {**allocated, "fragmentation": f"+{setup.fragmentation_share:.0%} of the allocation{era}, "
                         f"expandable_segments {'on' if setup.expandable_segments else 'off'} (assumption)",
                         "context": f"{CONTEXT_MIB:.0f} MiB CUDA context and workspaces (assumption)",
                         "nccl": f"{nccl_mib(setup):.0f} MiB per rank ({NCCL_SOURCES[setup.nvls]})"
                                 if setup.world_size > 1 else "none",
                         "calibration": calibration_source},
    }


def nccl_mib(setup: Setup) -> float:
    """NCCL's memory per rank outside the caching allocator: none on one GPU; more with NVLS."""
    if setup.world_size <= 1:
        return 0.0
    return NCCL_MIB + (NVLS_MIB if setup.nvls else 0.0)


def predict(terms: Terms, setup: Setup, phase: str, batch: int, calibration: float = 1.0,
            calibration_source: str = "none (no runs of this GPU type here)") -> Prediction:
    """Both figures of ``phase`` ("train" or "val") at ``batch`` images per GPU."""
    t = terms.at(setup.imgsz)
    state = terms.params * state_bytes_per_param(setup, phase) / MIB
    fixed, per_image, held = _per_image(t, setup, phase)
    outside = nccl_mib(setup)
    return Prediction(phase, batch, state + fixed, per_image, setup.reserved_ratio, setup.fragmentation_share,
                      CONTEXT_MIB, outside, calibration,
                      _sources(terms, t, setup, phase, held, calibration_source))


def largest_batch(terms: Terms, setup: Setup, budget_mib: float, val_batch_of: Any = None,
                  calibration: float | dict[str, float] = 1.0, limit: int = 65536) -> int:
    """The largest per-GPU batch whose train and val ``required_mib`` both fit ``budget_mib`` (0 if not even 1 fits).
    ``val_batch_of(batch)`` gives the validation batch (default: the same as training, yolosafe's default);
    ``calibration`` is one factor or one per phase."""
    val_of = val_batch_of or (lambda b: b)
    factor = calibration if isinstance(calibration, dict) else {"train": calibration, "val": calibration}

    def fits(b: int) -> bool:
        return all(predict(terms, setup, phase, n, factor.get(phase, 1.0)).required_mib <= budget_mib
                   for phase, n in (("train", b), ("val", val_of(b))))

    low, high = 0, 1
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:  # the figures grow with the batch: bisect between the last fit and the first miss
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
