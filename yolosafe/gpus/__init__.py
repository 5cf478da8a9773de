"""GPU inventory: the one place in yolosafe that talks to NVML.

Every command reads GPUs through :func:`open_backend` and gets the typed records of ``inventory.py``, whichever
backend stands behind it:

- ``nvml.py``: real NVML through nvidia-ml-py, initialised lazily, every failed query a missing value (docs/nvml.md);
- ``fake.py``: the fake GPUs of ``YOLOSAFE_FAKE_GPUS`` (a layout such as ``4x24GB``), for machines without GPUs
  (tests, CI, drills; docs/fake-gpus.md).

This module chooses the backend and numbers GPUs (NVML's numbering, ``CUDA_VISIBLE_DEVICES``, a rank's device); the
other modules import every public name from here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from yolosafe.gpus.fake import FAKE_ENV, PHASE_FILE_ENV, FakeBackend, FakeGPU, FakeGpusError, fake_phase_file
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

__all__ = (  # a tuple: no module-level mutable state
    "BUSY_MIB",
    "FAKE_ENV",
    "GPU",
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
    "fake_phase_file",
    "nvml_index",
    "open_backend",
    "read_inventory",
    "visible_ids",
)


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
    layout = env.get(FAKE_ENV)
    return FakeBackend(layout, env) if layout else NvmlBackend()


def read_inventory(env: Mapping[str, str] | None = None) -> Inventory:
    """One-shot inventory (opens and closes NVML)."""
    backend = open_backend(env)
    try:
        return backend.inventory()
    finally:
        backend.close()
