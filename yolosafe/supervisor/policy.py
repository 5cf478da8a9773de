"""The retry policy, pure: how an attempt ended (:func:`classify`) and what the next one runs (:func:`next_step`).

Change here what yolosafe does after an OOM. Nothing in this module starts a process, reads a clock or writes a file:
the attempt loop (:mod:`yolosafe.supervisor.loop`) feeds it an attempt's exit status, the failure records its ranks
wrote
and the end of its log, and applies the step it returns.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass, field

from yolosafe import oom
from yolosafe.gpus import nvml_index
from yolosafe.planning.trainplan import TrainPlan
from yolosafe.proc import AttemptResult
from yolosafe.rundir.records import Failure, Outcome, epoch_label
from yolosafe.supervisor import terminal

TEARDOWN_SIGNALS = ("SIGTERM", "SIGINT")  # what torch.distributed.run sends the other ranks when one fails


@dataclass
class AttemptEnd:
    """How an attempt ended, as the policy and the terminal need it."""

    outcome: Outcome
    phase: str | None = None  # train | val | final, for an OOM or a failure in training
    epoch: int | None = None  # 0-based, as the trainer counts
    rank: int | None = None
    gpu: int | None = None  # the rank's CUDA device index: the position of its GPU in the plan's gpus
    message: str = ""
    records: list[Failure] = field(default_factory=list)
    node: int | None = None  # multi-node: the node of the rank that failed (yolosafe.supervisor.multinode.agree)
    node_gpus: tuple[int, ...] | None = None  # that node's plan GPUs, which ``gpu`` indexes (None: this node's)

    def nvml_gpu(self, plan: TrainPlan) -> int | None:
        """The failed rank's GPU in NVML numbering (of its own node)."""
        return nvml_index(self.node_gpus or plan.gpus, self.gpu)


def classify(result: AttemptResult, records: Sequence[Failure], log_tail: str) -> AttemptEnd:
    """An attempt's outcome from its exit status, the failure records its ranks wrote, and the end of its log.

    An OOM anywhere makes the attempt an OOM: the NCCL or timeout errors of the other ranks follow from it. An OOM
    a rank recovered from in place (``recovered``) did not end the attempt.
    """
    records = [r for r in records if not r.recovered]
    if result.exit_code == 0:  # finished, even when a stop came as it did: nothing is left to resume
        return AttemptEnd(Outcome.COMPLETED)
    if result.interrupted:
        return AttemptEnd(Outcome.INTERRUPTED, message=signal.Signals(result.interrupted).name)
    ooms = [r for r in records if r.oom]
    if ooms:
        first = min(ooms, key=lambda r: r.t or 0)
        return AttemptEnd(Outcome.OOM, first.phase or "train", first.epoch, first.rank, first.gpu, first.message or "",
                          ooms)
    # A rank killed by a signal (kill -9, the kernel's OOM killer): the others' errors follow from it. The launcher
    # SIGTERMs the surviving ranks after the first death (under NCCL's blocking wait they are still waiting in their
    # collective), so a teardown signal is the cause only when no rank failed by itself: a rank's own record, its
    # exception, ranks above it (its timestamps are whole seconds: never compared with a rank's).
    killed = [r for r in records if r.signal and r.signal not in TEARDOWN_SIGNALS]
    torn_down = [r for r in records if r.signal in TEARDOWN_SIGNALS]
    own = [r for r in records if not r.signal]
    if killed or (torn_down and not own):
        first = min(killed or torn_down, key=lambda r: r.t or 0)
        return AttemptEnd(Outcome.KILLED, rank=first.rank, gpu=first.gpu, message=first.message or "",
                          records=records)
    if oom.is_oom_text(log_tail):  # an OOM where no record could be written (e.g. while building the model)
        line = next((ln for ln in reversed(log_tail.splitlines()) if oom.is_oom_text(ln)), "")
        return AttemptEnd(Outcome.OOM, "train", message=line.strip())
    if result.exit_code < 0:
        return AttemptEnd(Outcome.KILLED, message=f"the worker was killed by {signal.Signals(-result.exit_code).name}")
    return _failed(own, log_tail, records)


def _failed(own: list[Failure], log_tail: str, records: list[Failure]) -> AttemptEnd:
    """Not an OOM, not a signal: the first failure of a rank by itself (its peers' failed collectives come after it),
    else the exception (or last line) in the log. ``own``: the records that are not a signal's."""
    first = min(own, key=lambda r: r.t or 0) if own else Failure()
    last_line = next((ln for ln in reversed(log_tail.splitlines()) if ln.strip()), "")
    message = first.message or terminal.exception_line(log_tail) or last_line
    if first.error and first.message:
        message = f"{first.error}: {message}"
    return AttemptEnd(Outcome.FAILED, first.phase, first.epoch, first.rank, first.gpu, terminal.plain(message),
                      records=records)


@dataclass(frozen=True)
class Step:
    """What the next attempt does: the plan it runs, and whether it only re-runs the final validation."""

    plan: TrainPlan
    final_val_only: bool
    change: str  # one line for the terminal and yolosafe.json


def next_step(plan: TrainPlan, end: AttemptEnd, val_ooms: int, min_batch: int) -> Step | None:
    """The next attempt after an OOM; None when nothing smaller is allowed.

    - final validation (training finished): re-run only the validation, with half the validation batch;
    - validation: first halve the validation batch (training was fine), then the train batch if it happens again;
    - training: halve the per-GPU batch, keep ``nbs`` (accumulation doubles, the effective batch stays).
    """
    half_val = plan.val_batch // 2
    if end.phase == "final":
        if half_val < 1:
            return None
        return Step(plan.with_val_batch(half_val), True, f"final validation again with val batch {half_val}")
    if end.phase == "val" and val_ooms <= 1 and half_val >= 1:
        return Step(plan.with_val_batch(half_val), False, f"val batch {plan.val_batch} -> {half_val} per GPU")
    smaller = plan.halved(min_batch)
    if smaller is None:
        return None
    return Step(
        smaller,
        False,
        f"batch {plan.batch} -> {smaller.batch} ({plan.per_gpu_batch} -> {smaller.per_gpu_batch} per GPU), "
        f"accumulate {plan.accumulate} -> {smaller.accumulate}, effective batch {smaller.real_effective_batch}",
    )


def epoch_text(epoch: int | None, epochs: int) -> str:
    """An epoch as Ultralytics shows it: 1-based, "epoch 2/3"."""
    return epoch_label(epoch, epochs)


def where(plan: TrainPlan, end: AttemptEnd) -> str:
    """" on rank 1, GPU 3" (NVML numbering), as far as the failure records tell; " on node 1, rank 2, GPU 0" over
    several nodes."""
    parts = [] if end.node is None else [f"node {end.node}"]
    parts += [] if end.rank in (None, -1) else [f"rank {end.rank}"]
    gpu = end.nvml_gpu(plan)
    if gpu is not None:
        parts.append(f"GPU {gpu}")
    return f" on {', '.join(parts)}" if parts else ""
