"""The fake GPU backend: NVML's stand-in on machines without GPUs (tests, CI, drills).

Selected by the environment variable ``YOLOSAFE_FAKE_GPUS``, whose value is a *layout* of fake GPUs, and read by
every command exactly as it reads real NVML (``open_backend``), so the multi-GPU paths run unchanged on a laptop.
Accepted layouts (see docs/fake-gpus.md):

- ``4x24GB`` or ``2x24GB,1x80GB``: that many idle GPUs of that size (GB means GiB, as nvidia-smi's MiB do);
- ``none``: a machine with no NVIDIA driver;
- a JSON object, inline or as ``@path/to/layout.json``::

      {"driver": "550.54.15", "cuda": "12.4",
       "gpus": [{"name": "NVIDIA A100", "total_mib": 40960, "used_mib": 13000,
                 "processes": [{"pid": 4242, "used_mib": 13000}]}]}

  Optional per-GPU ``"phase_mib": {"train": 9000, "val": 21000}`` makes the memory of the training processes follow
  the phase the trainer reports (see :class:`FakeBackend`), so tests can script a validation peak; optional
  ``"epoch_mib": {"val": 500}`` adds that much more per (0-based) epoch, so the peak lands on a known epoch; optional
  ``"per_image_mib": {"train": 120, "val": 10}`` adds that much per image of the phase's per-GPU batch (the plan's,
  written in the phase file), so the memory follows fixed + per image x batch as the memory model predicts it.
  Optional per-GPU ``"mig": [{"uuid": "MIG-...", "total_mib": 9984}]`` puts that GPU in MIG mode with those MIG
  devices; optional per-GPU ``"uuid"`` (default ``GPU-fake-0000``... by index); optional top-level
  ``"host_pids": true`` reports every pid as NVML does inside a container: a pid of the host's PID namespace, which
  no process here has (:data:`HOST_PID_OFFSET` added); optional top-level ``"hidden_pids": true`` lists no process
  at all, as a driver that hides other namespaces' processes does (used memory is still reported); optional
  top-level ``"collectives": "blocking"`` gives the CPU ranks NCCL's semantics under Ultralytics'
  ``TORCH_NCCL_BLOCKING_WAIT=1``: the peers of a failed rank wait in their collective until torchrun tears them down
  (SIGTERM) instead of failing by themselves as gloo's do (``"gloo"``, the default;
  :mod:`yolosafe.training.fake.cpuranks`). With ``"mig"``, :meth:`FakeBackend.read_memory` of a MIG device's UUID
  reads that slice: its total, its ``used_mib`` plus the phase memory of the rank training on it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yolosafe.errors import UsageError
from yolosafe.gpus.inventory import GPU, GPUProcess, GPUReadError, Inventory, MemoryReading

FAKE_ENV = "YOLOSAFE_FAKE_GPUS"
PHASE_FILE_ENV = "YOLOSAFE_FAKE_PHASE_FILE"

# What a GPU's phase file says: (phase, writer's pid, epoch, per-GPU batch).
Phase = tuple[str | None, int | None, int, int]
_NO_PHASE: Phase = (None, None, 0, 0)
HOST_PID_OFFSET = 1 << 23  # above the kernel's largest pid_max (2**22): no process of this namespace has such a pid
COLLECTIVES = ("gloo", "blocking")  # a layout's "collectives": what the peers of a failed rank do
_SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+(?:\.\d+)?)\s*(GB|GIB|MB|MIB)\s*$", re.IGNORECASE)


class FakeGpusError(UsageError):
    """The value of YOLOSAFE_FAKE_GPUS (the fake GPU layout) cannot be understood."""


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
    mig: tuple[GPU, ...] = ()  # MIG devices (MIG mode on when any)
    host_pids: bool = False  # pids as NVML gives them inside a container (the host's namespace)
    hidden_pids: bool = False  # no process listed, as by a driver that hides other namespaces' processes
    uuid: str | None = None  # default GPU-fake-NNNN (its index)


def _mig_devices(index: int, entries: Any) -> tuple[GPU, ...]:
    """The MIG devices of fake GPU ``index`` from the layout's ``"mig"`` list."""
    return tuple(GPU(index, str(m.get("name", "Fake MIG device")), str(m["uuid"]), float(m["total_mib"]),
                     float(m.get("used_mib", 0)), None, mig=True, mig_of=index) for m in entries)


MAX_FAKE_GPUS = 1024  # more than any machine has; a layout past it is a typo (and would cost time to list)


def _parse_sizes(layout: str) -> list[FakeGPU]:
    """Idle GPUs from the short layout, ``2x24GB,1x80GB``: groups in index order."""
    gpus: list[FakeGPU] = []
    for group in layout.split(","):
        match = _SIZE.match(group)
        if not match:
            raise FakeGpusError(f"{FAKE_ENV}: cannot read {group.strip()!r}; expected e.g. '4x24GB' or JSON")
        count, size, unit = int(match[1]), float(match[2]), match[3].upper()
        if not 1 <= count <= MAX_FAKE_GPUS - len(gpus) or size <= 0:
            raise FakeGpusError(f"{FAKE_ENV}: {group.strip()!r}: give 1 to {MAX_FAKE_GPUS} GPUs in all, each of a "
                                "size above 0")
        total = size * 1024 if unit in {"GB", "GIB"} else size
        gpus += [FakeGPU(f"Fake GPU {total / 1024:g}GB", total) for _ in range(count)]
    return gpus


def _number(value: Any, what: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not minimum <= value < 1e12:
        raise FakeGpusError(f"{FAKE_ENV}: {what} is {value!r}; expected a number of at least {minimum:g}")
    return float(value)


def _mib_table(g: Mapping[str, Any], key: str, where: str) -> dict[str, float]:
    table = g.get(key, {})
    if not isinstance(table, dict):
        raise FakeGpusError(f"{FAKE_ENV}: {where} {key} is {table!r}; expected an object like {{\"val\": 500}}")
    return {str(k): _number(v, f"{where} {key}[{k!r}]") for k, v in table.items()}


def _process(p: Any, where: str) -> GPUProcess:
    if not isinstance(p, dict) or "pid" not in p or "used_mib" not in p:
        raise FakeGpusError(f"{FAKE_ENV}: {where} process {p!r}; expected {{\"pid\": 4242, \"used_mib\": 1000}}")
    return GPUProcess(int(_number(p["pid"], f"{where} pid", 1)), _number(p["used_mib"], f"{where} used_mib"))


def _uuid(value: Any, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise FakeGpusError(f"{FAKE_ENV}: {what} is {value!r}; expected text like \"GPU-...\"")
    return value


def _mig_entries(g: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    """The ``"mig"`` list of a GPU entry, each MIG device an object with its ``uuid`` and ``total_mib``."""
    entries = g.get("mig", [])
    if not isinstance(entries, list) or not all(isinstance(m, dict) and isinstance(m.get("uuid"), str)
                                                and "total_mib" in m for m in entries):
        raise FakeGpusError(f"{FAKE_ENV}: {where} mig is {entries!r}; expected a list like "
                            "[{\"uuid\": \"MIG-...\", \"total_mib\": 9984}]")
    for i, m in enumerate(entries):
        _number(m["total_mib"], f"{where} mig[{i}] total_mib", 1)
        _number(m.get("used_mib", 0), f"{where} mig[{i}] used_mib")
    return entries


def _gpu(g: Any, index: int) -> FakeGPU:
    """One GPU entry of the JSON layout, every field of its shape; one line naming what is wrong."""
    where = f"gpus[{index}]"
    if not isinstance(g, dict) or "total_mib" not in g:
        raise FakeGpusError(f"{FAKE_ENV}: {where} is {g!r}; each GPU is an object with at least 'total_mib'")
    name = g.get("name", "Fake GPU")
    if not isinstance(name, str):
        raise FakeGpusError(f"{FAKE_ENV}: {where} name is {name!r}; expected text")
    processes = g.get("processes", [])
    if not isinstance(processes, list):
        raise FakeGpusError(f"{FAKE_ENV}: {where} processes is {processes!r}; expected a list")
    return FakeGPU(
        name=name,
        total_mib=_number(g["total_mib"], f"{where} total_mib", 1),
        used_mib=_number(g.get("used_mib", 0), f"{where} used_mib"),
        utilization=int(_number(g.get("utilization", 0), f"{where} utilization")),
        processes=tuple(_process(p, where) for p in processes),
        phase_mib=_mib_table(g, "phase_mib", where),
        epoch_mib=_mib_table(g, "epoch_mib", where),
        per_image_mib=_mib_table(g, "per_image_mib", where),
        mig=_mig_devices(index, _mig_entries(g, where)),
        uuid=_uuid(g.get("uuid"), f"{where} uuid"),
    )


def _parse_json(data: Any) -> tuple[list[FakeGPU], str, str]:
    """GPUs, driver and CUDA version from the JSON layout; a bad entry is one :class:`FakeGpusError`."""
    if not isinstance(data, dict):
        raise FakeGpusError(f"{FAKE_ENV}: its JSON layout is a {type(data).__name__}; expected an object with "
                            "\"gpus\": [...]")
    entries = data.get("gpus", [])
    if not isinstance(entries, list) or len(entries) > MAX_FAKE_GPUS:
        raise FakeGpusError(f"{FAKE_ENV}: \"gpus\" must be a list of at most {MAX_FAKE_GPUS} GPU objects")
    return [_gpu(g, i) for i, g in enumerate(entries)], str(data.get("driver", "fake")), str(data.get("cuda", "fake"))


@dataclass(frozen=True)
class FakeLayout:
    """What a ``YOLOSAFE_FAKE_GPUS`` value describes: the GPUs, driver and CUDA version, the "no driver" problem, and
    the collectives' semantics (:data:`COLLECTIVES`)."""

    gpus: list[FakeGPU]
    driver: str | None
    cuda: str | None
    problem: str | None = None
    collectives: str = "gloo"


def _collectives(data: Mapping[str, Any]) -> str:
    value = data.get("collectives", "gloo")
    if value not in COLLECTIVES:
        raise FakeGpusError(f"{FAKE_ENV}: collectives is {value!r}; expected one of {', '.join(COLLECTIVES)}")
    return str(value)


def read_layout(layout: str) -> FakeLayout:
    """The :class:`FakeLayout` of a ``YOLOSAFE_FAKE_GPUS`` value. Raises :class:`FakeGpusError` (each command turns
    it into one line) for a value it cannot read."""
    text = layout.strip()
    if text.lower() == "none":
        return FakeLayout([], None, None, "no NVIDIA driver (fake: YOLOSAFE_FAKE_GPUS=none)")
    if text.startswith(("{", "@")):
        try:
            raw = Path(text[1:]).read_text(encoding="utf-8") if text.startswith("@") else text
            data = json.loads(raw)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else " ".join(str(exc).split())[:200]
            raise FakeGpusError(f"{FAKE_ENV}: cannot read its JSON layout ({reason})") from None
        gpus, driver, cuda = _parse_json(data)
        for gpu in gpus if data.get("hidden_pids") else ():
            gpu.hidden_pids = True
        if data.get("host_pids"):
            for gpu in gpus:
                gpu.host_pids = True
                gpu.processes = tuple(GPUProcess(p.pid + HOST_PID_OFFSET, p.used_mib) for p in gpu.processes)
        return FakeLayout(gpus, driver, cuda, None, _collectives(data))
    return FakeLayout(_parse_sizes(text), "fake", "fake")


def blocking_collectives(env: Mapping[str, str]) -> bool:
    """Whether the fake GPUs of ``env`` give the ranks NCCL's blocking collectives (a layout's
    ``"collectives": "blocking"``)."""
    layout = env.get(FAKE_ENV)
    return bool(layout) and read_layout(layout).collectives == "blocking"


def fake_phase_file(base: str | Path, gpu: int | None) -> Path:
    """The phase file of one GPU (NVML index), written by the rank on it; ``gpu`` None: the file of a single
    process that stands for every GPU."""
    path = Path(base)
    return path if gpu is None else path.with_name(f"{path.stem}-gpu{gpu}{path.suffix}")


def _pid_alive(pid: int | None) -> bool:
    """Whether the phase file's writer still runs: an exited (or zombie) rank holds no GPU memory."""
    import psutil

    try:
        return bool(pid) and psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError):
        return False


class FakeBackend:
    """NVML stand-in. Used memory is the layout's ``used_mib`` plus, with ``phase_mib``, the memory of the phase
    currently written (as ``{"phase": "val", "pid": 123, "epoch": 4}``) in the GPU's phase file
    (:func:`fake_phase_file` of ``YOLOSAFE_FAKE_PHASE_FILE``: each rank writes its own GPU's; a single process the
    base file, for every GPU) plus ``epoch_mib`` times the epoch. That memory is attributed to the writer's pid, so it
    counts as the training run's own, and only while that process lives: an exited rank holds no GPU memory."""

    name = "fake"

    def __init__(self, layout: str, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.layout = layout
        self._phase_file = env.get(PHASE_FILE_ENV)
        self._phase_seen: dict[Path, tuple[tuple[int, int, int], Phase]] = {}
        read = read_layout(layout)
        self.gpus, self.driver, self.cuda, self.problem = read.gpus, read.driver, read.cuda, read.problem

    def _phase(self, index: int) -> Phase:
        """The ``(phase, pid, epoch, batch)`` of GPU ``index`` from a live writer: the rank on it, else a single
        process for every GPU. A file is parsed again only when it changed (the watch reads every GPU many times a
        second). ``batch`` is the phase's per-GPU batch (0 when unknown), for ``per_image_mib``."""
        if not self._phase_file:
            return _NO_PHASE
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
        return _NO_PHASE

    def _reading(self, index: int, mig: str | None = None) -> MemoryReading:
        """GPU ``index``'s memory now: the layout's, plus the phase's memory held by the phase file's live writer; of
        its MIG device ``mig`` (the slice the run trains on, where that memory lands), that device's."""
        gpu = self.gpus[index]
        used, processes, total = gpu.used_mib, gpu.processes, gpu.total_mib
        if mig is not None:
            device = next((m for m in gpu.mig if m.uuid == mig), None)
            if device is None:
                raise GPUReadError(f"GPU {index} has no MIG device {mig}")
            used, processes, total = device.used_mib or 0.0, (), device.total_mib or 0.0
        phase, pid, epoch, batch = self._phase(index)
        extra = gpu.phase_mib.get(phase, 0.0) + epoch * gpu.epoch_mib.get(phase, 0.0) if phase else 0.0
        if phase and gpu.per_image_mib.get(phase):
            extra += gpu.per_image_mib[phase] * batch
        if extra:
            used += extra
            own = int(pid or 0) + (HOST_PID_OFFSET if gpu.host_pids else 0)  # as NVML names it from a container
            processes = (*processes, GPUProcess(own, extra))
        return MemoryReading(index, total, min(used, total), () if gpu.hidden_pids else processes)

    def inventory(self) -> Inventory:
        """Every fake GPU, as NVML would list it (UUIDs ``GPU-fake-0000``...), its memory as of now."""
        gpus = []
        for index, gpu in enumerate(self.gpus):
            reading = self._reading(index)
            gpus.append(
                GPU(index, gpu.name, gpu.uuid or f"GPU-fake-{index:04d}", gpu.total_mib, reading.used_mib,
                    gpu.utilization, reading.processes, mig=True if gpu.mig else None, mig_devices=gpu.mig)
            )
        return Inventory(self.name, tuple(gpus), self.driver, self.cuda, self.problem)

    def read_memory(self, index: int, mig: str | None = None) -> MemoryReading:
        """One GPU's memory (``mig``: its MIG device's), for the watch; an index beyond the layout fails as a lost
        GPU would."""
        if not 0 <= index < len(self.gpus):
            raise GPUReadError(f"GPU {index}: no such fake GPU")
        return self._reading(index, mig)

    def close(self) -> None:
        """Nothing to release."""
