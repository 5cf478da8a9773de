"""yolosafe: train Ultralytics YOLO on one or many GPUs without dying of CUDA out-of-memory.

The package is a library with a thin CLI on top::

    import yolosafe

    run = yolosafe.train(model="yolov8n.pt", data="coco8.yaml", device=[0, 1], batch=32, epochs=100)
    run.run_dir, run.outcome, run.metrics, run.best

Importing it must stay cheap: the library's entry points (:func:`train`, :func:`plan`, :class:`Run`, :class:`Plan`)
load on first use, and torch and ultralytics are only imported by the processes that train (worker, ranks).
"""

from yolosafe.errors import (
    OutOfMemoryRetriesExhausted,
    TrainingError,
    TrainingFailed,
    TrainingInterrupted,
    UsageError,
    YolosafeError,
)

__version__ = "0.1.0"

_LAZY = {"train": "yolosafe.api.calls", "plan": "yolosafe.api.calls", "Run": "yolosafe.api.result",
         "Plan": "yolosafe.api.result"}

__all__ = ["OutOfMemoryRetriesExhausted", "Plan", "Run", "TrainingError", "TrainingFailed", "TrainingInterrupted",
           "UsageError", "YolosafeError", "__version__", "plan", "train"]


def __getattr__(name: str) -> object:
    """``yolosafe.train``, ``yolosafe.plan``, ``yolosafe.Run``, ``yolosafe.Plan``, imported when first used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'yolosafe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
