"""yolosafe's Ultralytics trainers: the task trainers with the changes that callbacks alone cannot make.

1. ``--val-batch`` really sets the validation batch. Ultralytics builds the validation loader with twice the per-GPU
   train batch, and the final validation of best.pt reuses that loader; ``get_dataloader(mode="val")`` is the one
   place both come from, in a single process and in every DDP rank.
2. A rank that fails writes a record of it (``failure-N-rankR.json``: phase, epoch, iteration, batch and the figures
   of PyTorch's message) into the run directory before it dies, so the supervisor can tell an OOM on rank 3 from
   the NCCL errors it causes on ranks 0-2.
3. yolosafe launches the DDP ranks itself (:mod:`yolosafe.launch`): in a rank, the world size is the launcher's
   ``WORLD_SIZE``, never Ultralytics' count of the device string, and the trainer never launches ranks of its own.
4. Checkpoints are written atomically, so the one a retry resumes from is never half a file.
5. A resume may change ``nbs`` (``--effective-batch``), which Ultralytics would otherwise take from the checkpoint.
6. Each epoch's torch memory peaks of every GPU go into Ultralytics' metrics (results.csv, loggers):
   :mod:`yolosafe.peakmetrics`.
7. The training step has an injection point (``YOLOSAFE_INJECT_OOM``) inside the try block where a real OOM
   surfaces, so tests prove that Ultralytics' own in-process halving stays off (see callbacks.py).
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

from ultralytics.models.yolo.classify import ClassificationTrainer
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.obb import OBBTrainer
from ultralytics.models.yolo.pose import PoseTrainer
from ultralytics.models.yolo.segment import SegmentationTrainer

from yolosafe import callbacks, oom, peakmetrics, rundir


def failure_record(exc: BaseException, batch: int | None) -> dict[str, Any]:
    """What the supervisor needs to know about a failure, from inside the process that failed."""
    import torch

    message = str(exc)
    is_oom = isinstance(exc, torch.OutOfMemoryError) or oom.is_oom_text(message)
    state = callbacks.STATE
    return {
        "t": time.time(),
        "oom": is_oom,
        "error": type(exc).__name__,
        "message": message.strip().splitlines()[0][:2000] if message.strip() else "",
        "phase": "final" if state.final else state.phase,
        "epoch": state.epoch,
        "iteration": state.iteration,
        "rank": callbacks.rank(),
        "pid": os.getpid(),
        "batch": batch,
        "val_batch": callbacks.spec().get("val_batch"),
        "attempt": callbacks.spec().get("attempt"),
        "figures": oom.parse_message(message) if is_oom else {},
        "traceback": traceback.format_exception(exc)[-3:],
    }


def _cuda_peaks(device: Any) -> dict[str, float]:
    """torch's view at the moment of death (the phase's end event, which holds these otherwise, never comes)."""
    import torch

    if getattr(device, "type", None) != "cuda" or not torch.cuda.is_available():
        return {}
    return {"max_allocated_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "max_reserved_mib": round(torch.cuda.max_memory_reserved(device) / 2**20, 1)}


def write_failure(exc: BaseException, batch: int | None, device: Any = None) -> None:
    """Write this rank's failure record. ``gpu`` is the rank's CUDA device index, which the supervisor's
    ``CUDA_VISIBLE_DEVICES`` makes the position of the GPU in the plan's ``gpus``."""
    directory = callbacks.run_dir()
    if directory is None or isinstance(exc, KeyboardInterrupt):
        return
    record = failure_record(exc, batch)
    index = callbacks.gpu_index(device)
    record["gpu"] = index if index is not None else record["figures"].get("gpu")
    record.update(_cuda_peaks(device))
    rundir.write_json(rundir.failure_path(directory, record["attempt"] or 0, record["rank"]), record)


class SafeTrainerMixin:
    """The changes described in the module docstring, for any Ultralytics task trainer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ddp = False  # Ultralytics' own launch (temp file, pickled trainer) is never used
        if callbacks.is_rank():
            self.world_size = int(os.environ["WORLD_SIZE"])

    def get_dataloader(self, dataset_path: str, batch_size: int = 16, rank: int = 0, mode: str = "train") -> Any:
        if mode == "val":
            batch_size = int(callbacks.spec().get("val_batch") or batch_size)
        return super().get_dataloader(dataset_path, batch_size=batch_size, rank=rank, mode=mode)

    def preprocess_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        # Inside the training step's try block, where a real OOM surfaces and Ultralytics' own handler looks.
        callbacks.maybe_inject("train")
        return super().preprocess_batch(batch)

    def _do_train(self) -> None:
        try:
            super()._do_train()
        except BaseException as exc:
            write_failure(exc, self.batch_size // max(self.world_size, 1), self.device)
            raise

    def save_model(self) -> bool:
        # Ultralytics writes last.pt/best.pt in place: a rank killed mid-write (SIGKILL, host OOM killer) would leave
        # the very checkpoint a retry resumes from truncated. Write beside it, then rename: all or nothing.
        final = {"last": self.last, "best": self.best}
        partial = {name: path.with_name(f".{path.name}.partial") for name, path in final.items()}
        for path in partial.values():  # a killed rank's leftover: promote only what this save writes
            path.unlink(missing_ok=True)
        self.last, self.best = partial["last"], partial["best"]
        try:
            saved = super().save_model()
        finally:
            self.last, self.best = final["last"], final["best"]
        for name, path in partial.items():
            if path.exists():
                os.replace(path, final[name])
        return saved

    def check_resume(self, overrides: dict[str, Any]) -> None:
        # Ultralytics resumes with the checkpoint's nbs; a resume with another --effective-batch passes its own.
        nbs = overrides.get("nbs")
        super().check_resume({k: v for k, v in overrides.items() if k != "nbs"})
        if self.resume and nbs is not None:
            self.args.nbs = nbs

    def validate(self) -> tuple[Any, Any]:
        metrics, fitness = super().validate()
        peaks = peakmetrics.epoch_peaks(self)  # every rank takes part: it gathers the peaks of every GPU
        return (None if metrics is None else {**metrics, **peaks}), fitness

    def save_metrics(self, metrics: dict[str, Any]) -> None:
        super().save_metrics(peakmetrics.ordered(metrics))

    def final_eval(self) -> None:
        callbacks.STATE.final = True
        super().final_eval()


class SafeDetectionTrainer(SafeTrainerMixin, DetectionTrainer):
    pass


class SafeSegmentationTrainer(SafeTrainerMixin, SegmentationTrainer):
    pass


class SafePoseTrainer(SafeTrainerMixin, PoseTrainer):
    pass


class SafeOBBTrainer(SafeTrainerMixin, OBBTrainer):
    pass


class SafeClassificationTrainer(SafeTrainerMixin, ClassificationTrainer):
    pass


TRAINERS = {
    "detect": SafeDetectionTrainer,
    "segment": SafeSegmentationTrainer,
    "pose": SafePoseTrainer,
    "obb": SafeOBBTrainer,
    "classify": SafeClassificationTrainer,
}
