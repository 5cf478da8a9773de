"""What every process agrees on about hangs: the signal that makes a rank write its Python stack, and the hang
injection (``YOLOSAFE_INJECT_HANG``) that makes one rank sleep inside the real trainer or validator on purpose.

No torch import here: the supervisor checks the injection before a run exists and sends the signal; the ranks
register it (:mod:`yolosafe.training.heartbeat`) and sleep where the injection says.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass

from yolosafe.errors import UsageError

INJECT_ENV = "YOLOSAFE_INJECT_HANG"
# A real-time signal: SLURM and torch.distributed.run may use SIGUSR1/SIGUSR2 for their own ends, nobody uses this
# one. Its default action ends a process, so the supervisor sends it only to a rank whose heartbeat file exists: a
# rank writes its first beat after it registered the stack dump for the signal.
STACK_SIGNAL = signal.SIGRTMIN + 3
PHASES = ("train", "val", "save")
KEYS = ("phase", "epoch", "rank", "node", "seconds", "iteration")


class HangInjectionError(UsageError):
    """A ``YOLOSAFE_INJECT_HANG`` that cannot be read or cannot fire in this run; ``str()`` is one line."""


@dataclass(frozen=True)
class HangInjection:
    """Where to sleep: ``phase`` train (a training step, from the trainer's ``preprocess_batch``), val (a validation
    batch, from ``on_val_batch_start``) or save (rank 0's checkpoint save, inside ``save_model``); the 0-based
    ``epoch`` and ``iteration`` (batch index; save has none); the global ``rank`` (with ``node``: the local rank on
    that node); ``seconds`` to sleep (None: forever). Each fires once per run, counted in the run directory, so the
    relaunch after it passes."""

    phase: str = "train"
    epoch: int = 0
    rank: int = 0
    node: int | None = None
    seconds: float | None = None
    iteration: int = 0

    def matches(self, phase: str, epoch: int, iteration: int, rank: int, local: tuple[int, int] = (0, -1)) -> bool:
        """``local``: this process's node and local rank, used when the injection names a ``node``."""
        where = max(rank, 0) if self.node is None else (local[0], max(local[1], 0))
        wanted = self.rank if self.node is None else (self.node, self.rank)
        at = iteration == self.iteration or phase == "save"
        return phase == self.phase and epoch == self.epoch and at and where == wanted


def parse_injections(text: str | None) -> tuple[HangInjection, ...]:
    """``YOLOSAFE_INJECT_HANG='phase=train,epoch=1,rank=1[,seconds=10]'``, several joined by ``;`` (each fires once,
    in the run's order); raises :class:`HangInjectionError` on a malformed spec."""
    if not text or not text.strip():
        return ()
    return tuple(_parse_one(part) for part in text.split(";") if part.strip())


def _parse_one(text: str) -> HangInjection:
    fields: dict[str, object] = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in KEYS:
            raise HangInjectionError(f"{INJECT_ENV}: cannot read {item!r}; keys: {', '.join(KEYS)}")
        if key == "phase":
            if value not in PHASES:
                raise HangInjectionError(f"{INJECT_ENV}: phase must be {'/'.join(PHASES)}, got {value!r}")
            fields[key] = value
        elif key == "seconds" and re.fullmatch(r"\d+(\.\d+)?", value):
            fields[key] = float(value)
        elif re.fullmatch(r"\d+", value):
            fields[key] = int(value)
        else:
            raise HangInjectionError(f"{INJECT_ENV}: {key}={value!r} must be a whole number >= 0"
                                     + (" (seconds: a number)" if key == "seconds" else ""))
    return HangInjection(**fields)  # type: ignore[arg-type]


def check_injections(text: str | None, world_size: int, epochs: int, nnodes: int = 1) -> None:
    """A usage error (:class:`HangInjectionError`, one line) for an injection that cannot fire in this plan: a rank
    or node it does not have, an epoch past the run's, a save on a rank that does not save."""
    for injection in parse_injections(text):
        if injection.node is not None and injection.node >= nnodes:
            nodes = "node 0" if nnodes == 1 else f"nodes 0-{nnodes - 1}"
            raise HangInjectionError(f"{INJECT_ENV}: node={injection.node} does not exist: this run has {nodes}")
        ranks_here = world_size // max(nnodes, 1) if injection.node is not None else world_size
        if injection.rank >= ranks_here:
            ranks = "rank 0" if ranks_here == 1 else f"ranks 0-{ranks_here - 1}"
            raise HangInjectionError(f"{INJECT_ENV}: rank={injection.rank} does not exist: this run has {ranks}")
        if injection.epoch >= epochs:
            raise HangInjectionError(f"{INJECT_ENV}: epoch={injection.epoch} never comes: this run has epochs "
                                     f"0-{epochs - 1} (0-based)")
        if injection.phase == "save" and (injection.rank, injection.node or 0) != (0, 0):
            raise HangInjectionError(f"{INJECT_ENV}: phase=save happens on rank 0 only (it writes the checkpoints)")
