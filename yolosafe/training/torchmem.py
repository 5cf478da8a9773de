"""torch's own memory statistics of one device: the peaks the phase events, the failure records and the peak metrics
report, and the cache emptied before validation.

Every function takes the device a trainer or validator runs on and does nothing (or reports None) off CUDA, where
torch keeps no memory statistics: the same code runs on a GPU, on the CPU and in the CPU ranks of fake GPUs.
"""

from __future__ import annotations

import gc
from typing import Any

from yolosafe.gpus import MIB


def cuda_device(device: Any) -> Any:
    """``device`` when it is a CUDA device torch can use; None on the CPU."""
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    return device if torch.cuda.is_available() else None


def reset_peaks(device: Any) -> None:
    """Start the peaks afresh: each phase reports its own."""
    cuda = cuda_device(device)
    if cuda is not None:
        import torch

        torch.cuda.reset_peak_memory_stats(cuda)


def peaks(device: Any) -> dict[str, float | None]:
    """torch's peak allocated and reserved MiB since the last reset; reserved minus allocated is the allocator's
    cache and fragmentation, which NVML counts as used."""
    cuda = cuda_device(device)
    if cuda is None:
        return {"max_allocated_mib": None, "max_reserved_mib": None}
    import torch

    return {"max_allocated_mib": round(torch.cuda.max_memory_allocated(cuda) / MIB, 1),
            "max_reserved_mib": round(torch.cuda.max_memory_reserved(cuda) / MIB, 1)}


def clear_cache(device: Any) -> float | None:
    """Collect garbage and give the allocator's cached blocks back to the driver; the MiB given back (None off
    CUDA, where there is no cache to give back: no collection either, a full one costs a tenth of a second)."""
    cuda = cuda_device(device)
    if cuda is None:
        return None
    gc.collect()
    import torch

    before = torch.cuda.memory_reserved(cuda)
    torch.cuda.empty_cache()
    return round((before - torch.cuda.memory_reserved(cuda)) / MIB, 1)
