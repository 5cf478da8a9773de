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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from yolosafe.training.context import RunContext

COLLECTIVE_TIMEOUT = timedelta(minutes=30)


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
