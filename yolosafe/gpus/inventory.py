"""The typed records both GPU backends return, and the protocol they share.

The rest of yolosafe sees GPUs only through these records, never through NVML's objects: a figure NVML cannot give
is ``None`` (not zero, not an exception), so a planner, the watch or the doctor can tell "unknown" from "empty".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from yolosafe.errors import YolosafeError

MIB = 1024**2


BUSY_MIB = 1024.0  # other processes' memory on a GPU above which it counts as busy: left out, named, advised against


class GPUReadError(YolosafeError, RuntimeError):
    """NVML failed while reading a GPU that the inventory listed (the driver went away, a GPU fell off the bus)."""


@dataclass(frozen=True)
class GPUProcess:
    """A compute process on a GPU. ``used_mib`` is None where NVML cannot say (some containers, MIG)."""

    pid: int
    used_mib: float | None


@dataclass(frozen=True)
class MemoryReading:
    """What the memory sampler needs from one GPU, read cheaply many times a second."""

    index: int
    total_mib: float | None
    used_mib: float | None
    processes: tuple[GPUProcess, ...] | None = ()  # None: NVML cannot list them (some drivers, MIG)


@dataclass(frozen=True)
class GPU:
    """One GPU as ``yolosafe gpus`` shows it."""

    index: int
    name: str | None
    uuid: str | None
    total_mib: float | None
    used_mib: float | None
    utilization: int | None
    processes: tuple[GPUProcess, ...] = ()
    mig: bool | None = None  # MIG mode on; None where NVML cannot say (GPUs without MIG)
    problem: str | None = None  # why NVML cannot read this GPU; None for a valid GPU
    mig_devices: tuple[GPU, ...] = ()  # with MIG on: its MIG devices (slices), each with its own UUID and memory
    mig_of: int | None = None  # a MIG device: the NVML index of its GPU (``index`` is the same)
    openable: bool = True  # False: NVML lists it but this process may not open it (cgroup device limits); CUDA's
                           # indices count only the GPUs a process may open

    @property
    def valid(self) -> bool:
        """Whether NVML could read it: an invalid GPU stays listed (NVML's numbering) but cannot be trained on."""
        return self.problem is None

    @property
    def free_mib(self) -> float | None:
        """Total minus used; None when either is unknown, so an unreadable GPU never looks empty."""
        if self.total_mib is None or self.used_mib is None:
            return None
        return self.total_mib - self.used_mib

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, free memory included (``yolosafe gpus --json``, yolosafe.json)."""
        return {**asdict(self), "free_mib": self.free_mib}


@dataclass(frozen=True)
class Inventory:
    """The GPUs of this machine, the driver and CUDA versions, and why there are none when there are none."""

    backend: str
    gpus: tuple[GPU, ...] = ()
    driver: str | None = None
    cuda: str | None = None
    problem: str | None = None

    @property
    def ids(self) -> tuple[int, ...]:
        """The NVML indices of every listed GPU, invalid ones included (``--gpus`` numbers them so)."""
        return tuple(g.index for g in self.gpus)


class GPUBackend(Protocol):
    """What yolosafe needs from NVML; implemented by ``NvmlBackend`` (nvml.py) and ``FakeBackend`` (fake.py)."""

    name: str

    def inventory(self) -> Inventory:
        """Every GPU with all its figures; never raises for a missing driver (``Inventory.problem`` says it)."""

    def read_memory(self, index: int, mig: str | None = None) -> MemoryReading:
        """One GPU's memory, cheaply; raises :class:`GPUReadError` when it cannot be read (the watch goes on).
        ``mig``: the UUID of the MIG device of GPU ``index`` to read instead (its own memory and processes)."""

    def close(self) -> None:
        """Release what the backend opened; a later call opens it again."""


def nvml_index(plan_gpus: Sequence[int], device_index: int | None) -> int | None:
    """The NVML index of a rank's CUDA device: the worker sees exactly the plan's GPUs, in order, so CUDA device i
    is ``plan_gpus[i]``. None when unknown (no device, or a process on the CPU)."""
    if device_index is None or not 0 <= device_index < len(plan_gpus):
        return None
    return plan_gpus[device_index]
