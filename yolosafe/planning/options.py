"""``yolosafe train``'s options: their one set of defaults, the ``--config`` file, and which source wins.

Every reader of an option (the command line's help, ``--config``, a resume, the supervisor) takes its default from
:data:`DEFAULTS`; the worker gets resolved values only, through the run spec. Precedence, highest first: flags given
on the command line, the ``--config`` file, the dataset's entry in ``datasets.yaml``, these defaults. The resolved
options are one :class:`yolosafe.planning.trainoptions.TrainOptions`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from yolosafe.planning import datasets, inputs, trainplan, usercode, validate, yolowords
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
    "project": validate.ULTRALYTICS_PROJECT,  # Ultralytics' runs/<task> (its runs_dir setting), as yolo train
    "task": None,  # task=: the model's own task, checked against it
    "download": False,  # --download: let Ultralytics fetch the dataset and the weights, once, before training
    "name": "train",
    "max_retries": 3,
    "min_batch": 1,
    "watch_interval": 0.1,
    "warn_at": 0.9,
    "clear_before_val": True,
    "save_every": "auto",  # the step checkpoint inside the epoch: 10m, 500it, 0 (off), auto (planning/saveevery.py)
    "val_oom": "in-place",  # a validation OOM: the rank halves its own val batch in place, or "relaunch" every rank
    "hang_timeout": None,  # seconds without progress that make a rank hung; None: learnt from the run; 0: off
    "max_hang_restarts": 1,  # relaunches after a hang
    "memory_fraction": 0.95,  # --batch auto: the share of the smallest free GPU memory the required figures may fill
    "args": [],
})
# ``yolo train`` arguments that are yolosafe options: key=value names them as yolo does (yolo_style).
YOLO_KEYS: Mapping[str, str] = MappingProxyType({
    "model": "model", "data": "data", "device": "gpus", "batch": "batch", "epochs": "epochs", "imgsz": "imgsz",
    "project": "project", "name": "name", "nbs": "effective_batch", "resume": "resume_dir", "exist_ok": "exist_ok",
    "task": "task", "mode": "mode", "download": "download",
})
WATCH_KEYS = ("watch_interval", "warn_at", "clear_before_val")  # the memory watch's options, kept in the story
HANG_KEYS = ("hang_timeout", "max_hang_restarts")  # the hang watch's options, kept in the story
DEFAULT_MODELS = ("yolov8n.pt", "yolov8n.yaml")  # the weights if present here, else the YAML


def default_model() -> str:
    return DEFAULT_MODELS[0] if Path(DEFAULT_MODELS[0]).is_file() else DEFAULT_MODELS[1]


def load_config(path: str | None) -> dict[str, Any]:
    """``--config FILE.yaml``: the same keys as the options (dashes or underscores), plus ``args:`` for Ultralytics."""
    if not path:
        return {}
    data = inputs.yaml_mapping(path, "--config", "option names to values (batch: 16 ...)")
    config = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise InputError(f"--config {path}: unknown key(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(sorted(DEFAULTS))}")
    if isinstance(config.get("gpus"), (list, tuple, int)):
        gpu_list = config["gpus"] if isinstance(config["gpus"], (list, tuple)) else [config["gpus"]]
        config["gpus"] = ",".join(map(str, gpu_list))
    if isinstance(config.get("args"), dict):
        config["args"] = [yolowords.word(str(k), v) for k, v in config["args"].items()]
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


def yolo_batch(value: Any) -> tuple[Any, float | None]:
    """Ultralytics' batch forms: ``-1`` is AutoBatch (``auto``), a fraction ``0.7`` is ``auto`` filling that share of
    the GPU memory; a whole number is the total batch."""
    if isinstance(value, str) and value.strip().lower() != "auto":
        try:
            value = float(value)
        except ValueError:
            raise InputError(f"--batch {value!r}: give a whole number, auto, -1 or a fraction such as 0.7") from None
    if isinstance(value, float) and 0.0 < value < 1.0:
        return "auto", value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if value == -1:
        return "auto", None
    if isinstance(value, float):
        raise InputError(f"--batch {value:g}: a fraction of GPU memory is between 0 and 1 (e.g. 0.7)")
    return value, None


def yolo_device(value: Any) -> str | None:
    """``device=`` as ``yolo`` reads it (``select_device``'s forms), as ``--gpus``: ``0,1,2,3``, ``[0, 1]``, ``(0,1)``,
    ``cuda:0``, ``cpu``; ``-1`` is ``auto`` (the idle GPUs), ``-1,-1`` two of them (``auto:2``)."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)):
        words = [str(v) for v in value]
    else:
        text = str(value).lower().replace("cuda:", "")
        words = text.split(",")
    words = [w for w in (w.strip().strip("[]()'\" ").strip() for w in words) if w]
    if words and all(w == "-1" for w in words):
        return "auto" if len(words) == 1 else f"auto:{len(words)}"
    return ",".join(words)


TASK_MODEL_SUFFIX = MappingProxyType({"segment": "-seg", "pose": "-pose", "obb": "-obb", "classify": "-cls"})


def default_model_of(task: str | None) -> str:
    """yolosafe's model when none is given: :func:`default_model`, of the task's kind (``yolov8n-seg.yaml``)."""
    model = default_model()
    suffix = TASK_MODEL_SUFFIX.get(task or "")
    return model if suffix is None else model.replace("yolov8n", f"yolov8n{suffix}")


def _read_cfg(path: Any) -> dict[str, Any]:
    """``cfg=FILE.yaml`` (``yolo``'s own; ``yolo copy-cfg`` writes one): its keys under the command line's; keys left
    at Ultralytics' default (a copied default config holds them all) are as if not given."""
    data = inputs.yaml_mapping(str(path), "cfg=", "Ultralytics argument names to values")
    defaults = trainplan.ultralytics_defaults()
    data, _ = yolowords.handle_deprecation({str(k): v for k, v in data.items() if k != "cfg"})
    return {k: v for k, v in data.items() if k not in defaults or v != defaults[k]}


def _resume_dir(value: Any, model: Any) -> str | None:
    """``resume=RUN``, ``resume=RUN/weights/last.pt``, ``resume=True`` with ``model=RUN/weights/last.pt``: RUN."""
    if value is False or value is None:
        return None
    if value is True:
        if model is None or Path(str(model)).suffix != ".pt":
            raise InputError("resume=True: give the run's checkpoint, model=RUN/weights/last.pt (or resume=RUN_DIR)")
        value = model
    path = Path(str(value))
    return str(path.parent.parent if path.suffix == ".pt" else path)  # RUN/weights/last.pt -> RUN


def _yolo_value(key: str, value: Any) -> dict[str, Any]:
    """One ``yolo`` argument as the yolosafe options it means."""
    option = YOLO_KEYS[key]
    if key == "device":
        return {option: yolo_device(value)}
    if key == "batch":
        batch, fraction = yolo_batch(value)
        return {option: batch, **({"memory_fraction": fraction} if fraction is not None else {})}
    if key == "mode":
        if value != "train":
            raise InputError(f"mode={value}: yolosafe train trains (mode=train); run 'yolosafe {value} ...' for "
                             "Ultralytics' own")
        return {}
    if key == "exist_ok":
        return {"exist_ok": value}  # yolosafe never writes into an earlier run: the next free name (train2, ...)
    if key in {"model", "data", "project", "name", "task"}:
        return {option: None if value is None else str(value)}
    return {option: value}


def yolo_words(words: list[str]) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """The words of a ``yolo train`` command typed as Ultralytics types them: the Ultralytics arguments, the
    yolosafe options the others mean, and the word each option came from."""
    try:
        typed, _ = trainplan.read_words(words)
    except trainplan.PlanError as exc:
        raise InputError(str(exc)) from None
    if typed.get("cfg") is not None:
        typed = {**_read_cfg(typed.pop("cfg")), **typed}
    typed.pop("cfg", None)
    resume_dir = _resume_dir(typed.pop("resume", None), typed.get("model"))
    if resume_dir is not None and typed.get("model") is not None and Path(str(typed["model"])).suffix == ".pt" \
            and Path(str(typed["model"])).resolve().parent.parent == Path(resume_dir).resolve():
        typed.pop("model")  # the run's own checkpoint: the run resumes from it
    rest, mapped, origin = {}, {}, {}
    for key, value in typed.items():
        if key not in YOLO_KEYS:
            rest[key] = value
            continue
        for option, meant in _yolo_value(key, value).items():
            mapped[option], origin[option] = meant, yolowords.word(key, value)
    if resume_dir is not None:
        mapped["resume_dir"], origin["resume_dir"] = resume_dir, f"resume={resume_dir}"
    return rest, mapped, origin


def yolo_style(given: Mapping[str, Any]) -> dict[str, Any]:
    """The options ``given`` with ``yolo train``'s own words (``model=``, ``data=``, ``device=``, ``batch=``,
    ``epochs=``, ``nbs=``, ``resume=``, ``cfg=``, the task word, bare flags...) turned into the yolosafe options they
    mean; the other words stay Ultralytics arguments, as the ``key=value`` words that read back as Ultralytics typed
    them. A flag and its key with different values is refused."""
    options = dict(given)
    if "batch" in options:
        options["batch"], fraction = yolo_batch(options["batch"])
        if fraction is not None:
            options.setdefault("memory_fraction", fraction)
    rest, mapped, origin = yolo_words(list(options.get("args") or []))
    if "callbacks" in rest or "trainer" in rest:  # callbacks=module:function, trainer=module:Class
        words = usercode.refs(rest.pop("callbacks", None), rest.pop("trainer", None)) or {}
        api = options.get("user_code") or {"callbacks": [], "trainer": None}
        options["user_code"] = {"callbacks": [*api["callbacks"], *words["callbacks"]],
                                "trainer": words["trainer"] or api["trainer"]}
    for option, meant in mapped.items():
        if given.get(option) is not None and options[option] != meant:
            flag = "--" + option.replace("_dir", "").replace("_", "-")
            raise InputError(f"{flag} {given[option]} and {origin[option]} disagree: give one of them")
    options.update(mapped)
    if options.pop("exist_ok", None) is True:  # said in one line when the run starts (TrainOptions.differences)
        options["differences"] = ("exist_ok=True: yolosafe never writes into an earlier run; this run gets the next "
                                  "free name",)
    if "args" in given:
        options["args"] = [yolowords.word(k, v) for k, v in rest.items()]
    return options
