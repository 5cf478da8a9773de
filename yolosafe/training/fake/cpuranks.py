"""Fake GPUs as real ranks: the four changes that let Ultralytics' DDP path run as CPU processes over gloo.

With fake GPUs (``YOLOSAFE_FAKE_GPUS``) and more than one GPU in the plan, every fake GPU is one real rank process on
the CPU, so recovery, teardown and reports are exercised with real ranks, real collectives and real checkpoints
from rank 0 only. Ultralytics 8.4's DDP path assumes accelerators in four places; this mixin changes exactly those,
and is put in front of yolosafe's trainer only in such ranks (:func:`on_cpu`). The real-GPU path never sees it.

1. ``__init__``: Ultralytics sets ``world_size`` to 0 for ``device='cpu'``; a rank's world size is the launcher's
   (:class:`yolosafe.training.trainer.LauncherWorldSize`, in every rank).
2. ``_setup_ddp``: Ultralytics pins a CUDA device and picks nccl; here the CPU device and gloo.
3. ``DistributedDataParallel(device_ids=[self.device.index])`` gets ``[None]`` on the CPU, which DDP rejects.
4. The final validation asks ``torch.cuda`` for a rank's device and builds AutoBackend there; here the CPU.

With a layout's ``"collectives": "blocking"`` one more change, inside yolosafe's failure record
(:class:`BlockingCollectives`): NCCL's semantics instead of gloo's. Ultralytics sets ``TORCH_NCCL_BLOCKING_WAIT=1``
(no watchdog thread) and a 3-hour timeout, so under NCCL the peers of a failed rank never learn of its death: they
wait in their collective until torchrun, seeing the failed rank, SIGTERMs them (torch's ``PContext.close``). Gloo's
peers instead fail at once ("Connection closed by peer") and write failure records of their own. A blocking rank
whose collective fails that way waits instead, writing nothing, until it is torn down as a NCCL rank would be.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from yolosafe.training.context import RunContext

COLLECTIVE_TIMEOUT = timedelta(minutes=30)
# gloo's error in a collective whose peer is gone (its tcp transport, pair.cc): "Connection closed by peer ...",
# "Connection reset by peer"; what NCCL under blocking wait never raises (it waits for its timeout).
PEER_LOST = re.compile(r"Connection (?:closed|reset) by peer|gloo/transport/tcp")


def peer_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is gloo's failed collective after a peer died (a rank of its own, not this rank's fault)."""
    return isinstance(exc, RuntimeError) and PEER_LOST.search(str(exc)) is not None


class BlockingCollectives:
    """``_do_train``, inside yolosafe's failure record: a collective that failed because a peer died waits, as under
    NCCL with blocking wait, until torchrun's teardown signal ends the process (the default action: no record)."""

    def _do_train(self) -> None:
        try:
            super()._do_train()  # type: ignore[misc]
        except RuntimeError as exc:
            if not peer_lost(exc):
                raise
            print(f"yolosafe (fake GPUs, blocking collectives): pid {os.getpid()} waits in its collective, as under "
                  "NCCL, until torchrun stops it", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)


def blocking(base: type) -> type:
    """``base`` with :class:`BlockingCollectives` in front of it."""
    return type(f"Blocking{base.__name__}", (BlockingCollectives, base), {})


def _cpu_ddp() -> type:
    """DistributedDataParallel for a CPU module: ``device_ids`` must be None there."""
    from torch.nn.parallel import DistributedDataParallel

    class CpuDistributedDataParallel(DistributedDataParallel):
        def __init__(self, module: Any, device_ids: Any = None, *args: Any, **kwargs: Any) -> None:
            super().__init__(module, None, *args, **kwargs)

    return CpuDistributedDataParallel


@contextlib.contextmanager
def _replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name`` is ``value`` for the duration (this process only: every rank is a process of its own)."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


class CpuRankMixin:
    """Changes 2-4 of the module docstring, for a yolosafe trainer running as a CPU rank."""

    run_context: RunContext  # bound to the trainer class (yolosafe.training.trainer.trainer_class)

    def _setup_ddp(self) -> None:
        import torch
        import torch.distributed as dist

        self.device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT, rank=self.run_context.rank.index,
                                world_size=self.world_size)

    def _setup_train(self) -> None:
        import torch.nn.parallel

        with _replaced(torch.nn.parallel, "DistributedDataParallel", _cpu_ddp()):
            super()._setup_train()

    def final_eval(self) -> None:
        import torch
        from ultralytics.engine import validator

        # The validator computes torch.device("cuda", <backend>.current_device()) before it builds AutoBackend: give
        # it an index without asking CUDA, then build AutoBackend on the CPU.
        original = validator.AutoBackend
        with (_replaced(validator, "get_torch_device_backend", lambda _type: _NoCuda),
              _replaced(validator, "AutoBackend", lambda **kw: original(**{**kw, "device": torch.device("cpu")}))):
            super().final_eval()


class _NoCuda:
    """What the validator asks of a rank's device module, answered without CUDA."""

    @staticmethod
    def current_device() -> int:
        return 0


def on_cpu(trainer_class: type) -> type:
    """``trainer_class`` with the CPU-rank changes in front of it."""
    return type(f"Cpu{trainer_class.__name__}", (CpuRankMixin, trainer_class), {})
