"""What a checkpoint says about its training, read without torch: the epoch it holds and the epochs it trains to.

An Ultralytics checkpoint is a zip whose ``data.pkl`` is the pickle of a dict: ``epoch`` (0-based, the last epoch
saved; ``-1`` once the final validation has stripped the optimizer from it) and ``train_args`` (with ``epochs``).
The pickle's opcodes are read, never executed (:mod:`pickletools`), so this is safe on any file and needs no torch.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path

_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_INT_OPS = {"BININT", "BININT1", "BININT2", "INT", "LONG", "LONG1", "LONG4"}


@dataclass(frozen=True)
class Progress:
    """``epoch``: the last epoch saved (0-based), or -1 when the training finished and was stripped."""

    epoch: int
    epochs: int | None

    @property
    def finished(self) -> bool:
        """Every epoch trained: only the final validation (of best.pt) may be left to do."""
        return self.epoch < 0 or (self.epochs is not None and self.epoch + 1 >= self.epochs)

    @property
    def epochs_saved(self) -> int | None:
        """How many epochs the checkpoint holds (its ``results.csv`` rows); None once stripped."""
        return None if self.epoch < 0 else self.epoch + 1


def _first_int_after(ops: list[tuple[str, object]], key: str) -> int | None:
    for i, (name, arg) in enumerate(ops):
        if arg != key or "UNICODE" not in name:
            continue
        for follow, value in ops[i + 1:i + 4]:
            if follow in _MEMO_OPS:
                continue
            if follow in _INT_OPS and isinstance(value, int) and not isinstance(value, bool):
                return value
            break
    return None


UNREADABLE = (zipfile.BadZipFile, OSError, KeyError, zipfile.LargeZipFile)  # what reading a file as a zip may raise


def pickle_of(path: Path) -> bytes | None:
    """The bytes of the checkpoint's ``data.pkl``; None when the zip has none; one of :data:`UNREADABLE` when the file
    is no readable zip."""
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        return archive.read(pickles[0]) if pickles else None


def progress(path: Path) -> Progress | None:
    """The checkpoint's progress; None when the file is not a checkpoint this can read (checked elsewhere)."""
    try:
        data = pickle_of(path) or b""
        ops = [(op.name, arg) for op, arg, _ in pickletools.genops(io.BytesIO(data))]
    except (*UNREADABLE, ValueError, EOFError):
        return None
    epoch = _first_int_after(ops, "epoch")
    return None if epoch is None else Progress(epoch, _first_int_after(ops, "epochs"))


# What an Ultralytics checkpoint's pickle names (``module name``): its model's classes (``ultralytics.*`` and the
# ``torch.nn`` modules they hold), tensors as torch stores and rebuilds them, and the plain containers and numbers of
# its training arguments and metrics. Unpickling calls what a pickle names, so a name outside these (``os.system``,
# ``builtins.eval``, ``subprocess.Popen``) is refused before anything loads the file.
SAFE_MODULE_PREFIXES = ("ultralytics.", "torch.nn.modules.", "torch.nn.parameter")
SAFE_GLOBALS = frozenset({
    "collections OrderedDict", "collections defaultdict", "__builtin__ set", "builtins set", "__builtin__ frozenset",
    "builtins frozenset", "builtins slice", "__builtin__ slice", "builtins complex", "_codecs encode",
    "torch Size", "torch device", "torch.serialization _get_layout", "torch._tensor _rebuild_from_type_v2",
    "numpy.core.multiarray _reconstruct", "numpy.core.multiarray scalar", "numpy._core.multiarray _reconstruct",
    "numpy._core.multiarray scalar", "numpy dtype", "numpy ndarray", "numpy.dtypes Float64DType",
    "numpy.dtypes Float32DType", "numpy.dtypes Int64DType", "types SimpleNamespace", "argparse Namespace",
    "pathlib PosixPath", "pathlib WindowsPath", "pathlib PurePosixPath", "datetime datetime",
})
TORCH_TYPES = ("Storage", "Tensor")  # torch.FloatStorage, torch.HalfStorage, ...: the storages torch.save writes


def _safe(name: str) -> bool:
    module, _, attr = name.partition(" ")
    if name in SAFE_GLOBALS or module.startswith(SAFE_MODULE_PREFIXES):
        return True
    if module == "torch":
        return attr.endswith(TORCH_TYPES) or attr in {"float16", "float32", "float64", "bfloat16", "int64", "int32",
                                                      "uint8", "bool", "strided", "contiguous_format"}
    return module == "torch._utils" and attr.startswith("_rebuild_")


def pickled_globals(path: Path) -> list[str] | None:
    """Every ``module name`` the checkpoint's pickle names (what unpickling would import and call), read from its
    opcodes without running any of them; None when the file is not a PyTorch zip checkpoint."""
    try:
        data = pickle_of(path)
        if data is None:
            return None
        ops = [(op.name, arg) for op, arg, _ in pickletools.genops(io.BytesIO(data))]
    except (*UNREADABLE, ValueError, EOFError):
        return None
    names: list[str] = []
    pushed: list[object] = []  # what each opcode pushed, as far as STACK_GLOBAL needs it (strings, memo lookups)
    memo: dict[int, object] = {}
    for op, arg in ops:
        if op in ("GLOBAL", "INST"):
            names.append(str(arg))
        elif op == "STACK_GLOBAL":
            module, attr = (pushed[-2:] if len(pushed) >= 2 else [None, None])
            names.append(f"{module} {attr}" if isinstance(module, str) and isinstance(attr, str) else "? ?")
        if op in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if op == "MEMOIZE" else int(arg)] = pushed[-1] if pushed else None
        elif op in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(int(arg)))
        else:
            pushed.append(arg if isinstance(arg, str) and "UNICODE" in op else None)
    return list(dict.fromkeys(names))


def unsafe_globals(names: list[str]) -> list[str]:
    """The names a plain Ultralytics checkpoint never holds (code a load would run)."""
    return [n for n in names if not _safe(n)]
