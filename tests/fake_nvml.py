"""A fake NVIDIA driver: the C functions of ``libnvidia-ml.so``, as ctypes callbacks, served from a list of GPU dicts.

Only the shared library is replaced: nvidia-ml-py loads it into ``pynvml.nvmlLib`` and looks every C symbol up with
``getattr(nvmlLib, name)`` (``_nvmlGetFunctionPointer``). :class:`FakeLib` is that object, so nvidia-ml-py's own
Python functions run unchanged: their names, their ctypes structures (a callback's ``argtypes`` are the real pynvml
types, so ctypes rejects a wrapper that passes the wrong structure), their return-code checks, error classes and
``INSUFFICIENT_SIZE`` retry. A symbol left out of the library is one the driver lacks: nvidia-ml-py turns it into
``NVML_ERROR_FUNCTION_NOT_FOUND`` itself.

A GPU is a dict: ``name``, ``uuid``, ``total_mib``, ``used_mib``, ``util`` (percent), ``processes`` and
``graphics`` (lists of ``(pid, used_mib)``, ``used_mib`` None for NVML_VALUE_NOT_AVAILABLE), ``spawn`` (processes
that start between nvidia-ml-py's sizing call and its second call), ``mig`` (MIG mode on), ``mig_devices`` (with MIG
on: the slots of its MIG devices, each a dict ``name``, ``uuid``, ``total_mib``, ``used_mib``, ``processes``, or None
for an empty slot; ``nvmlDeviceGetMaxMigDeviceCount`` is their number), ``lost`` (every call
answers NVML_ERROR_GPU_IS_LOST; may be set mid-run) and ``errors`` (C symbol -> NVML return code for that GPU, e.g.
``{"nvmlDeviceGetUtilizationRates": NOT_SUPPORTED}``).
"""

from __future__ import annotations

import ctypes
import traceback
from collections.abc import Callable, Iterable
from ctypes import POINTER, c_char, c_int, c_uint
from typing import Any

import pynvml

SUCCESS = pynvml.NVML_SUCCESS
NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
NO_PERMISSION = pynvml.NVML_ERROR_NO_PERMISSION
GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST
DRIVER_NOT_LOADED = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
UNKNOWN = pynvml.NVML_ERROR_UNKNOWN
MIB = 1024**2
HANDLE_BASE = 0x5A000  # handle of GPU i: HANDLE_BASE + 16 * i (opaque to nvidia-ml-py, never dereferenced)
MIG_BASE = 0x7A000  # handle of GPU i's MIG device in slot j: MIG_BASE + 16 * (8 * i + j)
PROCESS_LISTS = [f"nvmlDeviceGet{kind}RunningProcesses{v}" for kind in ("Compute", "Graphics") for v in ("_v2", "_v3")]

Device = pynvml.c_nvmlDevice_t
Text = POINTER(c_char)


def gpu(index: int = 0, total_mib: int = 24576, used_mib: int = 0, **extra: Any) -> dict[str, Any]:
    """One GPU dict with sensible defaults."""
    return {"name": f"NVIDIA Fake {index}", "uuid": f"GPU-fake-nvml-{index:04d}", "total_mib": total_mib,
            "used_mib": used_mib, "util": 7, "processes": [], "graphics": [], "spawn": [], "mig": False,
            "mig_devices": [], "lost": False, "errors": {}} | extra


def mig_device(parent: int, slot: int, total_mib: int = 9984, used_mib: int = 0, profile: str = "1g.10gb",
               processes: list[tuple[int, int | None]] | None = None) -> dict:
    """One MIG device dict (a slice of GPU ``parent``), UUID in the ``MIG-...`` form CUDA_VISIBLE_DEVICES takes;
    ``processes`` run on that slice (its own compute list, as NVML gives it for a MIG device handle)."""
    return {"name": f"NVIDIA Fake MIG {profile}", "uuid": f"MIG-fake-{parent:02d}{slot:02d}-0000-0000-000000000000",
            "total_mib": total_mib, "used_mib": used_mib, "processes": list(processes or []), "graphics": [],
            "spawn": []}


class Driver:
    """What the fake library answers. ``calls`` counts C calls per symbol; ``crashes`` holds any exception raised
    inside a callback (ctypes would print it and return 0, NVML_SUCCESS: tests must check it stays empty)."""

    def __init__(self, gpus: Iterable[dict[str, Any]] = (), missing: Iterable[str] = (),
                 init_error: int = SUCCESS, driver: str = "580.95.05", cuda: int = 13000) -> None:
        self.gpus, self.missing, self.init_error = list(gpus), set(missing), init_error
        self.driver, self.cuda = driver, cuda
        self.calls: dict[str, int] = {}
        self.crashes: list[str] = []

    def device(self, name: str, handle: Any) -> tuple[dict[str, Any] | None, int]:
        """The GPU behind a handle and the return code the call gets before doing anything."""
        address = ctypes.cast(handle, ctypes.c_void_p).value or 0
        if address >= MIG_BASE:  # a MIG device: its own memory, name and UUID; its GPU's state
            (index, slot), rest = divmod(divmod(address - MIG_BASE, 16)[0], 8), (address - MIG_BASE) % 16
            parent = self.gpus[index] if not rest and 0 <= index < len(self.gpus) else None
            slots = parent["mig_devices"] if parent else []
            if parent is None or slot >= len(slots) or slots[slot] is None:
                return None, pynvml.NVML_ERROR_INVALID_ARGUMENT
            return slots[slot], GPU_IS_LOST if parent["lost"] else parent["errors"].get(name, SUCCESS)
        index, rest = divmod(address - HANDLE_BASE, 16)
        if rest or not 0 <= index < len(self.gpus):
            return None, pynvml.NVML_ERROR_INVALID_ARGUMENT
        g = self.gpus[index]
        return g, GPU_IS_LOST if g["lost"] else g["errors"].get(name, SUCCESS)


def _write_text(buffer: Any, size: int, text: str) -> int:
    data = text.encode() + b"\0"
    if len(data) > size:
        return pynvml.NVML_ERROR_INSUFFICIENT_SIZE
    ctypes.memmove(buffer, data, len(data))
    return SUCCESS


def _functions(d: Driver) -> dict[str, tuple[tuple[Any, ...], Callable[..., int]]]:
    """C symbol -> (argument types, implementation returning an NVML return code)."""

    def on_device(name: str, then: Callable[..., int]) -> Callable[..., int]:
        def call(handle: Any, *args: Any) -> int:
            g, ret = d.device(name, handle)
            return ret if ret != SUCCESS or g is None else then(g, *args)
        return call

    def handle_by_index(index: int, out: Any) -> int:
        if index >= len(d.gpus):
            return pynvml.NVML_ERROR_INVALID_ARGUMENT
        g = d.gpus[index]
        ret = GPU_IS_LOST if g["lost"] else g["errors"].get("nvmlDeviceGetHandleByIndex_v2", SUCCESS)
        if ret == SUCCESS:
            out[0] = ctypes.cast(HANDLE_BASE + 16 * index, Device)
        return ret

    def memory(g: dict[str, Any], out: Any) -> int:
        total, used = g["total_mib"] * MIB, g["used_mib"] * MIB
        out[0].total, out[0].used, out[0].free = total, used, total - used
        return SUCCESS

    def utilization(g: dict[str, Any], out: Any) -> int:
        out[0].gpu, out[0].memory = g["util"], g["util"]
        return SUCCESS

    def mig_mode(g: dict[str, Any], current: Any, pending: Any) -> int:
        current[0] = pending[0] = int(g["mig"])
        return SUCCESS

    def processes(key: str) -> Callable[..., int]:
        def call(g: dict[str, Any], count: Any, infos: Any) -> int:
            procs = g[key]
            if not infos or count[0] < len(procs):  # the C contract: say how many, fill nothing
                count[0] = len(procs)
                if key == "processes" and g["spawn"]:  # they start between the sizing call and the second call
                    procs += g["spawn"]
                    g["spawn"] = []
                return pynvml.NVML_ERROR_INSUFFICIENT_SIZE if count[0] else SUCCESS
            for i, (pid, used_mib) in enumerate(procs):
                used = pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value if used_mib is None else used_mib * MIB
                infos[i].pid, infos[i].usedGpuMemory, infos[i].gpuInstanceId, infos[i].computeInstanceId = (
                    pid, used, 0xFFFFFFFF, 0xFFFFFFFF)
            count[0] = len(procs)
            return SUCCESS
        return call

    def mig_count(g: dict[str, Any], out: Any) -> int:
        if not g["mig"]:
            return NOT_SUPPORTED
        out[0] = len(g["mig_devices"])
        return SUCCESS

    def mig_handle(g: dict[str, Any], slot: int, out: Any) -> int:
        if not g["mig"]:
            return NOT_SUPPORTED
        if slot >= len(g["mig_devices"]) or g["mig_devices"][slot] is None:
            return pynvml.NVML_ERROR_NOT_FOUND
        out[0] = ctypes.cast(MIG_BASE + 16 * (8 * d.gpus.index(g) + slot), Device)
        return SUCCESS

    def scalar(value: Callable[[], int]) -> Callable[[Any], int]:
        def call(out: Any) -> int:
            out[0] = value()
            return SUCCESS
        return call

    proc_args = (Device, POINTER(c_uint), POINTER(pynvml.c_nvmlProcessInfo_v2_t))
    table: dict[str, tuple[tuple[Any, ...], Callable[..., int]]] = {
        "nvmlInitWithFlags": ((c_uint,), lambda flags: d.init_error),
        "nvmlShutdown": ((), lambda: SUCCESS),
        "nvmlSystemGetDriverVersion": ((Text, c_uint), lambda buf, size: _write_text(buf, size, d.driver)),
        "nvmlSystemGetCudaDriverVersion": ((POINTER(c_int),), scalar(lambda: d.cuda)),
        "nvmlSystemGetCudaDriverVersion_v2": ((POINTER(c_int),), scalar(lambda: d.cuda)),
        "nvmlDeviceGetCount_v2": ((POINTER(c_uint),), scalar(lambda: len(d.gpus))),
        "nvmlDeviceGetHandleByIndex_v2": ((c_uint, POINTER(Device)), handle_by_index),
        "nvmlDeviceGetMemoryInfo": ((Device, POINTER(pynvml.c_nvmlMemory_t)), memory),
        "nvmlDeviceGetUtilizationRates": ((Device, POINTER(pynvml.c_nvmlUtilization_t)), utilization),
        "nvmlDeviceGetMigMode": ((Device, POINTER(c_uint), POINTER(c_uint)), mig_mode),
        "nvmlDeviceGetMaxMigDeviceCount": ((Device, POINTER(c_uint)), mig_count),
        "nvmlDeviceGetMigDeviceHandleByIndex": ((Device, c_uint, POINTER(Device)), mig_handle),
        "nvmlDeviceGetName": ((Device, Text, c_uint), lambda g, buf, size: _write_text(buf, size, g["name"])),
        "nvmlDeviceGetUUID": ((Device, Text, c_uint), lambda g, buf, size: _write_text(buf, size, g["uuid"])),
    }
    for name in PROCESS_LISTS:
        table[name] = (proc_args, processes("processes" if "Compute" in name else "graphics"))
    device_first = {name for name, (args, _) in table.items() if args[:1] == (Device,)}
    return {name: (args, on_device(name, fn) if name in device_first else fn) for name, (args, fn) in table.items()}


class FakeLib:
    """Stands for the loaded ``libnvidia-ml.so.1``: one ctypes C function per symbol the driver has."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        for name, (argtypes, implementation) in _functions(driver).items():
            if name not in driver.missing:
                setattr(self, name, ctypes.CFUNCTYPE(c_int, *argtypes)(self._guard(name, implementation)))

    def _guard(self, name: str, implementation: Callable[..., int]) -> Callable[..., int]:
        def call(*args: Any) -> int:
            self.driver.calls[name] = self.driver.calls.get(name, 0) + 1
            try:
                return implementation(*args)
            except Exception:
                self.driver.crashes.append(f"{name}: {traceback.format_exc()}")
                return UNKNOWN
        return call


def _no_library(*args: Any, **kwargs: Any) -> Any:
    raise OSError("libnvidia-ml.so.1: cannot open shared object file (fake: no driver installed)")


def install(monkeypatch: Any, driver: Driver | None) -> None:
    """Serve nvidia-ml-py from ``driver`` (None: a machine without the library). Only names nvidia-ml-py has are
    patched (``monkeypatch.setattr`` raises on any other), and ``CDLL`` never loads a real library, even on a GPU
    machine. The function-pointer cache starts empty, as in a fresh process."""
    monkeypatch.setattr(pynvml, "CDLL", _no_library)
    monkeypatch.setattr(pynvml, "nvmlLib", None if driver is None else FakeLib(driver))
    monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer_cache", {})
    monkeypatch.setattr(pynvml, "_nvmlLib_refcount", 0)
