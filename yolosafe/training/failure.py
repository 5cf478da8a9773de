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
from collections.abc import Mapping
from typing import Any

from yolosafe import oom
from yolosafe.rundir import files as rundir
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


RECOVERED_IN_PLACE = "in_place"  # a record's ``recovered``: caught by the rank, which went on (training.valretry)


def write_failure(context: RunContext, exc: BaseException, batch: int | None, device: Any = None,
                  recovered: Mapping[str, Any] | None = None) -> None:
    """Write this process's failure record (none for Ctrl-C: yolosafe stopped it). ``gpu`` is the rank's CUDA device
    index, which the supervisor's ``CUDA_VISIBLE_DEVICES`` makes the position of the GPU in the plan's ``gpus``;
    torch's peaks are its view at the moment of death (the phase's end event, which holds them otherwise, never
    comes).

    ``recovered`` (the validation batch it failed at, the next one) marks an OOM the rank recovered from in place:
    written as ``failure-N-rankR-recoveredK.json`` beside the rank's own record; the supervisor's classification
    skips it."""
    if isinstance(exc, KeyboardInterrupt):
        return
    record = failure_record(context, exc, batch)
    index = context.gpu_index(device)
    record.gpu = index if index is not None else (record.figures or {}).get("gpu")
    peaks = torchmem.peaks(device)
    record.max_allocated_mib, record.max_reserved_mib = peaks["max_allocated_mib"], peaks["max_reserved_mib"]
    try:
        if recovered is None:
            save_failure(context.run, record)
        else:
            _save_recovered(context, record, recovered)
    except OSError as err:  # a full or read-only disk: the failure itself is in the log, never a second traceback
        print(f"yolosafe: cannot write the failure record ({err.strerror})", file=sys.stderr, flush=True)


def _save_recovered(context: RunContext, record: Failure, recovered: Mapping[str, Any]) -> None:
    record.recovered = RECOVERED_IN_PLACE
    record.val_batch = recovered.get("val_batch", record.val_batch)
    record.extra.update({k: v for k, v in recovered.items() if k != "val_batch"})
    run, attempt, rank = context.run, context.attempt, context.rank.index
    count = len(run.recovered_failures(attempt, rank))
    rundir.write_json(run.recovered_failure(attempt, rank, count + 1), record.to_dict())
