"""Plan before launch: ``--gpus auto``, ``--batch auto`` and the per-GPU memory plan that ``yolosafe plan`` prints.

The memory model (:mod:`yolosafe.planning.memory.model`) predicts each GPU's train and validation peaks; this module
applies it
to the GPUs of this machine as NVML sees them now, and to this machine's history
(:mod:`yolosafe.planning.memory.history`). The
smallest free memory among the chosen GPUs decides the per-GPU batch: DDP runs the same batch on every rank.

A model the table lacks is measured by the fake-tensor pass, a child this module never starts: the caller hands the
function that runs it (``fake_pass``, :func:`yolosafe.supervisor.children.fake_pass`); without one, only a model
measured before (the cache) or in the table has figures.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yolosafe import gpus
from yolosafe.planning import datasets, gpuselect
from yolosafe.planning import trainplan as plan
from yolosafe.planning.memory import history, hostram, objects
from yolosafe.planning.memory import model as memmodel
from yolosafe.planning.memory import table as memtable
from yolosafe.planning.trainoptions import TrainOptions
from yolosafe.rundir.childrecords import FakePassRequest, FakePassResult
from yolosafe.rundir.typed import RecordError

AUTO = "auto"
CACHE_EMPTIED_ABOVE = 0.5  # Ultralytics empties the CUDA cache around validation above this share of the GPU
LOW_MARGIN = 0.10  # warn when less than this share of a GPU stays free beside what the plan requires
FAKEPASS_FORMAT = 2  # the fake pass's entry format: per-task loss terms with the assigner's per-object slope
FakePass = Callable[[FakePassRequest], FakePassResult]  # the fake pass's child: supervisor.children.fake_pass


def expandable_segments(options: TrainOptions) -> bool:
    """Whether the training child's allocator grows segments in place (yolosafe's default unless turned off)."""
    conf = f"{os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')},{options.alloc_conf or ''}".replace(" ", "")
    return "expandable_segments:false" not in conf.lower()


# GPUs that sit on NVSwitch boards with NVLink SHARP (Hopper and later SXM parts, as NVML names them); their PCIe and
# NVL (bridged pairs) versions have no NVSwitch.
NVLS_GPU = re.compile(r"\b(?:H100|H200|H800|H20|GH200|B100|B200|B300|GB200|GB300)\b(?!.*\b(?:PCIe|NVL)\b)", re.I)


def nvls_node(gpu_names: Sequence[str], env: Mapping[str, str]) -> bool:
    """Whether NCCL would use NVLS between these GPUs: all of them NVSwitch parts, and NCCL_NVLS_ENABLE not 0."""
    return (bool(gpu_names) and all(NVLS_GPU.search(name) for name in gpu_names)
            and env.get("NCCL_NVLS_ENABLE", "").strip() != "0")


def setup_of(options: TrainOptions, world_size: int, imgsz: int | None = None,
             gpu_names: Sequence[str] = ()) -> memmodel.Setup:
    args = plan.parse_passthrough(options.args or [])
    setup = memmodel.Setup(imgsz=int(imgsz or options.imgsz), amp=bool(args.get("amp", True)),
                           optimizer=str(args.get("optimizer", "auto")), world_size=world_size,
                           expandable_segments=expandable_segments(options),
                           nvls=world_size > 1 and nvls_node(gpu_names, os.environ))
    return objects.apply(setup, options.dataset_figures)  # the dataset's own labels, as Ultralytics lists them


def fake_pass_terms(model: str, fake_pass: FakePass | None = None) -> memmodel.Terms:
    """The fake-tensor pass for a model the table lacks, run by ``fake_pass`` (a throw-away child: torch stays out of
    the CLI), kept in the cache directory by the YAML's content and the torch/ultralytics versions; without
    ``fake_pass``, only a kept entry answers. A damaged entry is measured again."""
    path = Path(model)
    text = path.read_text() if path.is_file() else model
    key = hashlib.sha256(f"{text}|{sys.version}|{FAKEPASS_FORMAT}".encode()).hexdigest()[:16]
    cache = datasets.cache_dir() / "memterms" / f"{memtable.model_key(model)}-{key}.json"
    try:
        entry = FakePassResult.load(cache) if cache.is_file() else None
    except RecordError:
        entry = None
    if entry is None and fake_pass is None:
        raise memmodel.UnknownModel(f"{model}: no memory figures yet (yolosafe plan --model {model} makes them)")
    if entry is None:
        entry = fake_pass(FakePassRequest(model))
        entry.save(cache)
    return memtable.terms_from_entry(memtable.model_key(model), entry, entry.source or "fake pass")


def model_terms(model: str, fake_pass: FakePass | None = None) -> memmodel.Terms:
    """The table's figures when it has the model, else a fake pass on its YAML (or Ultralytics' built-in name), run
    by ``fake_pass`` when none was kept."""
    try:
        return memtable.table_terms(model)
    except memmodel.UnknownModel:
        if model.endswith(".pt"):
            raise
        return fake_pass_terms(model, fake_pass)


def choose_gpus(text: str, inventory: gpus.Inventory, visible: tuple[int, ...],
                busy_mib: float = gpus.BUSY_MIB) -> tuple[tuple[int, ...], list[str]]:
    """``auto`` (every idle GPU) or ``auto:N`` (the N with the most free memory), leaving out busy GPUs."""
    _, _, count_text = text.partition(":")
    if count_text and not ((count_text.isascii() and count_text.isdecimal()) and int(count_text) > 0):
        raise plan.PlanError(f"--gpus {text}: expected 'auto' or 'auto:N' with N a positive number of GPUs")
    candidates = [g for g in inventory.gpus if g.index in visible]
    if not candidates:
        raise plan.PlanError(f"--gpus {text}: this machine has no GPU ({inventory.problem or 'none visible'})")
    reasons, idle = [], []
    for g in candidates:
        if (g.used_mib or 0) > busy_mib:
            pids = ", ".join(str(p.pid) for p in g.processes) or "no process NVML can name"
            reasons.append(f"GPU {g.index} left out: {(g.used_mib or 0) / 1024:.1f} GiB already used ({pids})")
        else:
            idle.append(g)
    idle.sort(key=lambda g: -(g.free_mib or 0))
    wanted = int(count_text) if count_text else len(idle)
    if len(idle) < max(wanted, 1):
        raise plan.PlanError(f"--gpus {text}: only {len(idle)} of {len(candidates)} GPUs are idle "
                             f"(others hold more than {busy_mib / 1024:.1f} GiB): {'; '.join(reasons)}")
    chosen = sorted(g.index for g in idle[:wanted])
    free = ", ".join(f"GPU {g.index} {(g.free_mib or 0) / 1024:.1f} GiB" for g in idle[:wanted])
    reasons.append(f"chose GPU{'s' if len(chosen) > 1 else ''} {','.join(map(str, chosen))}: most free memory ({free})")
    return tuple(chosen), reasons


@dataclass(frozen=True)
class GpuMemory:
    """The plan for one GPU: its free memory now, both figures of each phase, and what follows."""

    gpu: gpus.GPU
    train: memmodel.Prediction
    val: memmodel.Prediction
    calibrated_runs: int

    @property
    def required_mib(self) -> float:
        return max(self.train.required_mib, self.val.required_mib)

    @property
    def gpu_mem_column_gib(self) -> float:
        """What Ultralytics' GPU_mem column shows in steady epochs on this GPU: the supported Ultralytics empties the
        CUDA cache around validation only above half the GPU, so below that the validation blocks stay reserved."""
        train, val = self.train.gpu_mem_mib, self.val.gpu_mem_mib
        emptied = self.gpu.total_mib and max(train, val) > CACHE_EMPTIED_ABOVE * self.gpu.total_mib
        return (train if emptied else max(train, val)) / 1024

    @property
    def headroom_mib(self) -> float:
        return (self.gpu.free_mib or 0) - self.required_mib

    def warnings(self, batch_chosen: bool = False) -> list[str]:
        """What to say about this GPU's plan; ``batch_chosen``: ``--batch auto`` chose the batch, filling the share
        of the free memory it was given (``--memory-fraction``), so a thin margin is its choice, not a mistake."""
        g, notes = self.gpu, []
        if g.processes or (g.used_mib or 0) > gpus.BUSY_MIB:
            notes.append(f"GPU {g.index}: another process uses {(g.used_mib or 0) / 1024:.1f} GiB of it")
        if self.val.required_mib > self.train.required_mib:
            notes.append(f"GPU {g.index}: validation requires {self.val.required_mib / 1024:.1f} GiB, more than "
                         f"training ({self.train.required_mib / 1024:.1f} GiB): lower --val-batch")
        if self.headroom_mib < 0:
            notes.append(f"GPU {g.index}: the required {self.required_mib / 1024:.1f} GiB does not fit the "
                         f"{(g.free_mib or 0) / 1024:.1f} GiB free: lower --batch, or use --batch auto")
        elif g.total_mib and self.headroom_mib < LOW_MARGIN * g.total_mib and not batch_chosen:
            notes.append(f"GPU {g.index}: margin {self.headroom_mib / 1024:.1f} GiB is under "
                         f"{LOW_MARGIN:.0%} of the GPU: an OOM is likely; lower --batch")
        return notes


def calibrations(gpu_name: str | None, history_file: Path | None) -> tuple[dict[str, float], dict[str, str], int]:
    """Per phase: this machine's correction for the GPU type, where it comes from, and the runs behind it."""
    factors, sources, most = {}, {}, 0
    for phase in ("train", "val"):
        factor, runs = history.calibration(gpu_name, history_file, phase)
        factors[phase], most = factor, max(most, runs)
        sources[phase] = (f"this machine's runs: calibrated on {runs} earlier run(s) of {gpu_name} here ({phase} peaks)"
                          if runs else "none (no earlier runs of this GPU type here)")
    return factors, sources, most


def gpu_memory(terms: memmodel.Terms, setup: memmodel.Setup, g: gpus.GPU, batch: int, val_batch: int,
               history_file: Path | None = None) -> GpuMemory:
    factors, sources, runs = calibrations(g.name, history_file)
    train = memmodel.predict(terms, setup, "train", batch, factors["train"], sources["train"])
    val = memmodel.predict(terms, setup, "val", val_batch, factors["val"], sources["val"])
    return GpuMemory(g, train, val, runs)


def auto_batch(terms: memmodel.Terms, setup: memmodel.Setup, chosen: list[gpus.GPU], fraction: float,
               val_batch: int | None, history_file: Path | None = None) -> tuple[int, list[str]]:
    """The largest per-GPU batch whose train and val ``required_mib`` fit ``fraction`` of every chosen GPU's free
    memory."""
    best, reasons = None, []
    for g in chosen:
        factor, _, _ = calibrations(g.name, history_file)
        budget = fraction * (g.free_mib or 0)
        fits = memmodel.largest_batch(terms, setup, budget, (lambda b: val_batch) if val_batch else None, factor)
        reasons.append(f"GPU {g.index}: {fits} images fit {fraction:.0%} of {(g.free_mib or 0) / 1024:.1f} GiB free")
        best = fits if best is None else min(best, fits)
    if not best:
        raise plan.PlanError(f"--batch auto: not even 1 image per GPU fits {fraction:.0%} of the free memory "
                             f"({'; '.join(reasons)}); free a GPU, lower --imgsz or use a smaller model")
    return best, reasons


def resolve_auto(options: TrainOptions, inventory: gpus.Inventory, history_file: Path | None = None,
                 fake_pass: FakePass | None = None) -> tuple[TrainOptions, dict[str, Any] | None]:
    """Replace ``--gpus auto[:N]`` and ``--batch auto`` by numbers; returns the options and the story's entry.
    ``fake_pass`` measures a model the table lacks (``--batch auto`` of a custom YAML)."""
    gpus_text, batch = str(options.gpus or "").lower(), options.batch
    if not gpus_text.startswith(AUTO) and batch != AUTO:
        return options, None
    visible = gpus.visible_ids(inventory, os.environ.get("CUDA_VISIBLE_DEVICES"))
    entry: dict[str, Any] = {"memory_fraction": options.memory_fraction, "reasons": []}
    resolved = options
    if gpus_text.startswith(AUTO):
        chosen, why = choose_gpus(gpus_text, inventory, visible)
        resolved = resolved.replace(gpus=",".join(map(str, chosen)))
        entry.update(gpus=list(chosen), reasons=why)
    if batch == AUTO:
        selected = gpuselect.parse_gpus(None if resolved.gpus is None else str(resolved.gpus), visible,
                                   inventory.problem)
        if not selected:  # Ultralytics' AutoBatch on the CPU: a warning and its default batch
            cpu_batch = int(plan.ultralytics_default("batch"))
            entry.update(batch=cpu_batch, reasons=[*entry["reasons"], f"--batch auto on the CPU: AutoBatch is for "
                                                   f"GPUs; using Ultralytics' default batch {cpu_batch}, as yolo does"])
            return resolved.replace(batch=cpu_batch), entry
        chosen_gpus = [g for g in inventory.gpus if g.index in selected]
        terms = model_terms(options.model, fake_pass)
        setup = setup_of(options, len(selected), gpu_names=[g.name for g in chosen_gpus])
        per_gpu, why = auto_batch(terms, setup, chosen_gpus, entry["memory_fraction"], options.val_batch,
                                  history_file)
        entry["memory_per_gpu_batch"] = per_gpu  # what the memory allows, before the caps below
        images = options.train_images or 0  # Ultralytics counted them first (trainrun: --batch auto checks early)
        if images and per_gpu * len(selected) > images:
            per_gpu = max(-(-images // len(selected)), 1)
            why.append(f"capped at {per_gpu} per GPU: the training set holds {images} images")
        if options.effective_batch and per_gpu * len(selected) > options.effective_batch:
            per_gpu = max(options.effective_batch // len(selected), 1)
            why.append(f"capped at {per_gpu} per GPU: the total may not exceed --effective-batch")
        resolved = resolved.replace(batch=per_gpu * len(selected))
        entry.update(per_gpu_batch=per_gpu, batch=resolved.batch, terms_source=terms.source,
                     reasons=entry["reasons"] + why)
    return resolved, entry


def chose_batch(auto: Mapping[str, Any] | None) -> bool:
    """Whether ``--batch auto`` chose the per-GPU batch (``auto``: :func:`resolve_auto`'s entry; on the CPU it
    takes Ultralytics' default instead)."""
    return bool(auto) and "per_gpu_batch" in auto


def _gpu_entry(m: GpuMemory, batch_chosen: bool) -> dict[str, Any]:
    return {"index": m.gpu.index, "name": m.gpu.name, "total_mib": m.gpu.total_mib, "free_mib": m.gpu.free_mib,
            "train_gpu_mem_gib": round(m.train.gpu_mem_gib, 2), "val_gpu_mem_gib": round(m.val.gpu_mem_gib, 2),
            "gpu_mem_column_gib": round(m.gpu_mem_column_gib, 2),
            "train_required_mib": round(m.train.required_mib, 1), "val_required_mib": round(m.val.required_mib, 1),
            "headroom_mib": round(m.headroom_mib, 1), "calibrated_runs": m.calibrated_runs,
            "warnings": m.warnings(batch_chosen)}


def memory_plan(p: plan.TrainPlan, inventory: gpus.Inventory, options: TrainOptions,
                fake_pass: FakePass | None = None, history_file: Path | None = None,
                auto: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """Both figures of each phase of a resolved plan on its GPUs (``yolosafe.json``'s ``memory_plan``); None without
    figures for the model (``fake_pass`` measures one the table lacks; without it, only one measured before).
    ``auto``: :func:`resolve_auto`'s entry, when it chose GPUs or the batch."""
    try:
        terms = model_terms(p.model, fake_pass)
    except memmodel.UnknownModel:
        return None
    chosen = [g for g in inventory.gpus if g.index in p.gpus]
    setup = setup_of(options, p.world_size, p.imgsz, [g.name for g in chosen])
    per_gpu = [gpu_memory(terms, setup, g, p.per_gpu_batch, p.val_batch, history_file) for g in chosen]
    worst = max(per_gpu, key=lambda m: m.required_mib, default=None)
    reference = worst or GpuMemory(gpus.GPU(-1, None, None, None, None, None),
                                   memmodel.predict(terms, setup, "train", p.per_gpu_batch),
                                   memmodel.predict(terms, setup, "val", p.val_batch), 0)
    host = hostram.estimate(p.extra, p.local_world_size, p.imgsz, _train_images(p), hostram.available_mib())
    return {
        "model": memtable.model_key(p.model), "task": terms.task, "imgsz": p.imgsz, "amp": setup.amp,
        "world_size": p.world_size, "expandable_segments": setup.expandable_segments,
        "objects_per_image": {"train": setup.objects_per_image, "val": setup.val_objects_per_image,
                              "source": setup.objects_source},
        "terms_source": terms.source,
        "predicted": {"train": reference.train.as_dict(), "val": reference.val.as_dict()},
        "gpus": [_gpu_entry(m, chose_batch(auto)) for m in per_gpu],
        "host_ram": {"needed_mib": round(host.total_mib), "available_mib": host.available_mib,
                     "images": host.images, "advice": hostram.advice(host)},
    }


def warnings(memory: dict[str, Any] | None) -> list[str]:
    """What ``yolosafe train`` prints before it starts: each GPU's warnings and the host RAM advice."""
    if not memory:
        return []
    return [w for g in memory["gpus"] for w in g["warnings"]] + memory["host_ram"]["advice"]


def tier_table(vram_gib: list[float], imgsz: int, options: TrainOptions, fraction: float,
               models: list[str] | None = None, fake_pass: FakePass | None = None) -> dict[str, Any]:
    """Largest per-GPU batch whose ``required_mib`` fits, per model and per VRAM size, from the model (never typed
    in): the table's models, or the ones asked for (any YAML: a fake pass, run by ``fake_pass``)."""
    setup = setup_of(options, 1, imgsz)
    chosen = {name: model_terms(name, fake_pass) for name in models} if models else memtable.load_table()
    rows, sources = {}, {}
    for name, terms in chosen.items():
        key = memtable.model_key(name)
        rows[key] = {f"{v:g}": memmodel.largest_batch(terms, setup, fraction * v * 1024) for v in vram_gib}
        sources[key] = terms.source
    return {"imgsz": imgsz, "memory_fraction": fraction, "amp": setup.amp, "optimizer": setup.optimizer,
            "expandable_segments": setup.expandable_segments, "objects_per_image": setup.objects_per_image,
            "objects_source": setup.objects_source, "vram_gib": vram_gib, "figure": "required_mib",
            "source": "required_mib: peak allocation + fragmentation + CUDA context", "sources": sources,
            "batches": rows}


def _train_images(p: plan.TrainPlan) -> int | None:
    """The training split's size: the plan's, as Ultralytics' own dataset code counted it (None: not known)."""
    return p.train_images
