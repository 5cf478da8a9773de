"""The real NVML backend, through nvidia-ml-py: the only code in yolosafe that calls NVML.

Like gpustat and nvitop, NVML is kept behind one small class that initialises lazily, turns a failed NVML query into
a missing value (``None``) instead of a crash, and returns typed records (inventory.py). A machine without an NVIDIA
driver is not an error here: its inventory simply has no GPUs and says why in ``Inventory.problem``. How this is
tested without a GPU (nvidia-ml-py's own functions over a faked shared library): docs/nvml.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from yolosafe.gpus.inventory import GPU, MIB, GPUProcess, GPUReadError, Inventory, MemoryReading

log = logging.getLogger(__name__)


def _text(value: Any) -> str | None:
    """NVML text as ``str``: older nvidia-ml-py versions return ``bytes``, newer ones ``str``."""
    return value.decode() if isinstance(value, bytes) else value


def _mib(value: int | None) -> float | None:
    """NVML's bytes as MiB, the unit nvidia-smi and every yolosafe record use; None (unknown) stays None."""
    return None if value is None else value / MIB


# NVML errors that say "no driver" or "this driver or card has no such figure": logged at debug level (the inventory
# says it), the others (a lost GPU, an unknown error) as warnings.
_QUIET = frozenset({"NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded", "NVMLError_NotSupported",
                    "NVMLError_NoPermission", "NVMLError_FunctionNotFound", "NVMLLibraryMismatchError",
                    "NVMLError_NotFound"})  # NotFound: an empty MIG slot
# No such function (in nvidia-ml-py, or as a C symbol in this driver): not asked again.
_MISSING = frozenset({"absent", "NVMLError_FunctionNotFound", "NVMLLibraryMismatchError"})
_FAILED = object()  # what _query returns for a failed call that returns nothing when it succeeds (nvmlInit)


class NvmlBackend:
    """Real NVML through nvidia-ml-py. Initialises on first use; a missing driver becomes ``Inventory.problem``.

    Every NVML call goes through :meth:`_query` (nvitop's ``nvmlQuery``): the function is looked up by name, and a
    name this nvidia-ml-py lacks, a C symbol this driver lacks or any NVML error is a missing value, logged once per
    function and error. A GPU that cannot be read stays in the inventory as an invalid record (gpustat's
    ``InvalidGPU``), so ``--gpus`` keeps NVML's numbering and the user sees why.
    """

    name = "nvml"

    def __init__(self) -> None:
        self._ready: bool | None = None
        self._problem: str | None = None
        self._handles: dict[Any, Any] = {}  # NVML index, or (index, MIG UUID)
        self._missing: set[str] = set()  # functions this nvidia-ml-py or driver lacks: not asked again
        self._logged: set[tuple[str, str]] = set()
        self.failure = ""  # "function: error" of the latest failed query, for the messages that need it
        self.failure_kind = ""  # its NVML error class name

    def _query(self, name: str, *args: Any, default: Any = None) -> Any:
        """``pynvml.<name>(*args)``, or ``default`` when the function is missing or NVML fails."""
        import pynvml

        if name in self._missing:
            return default
        function = getattr(pynvml, name, None)
        if function is None:
            error, kind = "nvidia-ml-py has no such function", "absent"
        else:
            try:
                return function(*args)
            except (pynvml.NVMLError, getattr(pynvml, "NVMLLibraryMismatchError", pynvml.NVMLError)) as exc:
                error, kind = str(exc) or type(exc).__name__, type(exc).__name__
        if kind in _MISSING:
            self._missing.add(name)
        self.failure, self.failure_kind = f"{name}: {error}", kind
        if (name, error) not in self._logged:
            self._logged.add((name, error))
            log.log(logging.DEBUG if kind in _QUIET else logging.WARNING, "NVML %s", self.failure)
        return default

    def _first(self, names: Sequence[str], *args: Any) -> Any:
        """The first of ``names`` (newest first) that this nvidia-ml-py and driver have: nvidia-ml-py's unversioned
        process functions call only the newest C symbol (``_v3``), which older drivers lack."""
        for name in names:
            value = self._query(name, *args)
            if name not in self._missing:
                return value
        return None

    def _init(self) -> bool:
        """Initialise NVML once, on first use (a command that never reads a GPU never loads the library); False,
        with ``_problem`` saying why, when there is no nvidia-ml-py or no driver."""
        if self._ready is None:
            try:
                import pynvml  # noqa: F401
            except ImportError:
                self._ready, self._problem = False, "nvidia-ml-py is not installed"
                return False
            self._ready = self._query("nvmlInit", default=_FAILED) is not _FAILED
            self._problem = None if self._ready else f"no NVIDIA driver ({self.failure})"
        return self._ready

    def _handle(self, index: int) -> Any:
        """The NVML handle of GPU ``index``, cached (the watch reads every GPU many times a second); None when NVML
        cannot open it. A failure is not cached, so a GPU that comes back is read again."""
        if index not in self._handles:
            handle = self._query("nvmlDeviceGetHandleByIndex", index)
            if handle is None:
                return None
            self._handles[index] = handle
        return self._handles[index]

    def _processes(self, handle: Any, graphics: bool = True) -> tuple[GPUProcess, ...] | None:
        """Compute and (``graphics``) graphics processes (a pid once); None when NVML cannot list them (some drivers,
        MIG). The watch asks the compute list alone: CUDA's processes, training's included, are compute processes."""
        found: dict[int, GPUProcess] = {}
        for kind in ("Compute", "Graphics") if graphics else ("Compute",):
            name = f"nvmlDeviceGet{kind}RunningProcesses"
            procs = self._first((name, f"{name}_v2"), handle)
            if procs is None:
                return None
            found.update((p.pid, GPUProcess(p.pid, _mib(p.usedGpuMemory))) for p in procs)
        return tuple(found.values())

    def _gpu(self, index: int) -> GPU:
        """GPU ``index`` with every figure NVML gives; one it cannot open or whose memory it cannot read is an
        invalid record (``problem`` says why), kept so that the numbering stays NVML's."""
        handle = self._handle(index)
        if handle is None:
            return GPU(index, None, None, None, None, None, problem=f"NVML cannot open it ({self.failure})",
                       openable=self.failure_kind != "NVMLError_NoPermission")
        memory = self._query("nvmlDeviceGetMemoryInfo", handle)
        problem = None if memory is not None else f"NVML cannot read its memory ({self.failure})"
        util = self._query("nvmlDeviceGetUtilizationRates", handle)
        mig = self._query("nvmlDeviceGetMigMode", handle)
        mig_on = None if mig is None else bool(mig[0])
        return GPU(
            index=index,
            name=_text(self._query("nvmlDeviceGetName", handle)),
            uuid=_text(self._query("nvmlDeviceGetUUID", handle)),
            total_mib=None if memory is None else _mib(memory.total),
            used_mib=None if memory is None else _mib(memory.used),
            utilization=None if util is None else util.gpu,
            processes=self._processes(handle) or (),
            mig=mig_on,
            problem=problem,
            mig_devices=self._mig_devices(index, handle) if mig_on else (),
        )

    def _mig_devices(self, index: int, handle: Any) -> tuple[GPU, ...]:
        """The MIG devices of GPU ``index`` (MIG on): each slot's device handle, its UUID (``MIG-...``, what
        ``CUDA_VISIBLE_DEVICES`` names) and its own memory. An empty slot (NVML: not found) is skipped."""
        found = []
        for slot in range(self._query("nvmlDeviceGetMaxMigDeviceCount", handle) or 0):
            mig = self._query("nvmlDeviceGetMigDeviceHandleByIndex", handle, slot)
            if mig is None:
                continue
            memory = self._query("nvmlDeviceGetMemoryInfo", mig)
            found.append(GPU(
                index=index,
                name=_text(self._query("nvmlDeviceGetName", mig)),
                uuid=_text(self._query("nvmlDeviceGetUUID", mig)),
                total_mib=None if memory is None else _mib(memory.total),
                used_mib=None if memory is None else _mib(memory.used),
                utilization=None,
                mig=True,
                problem=None if memory is not None else f"NVML cannot read its memory ({self.failure})",
                mig_of=index,
            ))
        return tuple(found)

    def inventory(self) -> Inventory:
        """Every GPU NVML counts, the driver and CUDA versions; no GPUs and ``problem`` when there is no driver."""
        if not self._init():
            return Inventory(self.name, problem=self._problem)
        count = self._query("nvmlDeviceGetCount")
        problem = f"NVML cannot count the GPUs ({self.failure})" if count is None else "NVML found no GPU"
        gpus = tuple(self._gpu(index) for index in range(count or 0))
        cuda = self._first(("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion"))
        return Inventory(
            self.name,
            gpus=gpus,
            driver=_text(self._query("nvmlSystemGetDriverVersion")),
            cuda=f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None,
            problem=None if gpus else problem,
        )

    def _mig_handle(self, index: int, uuid: str) -> Any:
        """The handle of GPU ``index``'s MIG device ``uuid``, found among its slots and cached; None when NVML cannot
        open it (a failure is not cached)."""
        if (index, uuid) not in self._handles:
            parent = self._handle(index)
            slots = 0 if parent is None else self._query("nvmlDeviceGetMaxMigDeviceCount", parent) or 0
            for slot in range(slots):
                mig = self._query("nvmlDeviceGetMigDeviceHandleByIndex", parent, slot)
                if mig is not None and _text(self._query("nvmlDeviceGetUUID", mig)) == uuid:
                    self._handles[(index, uuid)] = mig
                    break
            else:
                if parent is not None:
                    self.failure = f"GPU {index} has no MIG device {uuid}"
                return None
        return self._handles[(index, uuid)]

    def read_memory(self, index: int, mig: str | None = None) -> MemoryReading:
        """Memory and compute processes of one GPU (``mig``: of its MIG device of that UUID, the slice the run trains
        on), for the watch's samples: only the calls a sample needs, two per device. Raises :class:`GPUReadError`
        (the watch reports it and goes on with the other GPUs) when the memory is unreadable."""
        if not self._init():
            raise GPUReadError(self._problem or "NVML unavailable")
        handle = self._handle(index) if mig is None else self._mig_handle(index, mig)
        memory = None if handle is None else self._query("nvmlDeviceGetMemoryInfo", handle)
        if memory is None:
            raise GPUReadError(f"GPU {index}{'' if mig is None else f' ({mig})'}: {self.failure}")
        return MemoryReading(index, _mib(memory.total), _mib(memory.used), self._processes(handle, graphics=False))

    def close(self) -> None:
        """Shut NVML down if it was initialised; the next use initialises it again (and opens handles afresh)."""
        if self._ready:
            self._query("nvmlShutdown")
        self._ready, self._handles = None, {}
