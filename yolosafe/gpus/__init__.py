"""GPU inventory: the one place in yolosafe that talks to NVML.

Every command reads GPUs through :func:`open_backend` and gets the typed records of ``inventory.py``, whichever
backend stands behind it:

- ``nvml.py``: real NVML through nvidia-ml-py, initialised lazily, every failed query a missing value (docs/nvml.md);
- ``fake.py``: the fake GPUs of ``YOLOSAFE_FAKE_GPUS`` (a layout such as ``4x24GB``), for machines without GPUs
  (tests, CI, drills; docs/fake-gpus.md).

This module chooses the backend; ``visible.py`` reads ``CUDA_VISIBLE_DEVICES`` (indices, GPU and MIG UUIDs) and
writes a rank's; the other modules import every public name from here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from yolosafe.gpus.cudaversion import cuda_problem, torch_build
from yolosafe.gpus.fake import (
    FAKE_ENV,
    HOST_PID_OFFSET,
    PHASE_FILE_ENV,
    FakeBackend,
    FakeGPU,
    FakeGpusError,
    blocking_collectives,
    fake_phase_file,
)
from yolosafe.gpus.inventory import (
    BUSY_MIB,
    GPU,
    MIB,
    GPUBackend,
    GPUProcess,
    GPUReadError,
    Inventory,
    MemoryReading,
    nvml_index,
)
from yolosafe.gpus.nvml import NvmlBackend
from yolosafe.gpus.pidns import foreign_pids
from yolosafe.gpus.visible import (
    mig_problem,
    mig_slices,
    planning_inventory,
    rank_visible_devices,
    visible_devices,
    visible_ids,
    visible_problem,
)

__all__ = (  # a tuple: no module-level mutable state
    "BUSY_MIB",
    "FAKE_ENV",
    "GPU",
    "HOST_PID_OFFSET",
    "MIB",
    "PHASE_FILE_ENV",
    "FakeBackend",
    "FakeGPU",
    "FakeGpusError",
    "GPUBackend",
    "GPUProcess",
    "GPUReadError",
    "Inventory",
    "MemoryReading",
    "NvmlBackend",
    "blocking_collectives",
    "cuda_problem",
    "fake_phase_file",
    "foreign_pids",
    "mig_problem",
    "mig_slices",
    "nvml_index",
    "nvml_problem",
    "open_backend",
    "planning_inventory",
    "rank_visible_devices",
    "read_inventory",
    "torch_build",
    "visible_devices",
    "visible_ids",
    "visible_problem",
)


def nvml_problem(inventory: Inventory, env: Mapping[str, str]) -> str | None:
    """One line when GPUs are asked for (``CUDA_VISIBLE_DEVICES``, or a container's ``NVIDIA_VISIBLE_DEVICES``) but
    NVML cannot be read here, so yolosafe sees no GPU: never a silent run on the CPU."""
    if inventory.gpus or inventory.backend != "nvml":
        return None
    asked = [(name, env[name]) for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
             if env.get(name, "").strip() not in {"", "-1", "void", "none", "NoDevFiles"}]
    if not asked:
        return None
    name, value = asked[0]
    return (f"{name}={value} asks for GPUs, but yolosafe cannot read them through NVML ({inventory.problem}); in a "
            "container, give it the driver's utility capability (NVIDIA_DRIVER_CAPABILITIES=compute,utility), or "
            "use --gpus cpu")


def open_backend(env: Mapping[str, str] | None = None) -> GPUBackend:
    """The backend every command uses: the fake when ``YOLOSAFE_FAKE_GPUS`` is set, real NVML otherwise."""
    env = os.environ if env is None else env
    layout = env.get(FAKE_ENV)
    return FakeBackend(layout, env) if layout else NvmlBackend()


def read_inventory(env: Mapping[str, str] | None = None) -> Inventory:
    """One-shot inventory (opens and closes NVML)."""
    backend = open_backend(env)
    try:
        return backend.inventory()
    finally:
        backend.close()
