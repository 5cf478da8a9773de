"""Which devices this process may use, and how a rank is told them: ``CUDA_VISIBLE_DEVICES`` read the way CUDA
reads it, MIG devices included, and written back as UUIDs.

- An entry is an index, a GPU UUID (``GPU-...``) or a MIG device UUID (``MIG-...``); as in CUDA, the list ends at the
  first entry that names no device. An index counts the GPUs this process may open (under cgroup device limits NVML
  lists GPUs it cannot open, CUDA does not count them); yolosafe runs every rank with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``,
  in which CUDA's order is NVML's.
- A GPU in MIG mode is no CUDA device itself: its MIG devices are, one per process (CUDA shows at most one). The
  device such a GPU stands for is the MIG device ``CUDA_VISIBLE_DEVICES`` names, else its first one; the plan uses
  that slice's memory, and the rank gets that slice's UUID.
- A rank's ``CUDA_VISIBLE_DEVICES`` is the UUIDs of the plan's devices, in the plan's order: the same GPUs whatever
  numbering the scheduler, the container or the user's environment uses.
"""

from __future__ import annotations

from dataclasses import replace

from yolosafe.gpus.inventory import GPU, Inventory

HIDE_ALL = {"", "-1"}  # values that hide every GPU on purpose


def _entries(cuda_visible: str) -> list[str]:
    return [part.strip() for part in cuda_visible.split(",")]


def _device_of(gpu: GPU, named: str | None = None) -> GPU | None:
    """The CUDA device GPU ``gpu`` stands for: itself, or (MIG on) the MIG device ``named``, else its first one;
    None for a GPU in MIG mode without a MIG device. A MIG device standing for its GPU (a planning inventory's) is
    itself unless another of its GPU's MIG devices is named."""
    if (not gpu.mig_devices and not gpu.mig) or (gpu.mig_of is not None and named in (None, gpu.uuid)):
        return gpu
    slices = [m for m in gpu.mig_devices if named is None or m.uuid == named]
    return slices[0] if slices else None


def visible_devices(inventory: Inventory, cuda_visible: str | None) -> tuple[GPU, ...]:
    """The devices this process may use, in CUDA's order: whole GPUs, or MIG devices (``index`` their GPU's)."""
    if cuda_visible is None:
        found = (_device_of(g) for g in inventory.gpus if g.openable)
        return tuple(d for d in found if d is not None)
    openable = [g for g in inventory.gpus if g.openable]
    by_uuid = {g.uuid: g for g in inventory.gpus if g.uuid}
    by_mig = {m.uuid: g for g in inventory.gpus for m in g.mig_devices if m.uuid}
    devices: list[GPU] = []
    for item in _entries(cuda_visible):
        if (item.isascii() and item.isdecimal()):
            gpu = openable[int(item)] if int(item) < len(openable) else None
            device = None if gpu is None else _device_of(gpu)
        elif item in by_mig:
            device = _device_of(by_mig[item], item)
        else:
            device = None if item not in by_uuid else _device_of(by_uuid[item])
        if device is None:
            break
        devices.append(device)
    return tuple(devices)


def visible_ids(inventory: Inventory, cuda_visible: str | None) -> tuple[int, ...]:
    """The GPUs this process may use, in NVML numbering (a MIG device counts as its GPU, once)."""
    ids: list[int] = []
    for device in visible_devices(inventory, cuda_visible):
        if device.index not in ids:
            ids.append(device.index)
    return tuple(ids)


def planning_inventory(inventory: Inventory, cuda_visible: str | None) -> Inventory:
    """``inventory`` as a plan sees it: a GPU in MIG mode is the MIG device it stands for (its memory, its UUID,
    the GPU's index), so the plan is made for a 10 GB slice, not for its 80 GB GPU."""
    devices = {d.index: d for d in reversed(visible_devices(inventory, cuda_visible)) if d.mig_of is not None}
    gpus = tuple(replace(devices[g.index], processes=g.processes, mig_devices=g.mig_devices) if g.index in devices
                 else g for g in inventory.gpus)
    return replace(inventory, gpus=gpus)


def rank_visible_devices(inventory: Inventory, plan_gpus: tuple[int, ...], cuda_visible: str | None) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` for the ranks of a plan on ``plan_gpus``: their devices' UUIDs in the plan's order
    (a MIG device's own); None when a UUID is unknown (the caller falls back to the plan's indices)."""
    devices = {d.index: d for d in reversed(visible_devices(inventory, cuda_visible))}
    uuids = [devices[i].uuid if i in devices else None for i in plan_gpus]
    return ",".join(u for u in uuids if u) if uuids and all(uuids) else None


def mig_slices(inventory: Inventory, plan_gpus: tuple[int, ...], cuda_visible: str | None) -> dict[int, str]:
    """The MIG device each GPU of a plan in MIG mode stands for (NVML index to its UUID): what the memory watch reads
    instead of the whole GPU, whose total and other tenants are not the run's."""
    return {d.index: d.uuid for d in reversed(visible_devices(inventory, cuda_visible))
            if d.mig_of is not None and d.index in plan_gpus and d.uuid}


def mig_problem(inventory: Inventory, plan_gpus: tuple[int, ...], cuda_visible: str | None) -> str | None:
    """One line when a plan needs more MIG devices than CUDA shows a process (one), else None."""
    visible = visible_devices(inventory, cuda_visible)
    named = [d.uuid for d in visible if d.mig_of is not None]
    planned = [d for d in visible if d.index in plan_gpus and d.mig_of is not None]
    if len(named) > 1 and plan_gpus:
        return (f"CUDA shows one MIG device per process, and CUDA_VISIBLE_DEVICES names {len(named)} "
                f"({', '.join(map(str, named))}): name one of them, or train on GPUs without MIG")
    if planned and len(plan_gpus) > 1:
        return (f"--gpus {','.join(map(str, plan_gpus))}: GPU {planned[0].index} is a MIG device ({planned[0].uuid}) "
                "and CUDA shows one MIG device per process: train on it alone (--gpus "
                f"{planned[0].index}) or on GPUs without MIG")
    return None


def visible_problem(inventory: Inventory, cuda_visible: str | None) -> str | None:
    """One line when ``CUDA_VISIBLE_DEVICES`` asks for GPUs of which this machine has none (a MIG device of another
    machine, a GPU in MIG mode without a MIG device, a stale UUID): never a silent fall back to the CPU."""
    if cuda_visible is None or cuda_visible.strip() in HIDE_ALL or not inventory.gpus:
        return None
    entries = [e for e in _entries(cuda_visible) if e]
    twice = next((e for i, e in enumerate(entries) if e in entries[:i]), None)
    if twice is not None:  # CUDA would give fewer devices than the list names, or none
        return f"CUDA_VISIBLE_DEVICES={cuda_visible}: names {twice} twice; name each GPU once"
    if visible_devices(inventory, cuda_visible):
        return None
    first = _entries(cuda_visible)[0]
    mig_off = [g.index for g in inventory.gpus if g.mig and not g.mig_devices]
    why = (f"GPU {mig_off[0]} is in MIG mode without a MIG device" if mig_off
           else f"no GPU or MIG device here is {first!r}")
    return (f"CUDA_VISIBLE_DEVICES={cuda_visible}: names no GPU this process can use ({why}; yolosafe gpus lists "
            "them): set it to one of them, unset it, or use --gpus cpu")
