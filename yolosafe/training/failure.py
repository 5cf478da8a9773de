"""A failure record (``failure-N-rankR.json``), written by the process that fails, as it dies.

It says what only that process knows: the phase, epoch and batch index it was at (its context's progress), the
batch, and the figures of PyTorch's OOM message, so the supervisor can tell an OOM on rank 3 from the NCCL errors it
causes on ranks 0-2. The trainer writes it when training fails (:class:`yolosafe.training.trainer.FailureRecord`),
the worker
when the final validation alone fails; the launcher writes one for a rank killed before it could
(:func:`yolosafe.supervisor.launchcmd.record_failures`).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any

from yolosafe import oom
from yolosafe.rundir.records import Failure, save_failure
from yolosafe.training import torchmem
from yolosafe.training.context import RunContext


def failure_record(context: RunContext, exc: BaseException, batch: int | None) -> Failure:
    """What the supervisor needs to know about a failure, from inside the process that failed."""
    import torch

    message = str(exc)
    is_oom = isinstance(exc, torch.OutOfMemoryError) or oom.is_oom_text(message)
    progress = context.progress
    return Failure.new(
        t=time.time(),
        oom=is_oom,
        error=type(exc).__name__,
        message=message.strip().splitlines()[0][:2000] if message.strip() else "",
        phase="final" if progress.final else progress.phase,
        epoch=progress.epoch,
        iteration=progress.iteration,
        rank=context.rank.index,
        pid=os.getpid(),
        batch=batch,
        val_batch=context.spec.val_batch,
        attempt=context.attempt,
        figures=oom.parse_message(message) if is_oom else {},
        traceback=traceback.format_exception(exc)[-3:],
        by="rank",
    )


def write_failure(context: RunContext, exc: BaseException, batch: int | None, device: Any = None) -> None:
    """Write this process's failure record (none for Ctrl-C: yolosafe stopped it). ``gpu`` is the rank's CUDA device
    index, which the supervisor's ``CUDA_VISIBLE_DEVICES`` makes the position of the GPU in the plan's ``gpus``;
    torch's peaks are its view at the moment of death (the phase's end event, which holds them otherwise, never
    comes)."""
    if isinstance(exc, KeyboardInterrupt):
        return
    record = failure_record(context, exc, batch)
    index = context.gpu_index(device)
    record.gpu = index if index is not None else (record.figures or {}).get("gpu")
    peaks = torchmem.peaks(device)
    record.max_allocated_mib, record.max_reserved_mib = peaks["max_allocated_mib"], peaks["max_reserved_mib"]
    try:
        save_failure(context.run_dir, record)
    except OSError as err:  # a full or read-only disk: the failure itself is in the log, never a second traceback
        print(f"yolosafe: cannot write the failure record ({err.strerror})", file=sys.stderr, flush=True)
