"""What an out-of-memory looks like: PyTorch's message, parsed; the words that mark an OOM in a log; and the
fault injection (``YOLOSAFE_INJECT_OOM``) that makes the real trainer raise one on purpose.

No torch import here: the supervisor classifies failures without it; the trainer side passes in the exception.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from yolosafe.errors import UsageError
from yolosafe.injection import check_place

INJECT_ENV = "YOLOSAFE_INJECT_OOM"
INJECTED = " [injected by yolosafe]"  # the end of every injected message
# The start of a worker's line for train.log only: the last frame of a progress bar that an OOM (or the failure that
# ends an attempt) cut short (training.cutbars writes it; the supervisor's terminal filter keeps it off the terminal).
BAR_CUT_SHORT = "progress bar cut short: "

# What marks a failed attempt as a GPU out-of-memory: (pattern, the text's source). Each literal is in the strings of
# the libraries torch 2.14 ships (tests/test_oom.py reads them there): the caching allocator's and torch's own
# messages (the expandable segments' failed mapping included), CUDA's error string in an ``AcceleratorError`` ("CUDA
# error: out of memory": a context or memory outside the caching allocator), NCCL's in a ``DistBackendError``
# ("Cuda failure 2 'out of memory'"), cuBLAS' allocation failure and its failed handle creation (torch's check around
# ``cublasCreate``, the usual face of an OOM when the first matmul creates the handle on a nearly full GPU), cuDNN 9's
# and cuSOLVER's/cuFFT's allocation failures; then Ultralytics' words (its trainer's handler): "out of memory" in any
# case and "unable to find an engine". cuDNN 8's ``CUDNN_STATUS_ALLOC_FAILED`` is kept for older torch builds. A bare
# ``CUDNN_STATUS_INTERNAL_ERROR`` (in Ultralytics' list: cuDNN 8 said so for a failed workspace) is not one: cuDNN 9
# gives an allocation failure its own code, so it is an OOM only with that code or an allocator's message beside it.
# A DDP peer that dies of a NCCL/timeout error after another rank's OOM needs no marker: the OOM rank's own record or
# traceback is there too.
CUBLAS_INIT = "CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`"
OOM_SOURCES = MappingProxyType({
    "CUDA out of memory": "torch/lib/libc10_cuda.so",
    "OutOfMemoryError": "torch/lib/libtorch_python.so",
    "CUDA error: out of memory": "torch/lib/libtorch_cuda.so + nvidia/cu13/lib/libcudart.so.13",
    "CUDA ran out of memory outside PyTorch's allocator": "torch/lib/libtorch_cuda.so",
    "expandable_segments: memory mapping failed": "torch/lib/libc10_cuda.so",
    "Cuda failure 2 'out of memory'": "nvidia/nccl/lib/libnccl.so.2",
    "cudaErrorMemoryAllocation": "nvidia/cu13/lib/libcudart.so.13",
    "CUBLAS_STATUS_ALLOC_FAILED": "nvidia/cu13/lib/libcublasLt.so.13",
    CUBLAS_INIT: "torch/lib/libtorch_cuda.so + nvidia/cu13/lib/libcublasLt.so.13",
    "CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED": "nvidia/cudnn/lib/libcudnn_graph.so.9",
    "CUSOLVER_STATUS_ALLOC_FAILED": "torch/lib/libtorch_cuda.so",
    "CUFFT_ALLOC_FAILED": "torch/lib/libtorch_cuda.so",
    "CUDNN_STATUS_ALLOC_FAILED": "cuDNN 8 (older torch builds)",
    "unable to find an engine": "Ultralytics' OOM handler",
    "out of memory": "Ultralytics' OOM handler",
})
OOM_MARKERS = tuple(OOM_SOURCES)
# Ultralytics' wider words, minus what is not GPU memory: the host's "out of memory" (LLVM's and c10's CPU
# allocator, see HOST_OOM_MARKERS).
_WIDE = re.compile(r"unable to find an engine|(?<!LLVM ERROR: )(?<!C10 )out of memory", re.IGNORECASE)
_EXACT = tuple(m for m in OOM_MARKERS if m not in {"unable to find an engine", "out of memory"})

_UNIT = MappingProxyType({"bytes": 1 / 2**20, "B": 1 / 2**20, "KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0,
                          "TiB": 1024.0**2})
_SIZE = r"([\d.]+) ?(bytes|B|KiB|MiB|GiB|TiB)"  # torch writes sizes up to 1024 bytes as "N bytes"
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



class InjectionError(UsageError):
    """A ``YOLOSAFE_INJECT_OOM`` that cannot be read or cannot fire in this run; ``str()`` is one line."""

def is_oom_text(text: str) -> bool:
    """Whether ``text`` (a message, a log) tells of a GPU out-of-memory; the host's RAM running out is not one."""
    return any(marker in text for marker in _EXACT) or _WIDE.search(text) is not None


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
        f"(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables){INJECTED}"
    )


# What each injected error says: the real texts (torch's check macros around CUDA's, NCCL's and cuDNN's strings).
_CUDA_SUFFIX = ("\nCUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below "
                "might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1")
ERROR_TEXTS = MappingProxyType({
    "accelerator": f"CUDA error: out of memory{_CUDA_SUFFIX}\n",
    "nccl": ("NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3690, unhandled cuda error (run "
             "with NCCL_DEBUG=INFO for details), NCCL version 2.30.7\nncclUnhandledCudaError: Call to CUDA function "
             "failed.\nLast error:\nCuda failure 2 'out of memory'"),
    "cudnn": "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED",
    "cublas-init": f"CUDA error: {CUBLAS_INIT}",
    "cudnn-internal": "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR",  # not an OOM: no allocation code, no allocator's
    "runtime": "yolosafe injected a non-OOM failure (YOLOSAFE_INJECT_OOM error=runtime)",
})
ERRORS = ("oom", *ERROR_TEXTS)


def injected_text(error: str, gpu: int) -> str:
    """The message of an injected ``error`` (one of :data:`ERRORS`) on CUDA device ``gpu``, marked as injected."""
    if error == "oom":
        return fake_message(gpu)
    return ERROR_TEXTS[error] if error == "runtime" else ERROR_TEXTS[error] + INJECTED


@dataclass(frozen=True)
class Injection:
    """Where to raise: ``phase`` train / val / final (the validation of best.pt after the last epoch), the 0-based
    ``epoch`` and ``iteration`` (batch index), the ``rank``; ``times`` matching points raise (0 = every time, across
    retries); ``error`` what is raised (:data:`ERRORS`): oom (the caching allocator's ``torch.OutOfMemoryError``),
    accelerator (``torch.AcceleratorError``, CUDA's own out of memory), nccl (``torch.distributed.DistBackendError``,
    NCCL's), cudnn (the ``RuntimeError`` of cuDNN 9's failed allocation), cublas-init (the ``RuntimeError`` of
    cuBLAS' handle creation on a full GPU), cudnn-internal (cuDNN's bare internal error: not an OOM) or runtime (a
    plain, non-OOM ``RuntimeError``).

    ``rank`` is the global rank; with ``node`` (multi-node runs) it is the local rank on that node instead, so
    ``node=1,rank=0`` is node 1's first GPU whatever the number of GPUs per node."""

    phase: str = "train"
    epoch: int = 0
    iteration: int = 0
    rank: int = 0
    times: int = 1
    error: str = "oom"
    node: int | None = None

    def error_at(self, fired: int) -> str:
        """What the firing after ``fired`` earlier ones raises."""
        kinds = self.error.split("+")
        return kinds[fired % len(kinds)]

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
            keys = "phase, epoch, iteration, rank, node, times, error"
            raise InjectionError(f"{INJECT_ENV}: cannot read {item!r}; keys: {keys}")
        if key in {"phase", "error"}:
            fields[key] = value
        elif re.fullmatch(r"\d+", value):
            fields[key] = int(value)
        else:
            raise InjectionError(f"{INJECT_ENV}: {key}={value!r} must be a whole number >= 0")
    injection = Injection(**fields)
    if injection.phase not in {"train", "val", "final"} or not set(injection.error.split("+")) <= set(ERRORS):
        raise InjectionError(f"{INJECT_ENV}: phase must be train/val/final and error {'/'.join(ERRORS)}, got {text!r}")
    return injection


# Host (CPU) memory, not GPU memory: PyTorch's CPU allocator (libc10.so), Python's own wording, LLVM's (cuDNN's
# runtime compiler) and cuDNN 9's failed host allocation.
HOST_OOM_MARKERS = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory",
                    "C10 Out of Memory", "MemoryError", "Cannot allocate memory", "LLVM ERROR: out of memory",
                    "CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED")


def is_host_oom(text: str) -> bool:
    return any(marker in text for marker in HOST_OOM_MARKERS)


def check_injection(text: str | None, world_size: int, nnodes: int = 1) -> None:
    """A usage error (ValueError, one line) for an injection that cannot fire in this plan: a rank or node it does not
    have (``world_size`` counts the ranks of every node)."""
    injection = parse_injection(text)
    if injection is None:
        return
    check_place(INJECT_ENV, injection.rank, injection.node, world_size, nnodes, InjectionError)
