"""GPU inventory: the one place in yolosafe that talks to NVML.

Like gpustat and nvitop, NVML is kept behind one small module that initialises lazily, turns a failed NVML query
into a missing value (``None``) instead of a crash, and returns typed records. A machine without an NVIDIA driver is
not an error here: its inventory simply has no GPUs and says why in ``Inventory.problem``.

A fake backend, selected by the environment variable ``YOLOSAFE_FAKE_GPUS``, stands in for NVML on machines without
GPUs (tests, CI, drills). Every command reads it exactly as it reads real NVML, through :func:`open_backend`.
Accepted values (see docs/fake-gpus.md):

- ``4x24GB`` or ``2x24GB,1x80GB``: that many idle GPUs of that size (GB means GiB, as nvidia-smi's MiB do);
- ``none``: a machine with no NVIDIA driver;
- a JSON object, inline or as ``@path/to/spec.json``::

      {"driver": "550.54.15", "cuda": "12.4",
       "gpus": [{"name": "NVIDIA A100", "total_mib": 40960, "used_mib": 13000,
                 "processes": [{"pid": 4242, "used_mib": 13000}]}]}

  Optional per-GPU ``"phase_mib": {"train": 9000, "val": 21000}`` makes the memory of the training processes follow
  the phase the trainer reports (see :class:`FakeBackend`), so tests can script a validation peak; optional
  ``"epoch_mib": {"val": 500}`` adds that much more per (0-based) epoch, so the peak lands on a known epoch; optional
  ``"per_image_mib": {"train": 120, "val": 10}`` adds that much per image of the phase's per-GPU batch (the plan's,
  written in the phase file), so the memory follows fixed + per image x batch as the memory model predicts it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

FAKE_ENV = "YOLOSAFE_FAKE_GPUS"
PHASE_FILE_ENV = "YOLOSAFE_FAKE_PHASE_FILE"
MIB = 1024**2
log = logging.getLogger(__name__)


class GPUReadError(RuntimeError):
    """NVML failed while reading a GPU that the inventory listed (the driver went away, a GPU fell off the bus)."""


class FakeSpecError(ValueError):
    """The value of YOLOSAFE_FAKE_GPUS cannot be understood."""


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

    @property
    def valid(self) -> bool:
        return self.problem is None

    @property
    def free_mib(self) -> float | None:
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
        return tuple(g.index for g in self.gpus)


class GPUBackend(Protocol):
    """What yolosafe needs from NVML; implemented by :class:`NvmlBackend` and :class:`FakeBackend`."""

    name: str

    def inventory(self) -> Inventory: ...

    def read_memory(self, index: int) -> MemoryReading: ...

    def close(self) -> None: ...


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _mib(value: int | None) -> float | None:
    return None if value is None else value / MIB


# NVML errors that say "no driver" or "this driver or card has no such figure": logged at debug level (the inventory
# says it), the others (a lost GPU, an unknown error) as warnings.
_QUIET = {"NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded", "NVMLError_NotSupported",
          "NVMLError_NoPermission", "NVMLError_FunctionNotFound", "NVMLLibraryMismatchError"}
_MISSING = {"absent", "NVMLError_FunctionNotFound", "NVMLLibraryMismatchError"}  # no such function: not asked again
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
        self._handles: dict[int, Any] = {}
        self._missing: set[str] = set()  # functions this nvidia-ml-py or driver lacks: not asked again
        self._logged: set[tuple[str, str]] = set()
        self.failure = ""  # "function: error" of the latest failed query, for the messages that need it

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
        self.failure = f"{name}: {error}"
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
        if index not in self._handles:
            handle = self._query("nvmlDeviceGetHandleByIndex", index)
            if handle is None:
                return None
            self._handles[index] = handle
        return self._handles[index]

    def _processes(self, handle: Any) -> tuple[GPUProcess, ...] | None:
        """Compute and graphics processes (a pid once); None when NVML cannot list them (some drivers, MIG)."""
        found: dict[int, GPUProcess] = {}
        for kind in ("Compute", "Graphics"):
            name = f"nvmlDeviceGet{kind}RunningProcesses"
            procs = self._first((name, f"{name}_v2"), handle)
            if procs is None:
                return None
            found.update((p.pid, GPUProcess(p.pid, _mib(p.usedGpuMemory))) for p in procs)
        return tuple(found.values())

    def _gpu(self, index: int) -> GPU:
        handle = self._handle(index)
        if handle is None:
            return GPU(index, None, None, None, None, None, problem=f"NVML cannot open it ({self.failure})")
        memory = self._query("nvmlDeviceGetMemoryInfo", handle)
        problem = None if memory is not None else f"NVML cannot read its memory ({self.failure})"
        util = self._query("nvmlDeviceGetUtilizationRates", handle)
        mig = self._query("nvmlDeviceGetMigMode", handle)
        return GPU(
            index=index,
            name=_text(self._query("nvmlDeviceGetName", handle)),
            uuid=_text(self._query("nvmlDeviceGetUUID", handle)),
            total_mib=None if memory is None else _mib(memory.total),
            used_mib=None if memory is None else _mib(memory.used),
            utilization=None if util is None else util.gpu,
            processes=self._processes(handle) or (),
            mig=None if mig is None else bool(mig[0]),
            problem=problem,
        )

    def inventory(self) -> Inventory:
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

    def read_memory(self, index: int) -> MemoryReading:
        if not self._init():
            raise GPUReadError(self._problem or "NVML unavailable")
        handle = self._handle(index)
        memory = None if handle is None else self._query("nvmlDeviceGetMemoryInfo", handle)
        if memory is None:
            raise GPUReadError(f"GPU {index}: {self.failure}")
        return MemoryReading(index, _mib(memory.total), _mib(memory.used), self._processes(handle))

    def close(self) -> None:
        if self._ready:
            self._query("nvmlShutdown")
        self._ready, self._handles = None, {}


@dataclass
class FakeGPU:
    """One fake GPU: fixed used memory and processes, plus optional memory that follows the trainer's phase."""

    name: str
    total_mib: float
    used_mib: float = 0.0
    utilization: int = 0
    processes: tuple[GPUProcess, ...] = ()
    phase_mib: dict[str, float] = field(default_factory=dict)
    epoch_mib: dict[str, float] = field(default_factory=dict)
    per_image_mib: dict[str, float] = field(default_factory=dict)


_SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+(?:\.\d+)?)\s*(GB|GIB|MB|MIB)\s*$", re.IGNORECASE)


def _parse_sizes(spec: str) -> list[FakeGPU]:
    gpus: list[FakeGPU] = []
    for group in spec.split(","):
        match = _SIZE.match(group)
        if not match:
            raise FakeSpecError(f"{FAKE_ENV}: cannot read {group.strip()!r}; expected e.g. '4x24GB' or JSON")
        count, size, unit = int(match[1]), float(match[2]), match[3].upper()
        total = size * 1024 if unit in {"GB", "GIB"} else size
        gpus += [FakeGPU(f"Fake GPU {total / 1024:g}GB", total) for _ in range(count)]
    return gpus


def _parse_json(data: Mapping[str, Any]) -> tuple[list[FakeGPU], str, str]:
    try:
        gpus = [
            FakeGPU(
                name=g.get("name", "Fake GPU"),
                total_mib=float(g["total_mib"]),
                used_mib=float(g.get("used_mib", 0)),
                utilization=int(g.get("utilization", 0)),
                processes=tuple(GPUProcess(int(p["pid"]), float(p["used_mib"])) for p in g.get("processes", ())),
                phase_mib={k: float(v) for k, v in g.get("phase_mib", {}).items()},
                epoch_mib={k: float(v) for k, v in g.get("epoch_mib", {}).items()},
                per_image_mib={k: float(v) for k, v in g.get("per_image_mib", {}).items()},
            )
            for g in data.get("gpus", ())
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise FakeSpecError(f"{FAKE_ENV}: bad GPU entry ({exc!r}); each needs at least 'total_mib'") from exc
    return gpus, str(data.get("driver", "fake")), str(data.get("cuda", "fake"))


def fake_phase_file(base: str | Path, gpu: int | None) -> Path:
    """The phase file of one GPU (NVML index), written by the rank on it; ``gpu`` None: the file of a single
    process that stands for every GPU."""
    path = Path(base)
    return path if gpu is None else path.with_name(f"{path.stem}-gpu{gpu}{path.suffix}")


def _pid_alive(pid: int | None) -> bool:
    import psutil

    try:
        return bool(pid) and psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError):
        return False


class FakeBackend:
    """NVML stand-in. Used memory is the spec's ``used_mib`` plus, with ``phase_mib``, the memory of the phase
    currently written (as ``{"phase": "val", "pid": 123, "epoch": 4}``) in the GPU's phase file
    (:func:`fake_phase_file` of ``YOLOSAFE_FAKE_PHASE_FILE``: each rank writes its own GPU's; a single process the
    base file, for every GPU) plus ``epoch_mib`` times the epoch. That memory is attributed to the writer's pid, so it
    counts as the training run's own, and only while that process lives: an exited rank holds no GPU memory."""

    name = "fake"

    def __init__(self, spec: str, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.spec = spec
        self._phase_file = env.get(PHASE_FILE_ENV)
        self._phase_seen: dict[Path, tuple[tuple[int, int, int], tuple[str | None, int | None, int, int]]] = {}
        text = spec.strip()
        self.driver, self.cuda, self.problem = "fake", "fake", None
        if text.lower() == "none":
            self.gpus: list[FakeGPU] = []
            self.driver = self.cuda = None
            self.problem = "no NVIDIA driver (fake: YOLOSAFE_FAKE_GPUS=none)"
        elif text.startswith(("{", "@")):
            try:
                raw = Path(text[1:]).read_text() if text.startswith("@") else text
                data = json.loads(raw)
            except (OSError, json.JSONDecodeError) as exc:
                raise FakeSpecError(f"{FAKE_ENV}: cannot read JSON spec ({exc})") from exc
            self.gpus, self.driver, self.cuda = _parse_json(data)
        else:
            self.gpus = _parse_sizes(text)

    def _phase(self, index: int) -> tuple[str | None, int | None, int, int]:
        """The ``(phase, pid, epoch, batch)`` of GPU ``index`` from a live writer: the rank on it, else a single
        process for every GPU. A file is parsed again only when it changed (the watch reads every GPU many times a
        second). ``batch`` is the phase's per-GPU batch (0 when unknown), for ``per_image_mib``."""
        if not self._phase_file:
            return None, None, 0, 0
        for path in (fake_phase_file(self._phase_file, index), Path(self._phase_file)):
            try:
                stat = os.stat(path)
                key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
                if path not in self._phase_seen or self._phase_seen[path][0] != key:
                    state = json.loads(path.read_text())
                    self._phase_seen[path] = key, (state.get("phase"), state.get("pid"), int(state.get("epoch") or 0),
                                                   int(state.get("batch") or 0))
            except (OSError, ValueError, TypeError, AttributeError):
                continue
            if _pid_alive(self._phase_seen[path][1][1]):
                return self._phase_seen[path][1]
        return None, None, 0, 0

    def _reading(self, index: int) -> MemoryReading:
        gpu = self.gpus[index]
        used, processes = gpu.used_mib, gpu.processes
        phase, pid, epoch, batch = self._phase(index)
        extra = gpu.phase_mib.get(phase, 0.0) + epoch * gpu.epoch_mib.get(phase, 0.0) if phase else 0.0
        if phase and gpu.per_image_mib.get(phase):
            extra += gpu.per_image_mib[phase] * batch
        if extra:
            used += extra
            processes = (*processes, GPUProcess(int(pid or 0), extra))
        return MemoryReading(index, gpu.total_mib, min(used, gpu.total_mib), processes)

    def inventory(self) -> Inventory:
        gpus = []
        for index, gpu in enumerate(self.gpus):
            reading = self._reading(index)
            gpus.append(
                GPU(index, gpu.name, f"GPU-fake-{index:04d}", gpu.total_mib, reading.used_mib, gpu.utilization,
                    reading.processes)
            )
        return Inventory(self.name, tuple(gpus), self.driver, self.cuda, self.problem)

    def read_memory(self, index: int) -> MemoryReading:
        if not 0 <= index < len(self.gpus):
            raise GPUReadError(f"GPU {index}: no such fake GPU")
        return self._reading(index)

    def close(self) -> None:
        """Nothing to release."""


def nvml_index(plan_gpus: Sequence[int], device_index: int | None) -> int | None:
    """The NVML index of a rank's CUDA device: the worker sees exactly the plan's GPUs, in order, so CUDA device i
    is ``plan_gpus[i]``. None when unknown (no device, or a process on the CPU)."""
    if device_index is None or not 0 <= device_index < len(plan_gpus):
        return None
    return plan_gpus[device_index]


def visible_ids(inventory: Inventory, cuda_visible: str | None) -> tuple[int, ...]:
    """The GPUs this process may use, in NVML numbering: all of them, or those ``CUDA_VISIBLE_DEVICES`` names.

    A scheduler (SLURM, Kubernetes) or the user may have set it; yolosafe runs its worker with
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, in which CUDA's numbers are NVML's. Entries are indices or GPU UUIDs; as in
    CUDA, the list ends at the first entry that names no GPU.
    """
    if cuda_visible is None:
        return inventory.ids
    by_uuid = {g.uuid: g.index for g in inventory.gpus if g.uuid}
    ids: list[int] = []
    for item in (part.strip() for part in cuda_visible.split(",")):
        index = int(item) if item.isdigit() else by_uuid.get(item)
        if index is None or index not in inventory.ids:
            break
        ids.append(index)
    return tuple(ids)


def open_backend(env: Mapping[str, str] | None = None) -> GPUBackend:
    """The backend every command uses: the fake when ``YOLOSAFE_FAKE_GPUS`` is set, real NVML otherwise."""
    env = os.environ if env is None else env
    spec = env.get(FAKE_ENV)
    return FakeBackend(spec, env) if spec else NvmlBackend()


def read_inventory(env: Mapping[str, str] | None = None) -> Inventory:
    """One-shot inventory (opens and closes NVML)."""
    backend = open_backend(env)
    try:
        return backend.inventory()
    finally:
        backend.close()
