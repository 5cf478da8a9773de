"""What an out-of-memory looks like: PyTorch's message, parsed; the words that mark an OOM in a log; and the
fault injection (``YOLOSAFE_INJECT_OOM``) that makes the real trainer raise one on purpose.

No torch import here: the supervisor classifies failures without it; the trainer side passes in the exception.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

INJECT_ENV = "YOLOSAFE_INJECT_OOM"

# Substrings that mark a failed attempt as an out-of-memory (PyTorch, cuBLAS, cuDNN wording). A DDP peer that dies of
# a NCCL/timeout error after another rank's OOM needs no marker: the OOM rank's own record or traceback is there too.
OOM_MARKERS = (
    "CUDA out of memory",
    "OutOfMemoryError",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
    "cudaErrorMemoryAllocation",
)

_UNIT = MappingProxyType({"B": 1 / 2**20, "KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0, "TiB": 1024.0**2})
_SIZE = r"([\d.]+) ?(B|KiB|MiB|GiB|TiB)"
# Current PyTorch wording first, then the pre-2.1 one ("(GPU 0; 15.90 GiB total capacity; ...)"): first match wins.
_FIELDS = MappingProxyType({
    "tried_mib": [rf"Tried to allocate {_SIZE}"],
    "total_mib": [rf"total capacity of {_SIZE}", rf"{_SIZE} total capacity"],
    "free_mib": [rf"of which {_SIZE} is free", rf"{_SIZE} free;"],
    "process_mib": [rf"this process has {_SIZE} memory in use"],
    "allocated_mib": [rf"{_SIZE} is allocated by PyTorch", rf"{_SIZE} already allocated"],
    "reserved_unallocated_mib": [rf"{_SIZE} is reserved by PyTorch but unallocated"],
    "reserved_mib": [rf"{_SIZE} reserved in total by PyTorch"],
})

FRAGMENTED_MIB = 1024.0  # reserved but unallocated at an OOM above which the advice names fragmentation


def is_oom_text(text: str) -> bool:
    return any(marker in text for marker in OOM_MARKERS)


def _mib(number: str, unit: str) -> float:
    return round(float(number) * _UNIT[unit], 2)


def parse_message(message: str) -> dict[str, Any]:
    """The figures of a PyTorch OOM message (any may be missing), sizes in MiB; ``processes`` maps the pids that
    newer messages list ("Process 3066 has 79.10 GiB memory in use") to their memory."""
    text = " ".join(message.split())
    found: dict[str, Any] = {}
    gpu = re.search(r"GPU (\d+)(?: has a total capacity|;)", text)
    if gpu:
        found["gpu"] = int(gpu[1])
    for key, patterns in _FIELDS.items():
        match = next((m for m in (re.search(p, text) for p in patterns) if m), None)
        if match:
            found[key] = _mib(match[1], match[2])
    processes = {int(m[1]): _mib(m[2], m[3]) for m in re.finditer(rf"Process (\d+) has {_SIZE} memory in use", text)}
    if processes:
        found["processes"] = processes
    return found


def fake_message(gpu: int, tried_mib: float = 300.0, total_mib: float = 48640.0) -> str:
    """A message in PyTorch's own format, for injected OOMs (numbers shaped like a real 48 GB GPU's)."""
    free = 194.56
    allocated, unallocated = total_mib - free - 1200 - 302, 302.0
    return (
        f"CUDA out of memory. Tried to allocate {tried_mib:.2f} MiB. GPU {gpu} has a total capacity of "
        f"{total_mib / 1024:.2f} GiB of which {free:.2f} MiB is free. Including non-PyTorch memory, this process has "
        f"{(total_mib - free) / 1024:.2f} GiB memory in use. Of the allocated memory {allocated / 1024:.2f} GiB is "
        f"allocated by PyTorch, and {unallocated:.2f} MiB is reserved by PyTorch but unallocated. If reserved but "
        "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid "
        "fragmentation.  See documentation for Memory Management  "
        "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables) [injected by yolosafe]"
    )


@dataclass(frozen=True)
class Injection:
    """Where to raise: ``phase`` train / val / final (the validation of best.pt after the last epoch), the 0-based
    ``epoch`` and ``iteration`` (batch index), the ``rank``; ``times`` matching points raise (0 = every time, across
    retries); ``error`` oom (the real ``torch.OutOfMemoryError``) or runtime (a plain, non-OOM ``RuntimeError``).

    ``rank`` is the global rank; with ``node`` (multi-node runs) it is the local rank on that node instead, so
    ``node=1,rank=0`` is node 1's first GPU whatever the number of GPUs per node."""

    phase: str = "train"
    epoch: int = 0
    iteration: int = 0
    rank: int = 0
    times: int = 1
    error: str = "oom"
    node: int | None = None

    def matches(self, phase: str, epoch: int, iteration: int, rank: int, local: tuple[int, int] = (0, -1)) -> bool:
        """``local``: this process's node and local rank, used when the injection names a ``node``."""
        where = max(rank, 0) if self.node is None else (local[0], max(local[1], 0))
        wanted = self.rank if self.node is None else (self.node, self.rank)
        return (phase, epoch, iteration) == (self.phase, self.epoch, self.iteration) and where == wanted


def parse_injection(text: str | None) -> Injection | None:
    """``YOLOSAFE_INJECT_OOM='phase=val,epoch=1,rank=0,times=1'``; raises ValueError on a malformed spec."""
    if not text:
        return None
    fields: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in Injection.__dataclass_fields__:
            raise ValueError(f"{INJECT_ENV}: cannot read {item!r}; keys: phase, epoch, iteration, rank, node, times, "
                             "error")
        if key in {"phase", "error"}:
            fields[key] = value
        elif re.fullmatch(r"\d+", value):
            fields[key] = int(value)
        else:
            raise ValueError(f"{INJECT_ENV}: {key}={value!r} must be a whole number >= 0")
    injection = Injection(**fields)
    if injection.phase not in {"train", "val", "final"} or injection.error not in {"oom", "runtime"}:
        raise ValueError(f"{INJECT_ENV}: phase must be train/val/final and error oom/runtime, got {text!r}")
    return injection


# Host (CPU) memory, not GPU memory: PyTorch's CPU allocator and Python's own wording.
HOST_OOM_MARKERS = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory",
                    "MemoryError", "Cannot allocate memory")


def is_host_oom(text: str) -> bool:
    return any(marker in text for marker in HOST_OOM_MARKERS)


def check_injection(text: str | None, world_size: int, nnodes: int = 1) -> None:
    """A usage error (ValueError, one line) for an injection that cannot fire in this plan: a rank or node it does not
    have (``world_size`` counts the ranks of every node)."""
    injection = parse_injection(text)
    if injection is None:
        return
    if injection.node is not None and injection.node >= nnodes:
        nodes = "node 0" if nnodes == 1 else f"nodes 0-{nnodes - 1}"
        raise ValueError(f"{INJECT_ENV}: node={injection.node} does not exist: this run has {nodes}")
    ranks_here = world_size // max(nnodes, 1) if injection.node is not None else world_size
    if injection.rank >= ranks_here:
        ranks = "rank 0" if ranks_here == 1 else f"ranks 0-{ranks_here - 1}"
        per_node = " on each node" if injection.node is not None else ""
        raise ValueError(f"{INJECT_ENV}: rank={injection.rank} does not exist: this run has {ranks}{per_node}")
