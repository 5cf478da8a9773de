"""yolosafe: train Ultralytics YOLO on one or many GPUs without dying of CUDA out-of-memory.

The package is a small library with a thin CLI on top. Importing it must stay cheap: torch and ultralytics are only
imported by the modules that run inside the training process (`worker`, `trainer`).
"""

__version__ = "0.1.0"
