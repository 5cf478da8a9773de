"""The input check: ``python -m yolosafe.training.inputcheck REQUEST.json RESULT.json``, a short-lived child that
asks Ultralytics itself whether it accepts a training, before any run directory or worker exists.

Ultralytics decides: the model is loaded as ``YOLO(model)`` loads it (its task, its trainer from the model's own task
map), the arguments go through ``get_cfg`` (unknown keys, ``check_cfg``'s types), the dataset through the task
trainer's own ``get_dataset`` (``check_det_dataset`` / ``check_cls_dataset``: a Roboflow export, a ``path:`` root,
image lists, an ImageFolder, Ultralytics' datasets dir), the images through ``BaseDataset.get_img_files``, the
optimizer through ``build_optimizer`` and the run directory's parent through ``get_save_dir``. Nothing is downloaded
unless the request says ``download``: then the dataset and the weights (the model's, and the one Ultralytics' AMP check
loads) are fetched here, once, before any rank starts.

The request file is a :class:`~yolosafe.rundir.childrecords.CheckRequest`; the result file a
:class:`~yolosafe.rundir.childrecords.CheckRefusal` (one line) or what the caller needs, a
:class:`~yolosafe.rundir.childrecords.CheckAnswer` (the task, the project folder, the number of training images, the
dataset's figures for the memory model, notes, what it read). It runs in its own process so that torch,
Ultralytics and any CUDA initialisation stay out of the supervisor's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from yolosafe.errors import UsageError
from yolosafe.rundir.childrecords import CheckAnswer, CheckRefusal, CheckRequest, CheckResult, save_check_result
from yolosafe.training import offline

TRAINABLE_SUFFIXES = (".pt", ".yaml", ".yml")  # what Ultralytics' Model.train accepts (_check_is_pytorch_model)


class Refused(UsageError):
    """Ultralytics (or the check) refuses the training; ``str()`` is one line for the user."""


def one_line(exc: BaseException) -> str:
    """An Ultralytics error as one line: the cause's text where it wraps one, without emojis or blank lines."""
    while exc.__cause__ is not None and (str(exc).startswith("Dataset '") or "Error loading data" in str(exc)):
        exc = exc.__cause__
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return "".join(ch for ch in text if ord(ch) < 0x2000 or ch in "…").strip()


def model_of(name: str) -> Any:
    """The model as ``yolo``'s entrypoint builds it: ``RTDETR`` for an ``rtdetr`` name (its guess of the architecture;
    tests/test_yolowords.py pins it), else ``YOLO``."""
    from ultralytics import RTDETR, YOLO

    return RTDETR(name) if "rtdetr" in Path(name).stem.lower() else YOLO(name)


def load_model(request: CheckRequest) -> Any:
    """The model as ``YOLO(model)`` loads it; a release name not here is fetched only when downloads are asked for."""
    from ultralytics.nn.tasks import torch_safe_load
    from ultralytics.utils.checks import check_model_file_from_stem
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES

    flag = f"--model {request.model}"
    name = str(check_model_file_from_stem(str(request.model)))  # yolov8n -> yolov8n.pt, as YOLO() resolves it
    path = Path(name)
    if path.suffix not in TRAINABLE_SUFFIXES:
        raise Refused(f"{flag}: expected a model YAML (yolov8n.yaml) or a checkpoint (.pt): Ultralytics trains those")
    if path.suffix == ".pt" and not path.is_file():
        if os.sep in name or path.name not in GITHUB_ASSETS_NAMES:
            raise Refused(f"{flag}: no such file")
        if not request.download:
            raise Refused(f"{flag}: not here; add --download to let Ultralytics fetch it (once, before training)")
    elif path.suffix == ".pt":
        try:
            torch_safe_load(name)
        except Exception as exc:
            raise Refused(f"{flag}: not a readable PyTorch checkpoint ({one_line(exc)})") from None
    fetched = path.suffix == ".pt" and not path.is_file()
    try:
        return model_of(name)  # the worker's own load: task= is checked against the model's task, never forced on it
    except Exception as exc:
        if fetched:
            raise Refused(f"cannot load model {name!r}: {one_line(exc)}") from None
        raise Refused(_unloadable(name, exc)) from None


def _unloadable(name: str, exc: Exception) -> str:
    flag, path = f"--model {name}", Path(name)
    if isinstance(exc, FileNotFoundError):
        return f"{flag}: no such file, and not a model Ultralytics knows ({one_line(exc)})"
    what = "not an Ultralytics checkpoint" if path.suffix == ".pt" else "not a model YAML Ultralytics can build"
    return f"{flag}: {what} ({type(exc).__name__}: {one_line(exc)})"


def train_args(request: CheckRequest, task: str) -> Any:
    """The arguments as the trainer would get them: ``get_cfg`` over Ultralytics' defaults (``check_cfg`` inside)."""
    from ultralytics.cfg import DEFAULT_CFG, get_cfg

    overrides = {**request.overrides, "model": request.model, "data": request.data, "task": task,
                 "mode": "train", "device": "cpu"}
    try:
        return get_cfg(DEFAULT_CFG, overrides)
    except (SyntaxError, TypeError, ValueError) as exc:
        raise Refused(one_line(exc)) from None


def offline_dataset(request: CheckRequest, task: str, notes: list[str]) -> bool:
    """Whether the data is on disk without downloading; Ultralytics' own resolution, its download switched off."""
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.utils import DATASETS_DIR

    if request.download:
        return True  # the trainer's own get_dataset below downloads what is missing, here, once
    data = str(request.data)
    hint = "add --download to let Ultralytics download it (once, before training)"
    if task == "classify":
        if Path(data).is_dir() or (DATASETS_DIR / data).is_dir() or Path(data).suffix:
            return True
        missing = f"--data {data}: no such directory here or in Ultralytics' datasets dir {DATASETS_DIR}"
    else:
        try:
            check_det_dataset(data, autodownload=False)
            return True
        except FileNotFoundError as exc:
            missing = f"--data {data}: {one_line(exc).split(' Note dataset download directory')[0]}"
            if "images not found" not in missing:
                raise Refused(missing) from None
        except Exception as exc:
            raise Refused(f"--data {data}: {one_line(exc)}") from None
    if request.dry_run:
        notes.append(f"{missing}; a real run needs --download")
        return False
    raise Refused(f"{missing}; {hint}")


def dataset(trainer_cls: type, args: Any) -> tuple[dict[str, Any], Any]:
    """The task trainer's own ``get_dataset`` (Ultralytics' checks of this task's data), on a trainer not set up."""
    trainer = trainer_cls.__new__(trainer_cls)
    trainer.args = args
    try:
        trainer.data = trainer.get_dataset()
    except Exception as exc:
        raise Refused(f"--data {args.data}: {one_line(exc)}") from None
    return trainer.data, trainer


def image_files(data: dict[str, Any], args: Any, task: str) -> dict[str, list[str]]:
    """The images of the training and validation splits, listed as the training's datasets list them ({} for
    classification: ``check_cls_dataset`` counted them and refuses a training split without images)."""
    from ultralytics.data.base import BaseDataset

    if task == "classify":
        return {}
    files = {}
    for split in ("train", "val"):
        reader = SimpleNamespace(prefix="", fraction=args.fraction if split == "train" else 1.0)
        try:
            files[split] = BaseDataset.get_img_files(reader, data[split])
        except Exception as exc:
            if isinstance(exc.__cause__ or exc, UnicodeDecodeError):  # Ultralytics wraps what it cannot read
                why = "its image list is not UTF-8 text; save it as UTF-8"
                raise Refused(f"--data {args.data}: {split}: {why}") from None
            raise Refused(f"--data {args.data}: {split}: {one_line(exc)}") from None
    return files


def dataset_figures(files: dict[str, list[str]]) -> dict[str, Any]:
    """What the memory model reads from the dataset, over the images Ultralytics listed: objects per image of each
    split (the label files it pairs with them) and the validation images' shapes (its rect batches)."""
    from ultralytics.data.utils import img2label_paths

    from yolosafe.planning.memory import objects, valshapes

    if not files:
        return {}
    counts = {split: objects.label_counts(img2label_paths(images)) for split, images in files.items()}
    return {"objects": {split: c for split, c in counts.items() if c},
            "val_ratios": valshapes.image_ratios(files["val"])}


def check_optimizer(trainer: Any, args: Any) -> None:
    """``optimizer=``, as the trainer's ``build_optimizer`` reads it (on a one-layer stand-in for the model).
    Ultralytics' own default needs no check, and building a torch optimizer costs seconds (it loads torch's
    compiler)."""
    from ultralytics.cfg import DEFAULT_CFG

    if args.optimizer == DEFAULT_CFG.optimizer:
        return
    import torch

    try:
        trainer.build_optimizer(torch.nn.Linear(1, 1), name=args.optimizer, lr=args.lr0, momentum=args.momentum,
                                decay=args.weight_decay, iterations=1)
    except NotImplementedError as exc:
        raise Refused(f"optimizer={args.optimizer}: {one_line(exc)}") from None
    except Exception:  # a known optimizer that needs the real model's layers (MuSGD): the name is what counts here
        pass


def amp_check_weights(download: bool, args: Any, notes: list[str]) -> None:
    """With ``download``: the weights Ultralytics' AMP check loads on rank 0 of a GPU training, fetched here, once,
    so no attempt downloads them (:mod:`yolosafe.training.offline`). A failed fetch is a note: offline, the check is
    skipped as Ultralytics skips it."""
    if not download or not offline.amp_wanted(args.amp):
        return
    try:
        offline.fetch_amp_weights()
    except Exception as exc:
        notes.append(f"AMP: {offline.AMP_WEIGHTS} could not be fetched ({one_line(exc)}); the AMP check is skipped "
                     "as Ultralytics skips it offline")


def project_dir(request: CheckRequest, task: str) -> dict[str, Any]:
    """The folder Ultralytics puts this task's runs in (``runs/<task>``, its ``runs_dir`` setting, ``project=``), and
    how it came from what was asked, for a kept verdict (``planning.checkcache``) to give another directory or
    another ``project=`` its own: relative to the working directory when Ultralytics derived it from there (a relative
    ``runs_dir`` or ``project=``, which it resolves), or the absolute ``project=`` itself."""
    from ultralytics.cfg import get_save_dir
    from ultralytics.utils import SETTINGS

    where = SimpleNamespace(project=request.project, name=run_name(request), task=task, mode="train",
                            exist_ok=True, save_dir=None)
    folder = str(get_save_dir(where).parent)
    asked = request.project or ""
    from_cwd = not Path(asked).is_absolute() and (bool(asked) or not Path(SETTINGS["runs_dir"]).is_absolute())
    return {"project": folder, "project_in_cwd": os.path.relpath(folder) if from_cwd else None,
            "project_is_asked": bool(asked) and Path(asked).is_absolute() and folder == str(Path(asked).resolve())}


def run_name(request: CheckRequest) -> str:
    """The run's name as Ultralytics' ``get_cfg`` makes it: ``name=model`` becomes the model's stem (a number is
    text already, from the caller)."""
    from ultralytics.cfg import DEFAULT_CFG, get_cfg

    return str(get_cfg(DEFAULT_CFG, {"name": request.name, "model": request.model}).name)


def reads(request: CheckRequest, data: dict[str, Any] | None, files: dict[str, list[str]]) -> list[str]:
    """What this answer was read from, for the verdict cache (``planning.checkcache``): Ultralytics' settings (its
    runs' and datasets' folders), the model file, the data
    YAML, each split's list file or folder (a classification split's class folders too), and every folder of the
    images listed and of the labels Ultralytics pairs with them (a folder's time changes when a file in it is added,
    removed or replaced)."""
    from ultralytics.data.utils import img2label_paths
    from ultralytics.utils import SETTINGS

    found = [str(Path(SETTINGS.file).resolve())]
    if Path(request.model).is_file():
        found.append(str(Path(request.model).resolve()))
    if not data:
        return found
    if data.get("yaml_file"):
        found.append(str(Path(data["yaml_file"]).resolve()))
    for split in ("train", "val", "test"):
        entries = data.get(split)
        for entry in entries if isinstance(entries, list) else [entries]:
            if not entry:
                continue
            found.append(str(Path(entry).resolve()))
            if not files and Path(entry).is_dir():  # classification: one folder per class
                found += [str(p.resolve()) for p in Path(entry).iterdir() if p.is_dir()]
    for images in files.values():
        one_per_folder = {str(Path(f).parent): f for f in images}
        found += list(one_per_folder)
        found += [str(Path(label).parent) for label in img2label_paths(list(one_per_folder.values()))]
    return found


def user_trainer(code: dict[str, Any] | None, base: type, task: str) -> type:
    """The user's trainer class (or the task's), their callbacks loaded as a rank loads them: what a rank would fail
    on is one line here, before any run directory exists."""
    if not code:
        return base
    from ultralytics.utils.callbacks.base import default_callbacks

    from yolosafe.planning import usercode

    try:
        callbacks, trainer = usercode.callbacks_of(code), usercode.trainer_of(code)
    except Exception as exc:  # the user's import or unpickling: any error is theirs
        raise Refused(f"callbacks/trainer: cannot be loaded ({type(exc).__name__}: {one_line(exc)})") from None
    for event, fn in callbacks:
        if event not in default_callbacks:
            raise Refused(f"callbacks: {event!r} is not an Ultralytics callback event ({', '.join(default_callbacks)})")
        if not callable(fn):
            raise Refused(f"callbacks: {event} is given {fn!r}, not a function")
    if trainer is None:
        return base
    if not (isinstance(trainer, type) and issubclass(trainer, base)):
        raise Refused(f"trainer={getattr(trainer, '__name__', trainer)!r}: a {task} model trains with {base.__name__} "
                      "or a subclass of it")
    return trainer


def check(request: CheckRequest) -> CheckAnswer:
    model = load_model(request)
    task = model.task
    if request.task not in (None, task):
        raise Refused(f"task={request.task}: --model {request.model} is a {task} model")
    trainer_cls = user_trainer(request.user_code, model.task_map[task]["trainer"], task)
    args = train_args(request, task)
    notes: list[str] = []
    images, figures, data, files = None, {}, None, {}
    if offline_dataset(request, task, notes):
        data, trainer = dataset(trainer_cls, args)
        files = image_files(data, args, task)
        images, figures = (len(files["train"]) if files else None), dataset_figures(files)
        check_optimizer(trainer, args)
    amp_check_weights(request.download, args, notes)
    name = run_name(request)
    if name != request.name:
        notes.append(f"name={request.name} is name={name}, as Ultralytics names the run")
    return CheckAnswer(task=task, **project_dir(request, task), name=name, train_images=images, dataset=figures,
                       notes=notes, reads=reads(request, data, files))


def main(argv: list[str] | None = None) -> None:
    request_path, result_path = sys.argv[1:3] if argv is None else argv
    os.environ.pop("PYTEST_CURRENT_TEST", None)  # Ultralytics answers for the user's command, not a test runner's
    request = CheckRequest.load(Path(request_path))
    result: CheckResult
    try:
        with offline.no_probes(lambda: request.download):  # the network only when --download asks
            result = check(request)
    except Refused as exc:
        result = CheckRefusal(str(exc))
    save_check_result(Path(result_path), result)


if __name__ == "__main__":
    main()
