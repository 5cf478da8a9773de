"""``yolosafe train``'s options: their one set of defaults, the ``--config`` file, and which source wins.

Every reader of an option (the command line's help, ``--config``, a resume, the supervisor) takes its default from
:data:`DEFAULTS`; the worker gets resolved values only, through the run spec. Precedence, highest first: flags given
on the command line, the ``--config`` file, the dataset's entry in ``datasets.yaml``, these defaults.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from yolosafe.planning import datasets
from yolosafe.planning.validate import InputError

DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "model": None,  # yolov8n.pt when present in the working directory, else yolov8n.yaml (built, never downloaded)
    "data": datasets.SHAPES,
    "gpus": None,  # GPU 0 if there is one, else the CPU
    "batch": 16,  # total over all GPUs
    "effective_batch": None,  # what Ultralytics' nbs=64 gives for the batch
    "val_batch": None,  # the per-GPU train batch
    "imgsz": 640,
    "epochs": 100,
    "alloc_conf": None,
    "project": "runs/detect",
    "name": "train",
    "max_retries": 3,
    "min_batch": 1,
    "watch_interval": 0.1,
    "warn_at": 0.9,
    "clear_before_val": True,
    "memory_fraction": 0.95,  # --batch auto: the share of the smallest free GPU memory the required figures may fill
    "args": [],
})
WATCH_KEYS = ("watch_interval", "warn_at", "clear_before_val")  # the memory watch's options, kept in the story
DEFAULT_MODELS = ("yolov8n.pt", "yolov8n.yaml")  # the weights if present here, else the YAML


def default_model() -> str:
    return DEFAULT_MODELS[0] if Path(DEFAULT_MODELS[0]).is_file() else DEFAULT_MODELS[1]


def load_config(path: str | None) -> dict[str, Any]:
    """``--config FILE.yaml``: the same keys as the options (dashes or underscores), plus ``args:`` for Ultralytics."""
    if not path:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise InputError(f"--config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"--config {path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise InputError(f"--config {path}: expected a mapping of option names to values")
    config = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise InputError(f"--config {path}: unknown key(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(sorted(DEFAULTS))}")
    if isinstance(config.get("gpus"), (list, tuple, int)):
        gpu_list = config["gpus"] if isinstance(config["gpus"], (list, tuple)) else [config["gpus"]]
        config["gpus"] = ",".join(map(str, gpu_list))
    if isinstance(config.get("args"), dict):
        config["args"] = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in config["args"].items()]
    return config


def resolve(given: Mapping[str, Any], config: Mapping[str, Any], dataset_defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Every option's value: ``given`` (flags typed on the command line) over ``config`` over the dataset's defaults
    over :data:`DEFAULTS`. Ultralytics ``key=value`` arguments add up: the config's first, then the command line's."""
    resolved = {}
    for key, default in DEFAULTS.items():
        for source in (given, config, dataset_defaults):
            if key in source:
                resolved[key] = source[key]
                break
        else:
            resolved[key] = default
    if given.get("args"):
        resolved["args"] = [*config.get("args", []), *given["args"]]
    return resolved


def check_watch(options: Mapping[str, Any]) -> None:
    """--watch-interval 0 turns the watch off; faster than 100 Hz buys nothing and costs CPU."""
    try:
        interval, warn_at = float(options["watch_interval"]), float(options["warn_at"])
    except (TypeError, ValueError):
        raise InputError(f"watch-interval {options['watch_interval']!r} / warn-at {options['warn_at']!r}: "
                         "expected numbers") from None
    if interval != 0 and not 0.01 <= interval <= 60:
        raise InputError(f"--watch-interval {interval:g}: give seconds between 0.01 and 60, or 0 to turn the memory "
                         "watch off")
    if not 0 < warn_at <= 1:
        raise InputError(f"--warn-at {warn_at:g}: give a share of GPU memory above 0 and at most 1 (e.g. 0.9)")
