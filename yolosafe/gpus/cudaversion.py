"""Whether this machine's NVIDIA driver can run the CUDA build of the installed torch, asked before any rank starts.

The driver says which CUDA version it supports (NVML's ``nvmlSystemGetCudaDriverVersion``, :class:`Inventory.cuda`);
torch says which CUDA it was built for (``torch.version.cuda``). The supervisor never imports torch, so that figure
is read from the file torch keeps it in (``torch/version.py``, generated at torch's build) without running it;
tests/test_gpus.py pins the reading to ``torch.version.cuda`` itself. A driver of an older CUDA major version cannot
run the build at all (CUDA's minor version compatibility holds within a major version only): every rank would die
with Ultralytics' "Invalid CUDA 'device=0'"; yolosafe says so in one line instead.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path


def torch_build() -> tuple[str | None, str | None]:
    """The installed torch's version and the CUDA version it was built for (None: a CPU or ROCm build, or no torch),
    read from ``torch/version.py`` without importing torch."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None, None
    locations = list(spec.submodule_search_locations or []) if spec else []
    try:
        tree = ast.parse(Path(locations[0], "version.py").read_text(encoding="utf-8"))
    except (IndexError, OSError, SyntaxError, UnicodeDecodeError):
        return None, None
    values: dict[str, object] = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        value = getattr(node, "value", None)
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant):
            values[target.id] = value.value
    version, cuda = values.get("__version__"), values.get("cuda")
    return (version if isinstance(version, str) else None), (cuda if isinstance(cuda, str) else None)


def _major_minor(text: str | None) -> tuple[int, int] | None:
    parts = (text or "").split(".")
    if not parts[0].isdigit():
        return None
    return int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def cuda_problem(driver_cuda: str | None, torch_version: str | None, torch_cuda: str | None) -> str | None:
    """One line when the driver (its CUDA version ``driver_cuda``) cannot run a torch built for ``torch_cuda``; None
    when it can, or when either figure is unknown."""
    driver, built = _major_minor(driver_cuda), _major_minor(torch_cuda)
    if driver is None or built is None or driver[0] >= built[0]:
        return None
    return (f"the NVIDIA driver supports CUDA {driver_cuda}, and torch {torch_version or ''} was built for CUDA "
            f"{torch_cuda}: no rank could use a GPU; update the driver to one for CUDA {built[0]}.x, or install a "
            f"torch built for CUDA {driver[0]}.x (or use --gpus cpu)").replace("torch  ", "torch ")
