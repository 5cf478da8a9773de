"""What runs inside the Ultralytics trainer, in the single training process and in every DDP rank.

Every rank is a ``python -m yolosafe.worker SPEC`` process started by yolosafe's launcher (:mod:`yolosafe.launch`)
and registers these callbacks itself. They learn where to write from the environment the supervisor set
(``YOLOSAFE_RUN_DIR``, ``YOLOSAFE_SPEC``), which reaches every rank through ``torch.distributed.run``.

They record phase events (train/val start and end, with epoch, rank and batch) as JSON lines in the run directory,
with torch's own peak allocated and reserved memory of the phase in each end event (the peaks are reset at each phase
start), and raise the injected faults of ``YOLOSAFE_INJECT_OOM`` at the requested point. Right before validation
they collect garbage and empty the allocator cache on every rank (spec ``clear_before_val``, on by default):
Ultralytics does it only above 50 % use, and validation's differently shaped batches cannot reuse train's cached
blocks.
"""

from __future__ import annotations

import functools
import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yolosafe import oom, rundir
from yolosafe.gpus import MIB, PHASE_FILE_ENV, fake_phase_file, nvml_index


@dataclass
class _State:
    """Where this process is in training; per process, like the rank itself."""

    phase: str | None = None
    epoch: int = 0
    iteration: int = 0
    final: bool = False  # the validation of best.pt after the last epoch
    train_peaks: dict[str, float | None] = field(default_factory=dict)  # torch's peaks of this epoch's training


STATE = _State()


def rank() -> int:
    return int(os.environ.get("RANK", -1))


def node() -> int:
    """This process's node in a multi-node run (0 on one machine), from the spec its node's supervisor wrote."""
    return int(spec().get("node_rank") or 0)


def is_rank() -> bool:
    """Whether this process is one rank of several, started by the launcher (which sets ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def gpu_index(device: Any) -> int | None:
    """The rank's GPU as a CUDA device index, which is its position in the plan's ``gpus``; a CPU rank (fake GPUs)
    stands for the GPU at its ``LOCAL_RANK``. None for a single process on the CPU."""
    index = getattr(device, "index", None)
    if index is None and is_rank() and getattr(device, "type", "cpu") == "cpu":
        return int(os.environ.get("LOCAL_RANK", 0))
    return index


def run_dir() -> Path | None:
    value = os.environ.get(rundir.RUN_DIR_ENV)
    return Path(value) if value else None


def spec() -> dict[str, Any]:
    """This attempt's run spec (read once per process)."""
    path = os.environ.get(rundir.SPEC_ENV)
    return _read_spec(path) if path else {}


@functools.cache
def _read_spec(path: str) -> dict[str, Any]:
    return rundir.read_json(Path(path))


def _device_index(obj: Any) -> int | None:
    return gpu_index(getattr(obj, "device", None))


def _event(event: str, obj: Any, **fields: Any) -> None:
    directory = run_dir()
    if directory is None:
        return
    record = {
        "t": time.time(),
        "event": event,
        "phase": STATE.phase,
        "epoch": STATE.epoch,
        "final": STATE.final,
        "rank": rank(),
        "gpu": _device_index(obj),
        "pid": os.getpid(),
        "attempt": spec().get("attempt"),
        **fields,
    }
    # multi-node: each node's ranks append to the node's own file (O_APPEND is atomic on one machine, not over NFS)
    rundir.append_jsonl(directory / rundir.node_file(rundir.EVENTS, node()), record)
    base = os.environ.get(PHASE_FILE_ENV)
    if base:  # lets the fake NVML backend follow the phases (tests, drills), each rank on its own GPU
        live = STATE.phase if event.endswith("_start") else None
        planned = spec().get("plan", {})  # the per-GPU batch, for the fake's per_image_mib
        batch = planned.get("per_gpu_batch") if live == "train" else planned.get("val_batch")
        gpu = nvml_index(planned.get("gpus", []), record["gpu"]) if record["gpu"] is not None else None
        rundir.write_json(fake_phase_file(base, gpu),
                          {"phase": live, "pid": os.getpid(), "epoch": STATE.epoch, "batch": batch})


def _cuda_device(obj: Any) -> Any:
    """The CUDA device the trainer or validator runs on; None on the CPU, where torch has no memory statistics."""
    device = getattr(obj, "device", None)
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    return device if torch.cuda.is_available() else None


def _reset_peaks(obj: Any) -> None:
    device = _cuda_device(obj)
    if device is not None:
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def torch_peaks(obj: Any) -> dict[str, float | None]:
    """torch's peak allocated and reserved MiB since the phase started; reserved minus allocated is the allocator's
    cache and fragmentation, which NVML counts as used."""
    device = _cuda_device(obj)
    if device is None:
        return {"max_allocated_mib": None, "max_reserved_mib": None}
    import torch

    return {"max_allocated_mib": round(torch.cuda.max_memory_allocated(device) / MIB, 1),
            "max_reserved_mib": round(torch.cuda.max_memory_reserved(device) / MIB, 1)}


def _clear_cache(obj: Any) -> float | None:
    """Collect garbage and give the allocator's cached blocks back to the driver; the MiB given back (None on CPU)."""
    gc.collect()
    device = _cuda_device(obj)
    if device is None:
        return None
    import torch

    before = torch.cuda.memory_reserved(device)
    torch.cuda.empty_cache()
    return round((before - torch.cuda.memory_reserved(device)) / MIB, 1)


def maybe_inject(phase: str) -> None:
    """Raise the fault of ``YOLOSAFE_INJECT_OOM`` here if it matches; counted across retries in the run dir."""
    injection = oom.parse_injection(os.environ.get(oom.INJECT_ENV))
    local = (node(), int(os.environ.get("LOCAL_RANK", -1)))
    if injection is None or not injection.matches(phase, STATE.epoch, STATE.iteration, rank(), local):
        return
    counter = (run_dir() or Path(".")) / rundir.INJECTED
    done = int(counter.read_text()) if counter.is_file() else 0
    if injection.times and done >= injection.times:
        return
    counter.write_text(str(done + 1))
    if injection.error == "runtime":
        raise RuntimeError("yolosafe injected a non-OOM failure (YOLOSAFE_INJECT_OOM error=runtime)")
    import torch

    raise torch.OutOfMemoryError(oom.fake_message(int(os.environ.get("LOCAL_RANK", 0))))


def on_train_epoch_start(trainer: Any) -> None:
    # yolosafe owns OOM recovery: Ultralytics' in-process halving (first epoch, single GPU) would halve the batch a
    # second time for one OOM and keep a fragmented allocator; its counter at 3 makes the trainer re-raise instead.
    trainer._oom_retries = 3
    STATE.phase, STATE.epoch, STATE.iteration, STATE.final = "train", trainer.epoch, -1, False
    _reset_peaks(trainer)
    _event("train_start", trainer, batch=trainer.batch_size // max(trainer.world_size, 1))


def on_train_batch_start(trainer: Any) -> None:
    STATE.iteration += 1  # the training step's own injection point is SafeTrainerMixin.preprocess_batch


def on_train_epoch_end(trainer: Any) -> None:
    STATE.train_peaks = torch_peaks(trainer)
    _event("train_end", trainer, **STATE.train_peaks)


def on_val_start(validator: Any) -> None:
    STATE.phase, STATE.iteration = ("final" if STATE.final else "val"), -1
    cleared = _clear_cache(validator) if spec().get("clear_before_val", True) else None
    _reset_peaks(validator)
    loader = getattr(validator, "dataloader", None)
    _event("val_start", validator, batch=getattr(loader, "batch_size", None), cleared_mib=cleared)


def on_val_batch_start(validator: Any) -> None:
    # Counted here: Ultralytics sets validator.batch_i after this callback (None on the first batch, then the last).
    STATE.iteration += 1
    maybe_inject(STATE.phase or "val")


def on_val_end(validator: Any) -> None:
    _end_val(validator)


def on_fit_epoch_end(trainer: Any) -> None:
    _end_val(trainer)  # on_val_end fires on rank 0 only; the other ranks close their validation here


def _end_val(obj: Any) -> None:
    if STATE.phase in {"val", "final"}:
        _event("val_end", obj, **torch_peaks(obj))
        STATE.phase = None


CALLBACKS = {
    "on_train_epoch_start": on_train_epoch_start,
    "on_train_batch_start": on_train_batch_start,
    "on_train_epoch_end": on_train_epoch_end,
    "on_val_start": on_val_start,
    "on_val_batch_start": on_val_batch_start,
    "on_val_end": on_val_end,
    "on_fit_epoch_end": on_fit_epoch_end,
}


def register(model: Any) -> None:
    """Add yolosafe's callbacks to an Ultralytics ``Model`` (or trainer/validator) once."""
    for event, callback in CALLBACKS.items():
        if callback not in model.callbacks.get(event, []):
            model.add_callback(event, callback)
