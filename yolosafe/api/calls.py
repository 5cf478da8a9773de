"""The library's entry points: :func:`train` and :func:`plan` (``yolosafe.train``, ``yolosafe.plan``), and what the
command line calls under them.

Keywords are yolosafe's options by their flags' names (``gpus``, ``effective_batch``, ``val_batch``,
``max_retries``...), the Ultralytics words of a ``model.train(...)`` call (``device=[0, 1]``, ``batch=-1``), and
every other Ultralytics train argument (``lr0=0.01``), passed through as the command line's ``key=value`` words.
Bad input raises a :class:`yolosafe.errors.UsageError` before a run directory exists; a run that does not complete
raises a :class:`yolosafe.errors.TrainingError` carrying its :class:`~yolosafe.api.result.Run`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from yolosafe import gpus as inventory_of
from yolosafe.api import trainrun
from yolosafe.api.result import Plan, Run
from yolosafe.errors import OutOfMemoryRetriesExhausted, TrainingFailed, TrainingInterrupted, UsageError, YolosafeError
from yolosafe.exits import Exit
from yolosafe.planning import options, usercode, validate, yolowords
from yolosafe.planning.memory import model as memmodel
from yolosafe.planning.memory import planner
from yolosafe.planning.trainoptions import TrainOptions
from yolosafe.rundir import records
from yolosafe.supervisor import children
from yolosafe.supervisor.multinode import setup as multicli

OPTION_KEYS = tuple(key for key in options.DEFAULTS if key != "args")  # yolosafe's own options, as keywords
FILE_KEYS = {"config": "config_file", "datasets": "datasets_file"}  # keyword -> the command line's parameter
PATH_KEYS = ("model", "data", "project", "config_file", "datasets_file")


def train(model: str | Path | None = None, data: str | Path | None = None, *, device: Any = None,
          batch: int | float | str | None = None, epochs: int | None = None, imgsz: int | None = None,
          gpus: Any = None, effective_batch: int | None = None, val_batch: int | None = None,
          max_retries: int | None = None, resume: str | Path | None = None, **kwargs: Any) -> Run:
    """Train under yolosafe's supervision (one worker, or one rank per GPU) and return the completed run.

    ``device`` is Ultralytics' (``[0, 1, 2, 3]``, ``"0,1"``, ``"cpu"``, ``-1`` = auto) or ``gpus`` yolosafe's
    (``"0,1"``, ``"all"``, ``"auto:2"``, ``"cpu"``); ``batch`` is the total over every GPU, ``"auto"``, ``-1``
    (auto) or a fraction (auto, filling that share of the free memory). Further keywords: ``min_batch``,
    ``alloc_conf``, ``project``, ``name``, ``watch_interval``, ``warn_at``, ``clear_before_val``,
    ``hang_timeout``, ``max_hang_restarts``, ``save_every``,
    ``memory_fraction``, ``config`` (a ``--config`` YAML), ``datasets`` (a registry), the node options
    (``nnodes``, ``node_rank``, ``rdzv_endpoint``, ``rdzv_id``, ``rdzv_timeout``), and Ultralytics train arguments.
    ``resume=RUN_DIR`` continues that run (with the GPUs, batches and retries given, if any).

    Raises :class:`~yolosafe.errors.UsageError` for bad input, and for a run that started and did not complete
    :class:`~yolosafe.errors.OutOfMemoryRetriesExhausted`, :class:`~yolosafe.errors.TrainingFailed` or
    :class:`~yolosafe.errors.TrainingInterrupted` (a ``KeyboardInterrupt``: every rank is stopped first).
    """
    named = {"model": model, "data": data, "device": device, "batch": batch, "epochs": epochs, "imgsz": imgsz,
             "gpus": gpus, "effective_batch": effective_batch, "val_batch": val_batch, "max_retries": max_retries}
    given, node_params = given_of({**named, **kwargs})
    if kwargs.get("dry_run"):
        raise UsageError("dry_run: yolosafe.plan(...) returns the plan without training")
    ended = run_training(given, resume, node_params, command=["yolosafe.train", *_call_words(named, kwargs)])
    return finish(ended)


def plan(model: str | Path | None = None, data: str | Path | None = None, **kwargs: Any) -> Plan:
    """The plan ``train`` with the same keywords would run, and the memory it predicts per GPU; trains nothing."""
    given, node_params = given_of({"model": model, "data": data, **kwargs})
    opts = trainrun.resolve(given, given.get("config_file"), given.get("datasets_file"))
    where = multicli.resolve(node_params)  # batch is the total over every node's GPUs
    opts = opts.replace(nnodes=where.nnodes)  # --batch auto over several nodes: refused there
    return plan_of(opts, inventory_of.read_inventory())


def plan_of(opts: TrainOptions, inventory: inventory_of.Inventory) -> Plan:
    """The plan of resolved options on ``inventory``'s GPUs, with ``batch="auto"`` chosen and the memory predicted."""
    opts = trainrun.ultralytics_accepts(opts, dry_run=True)  # what Ultralytics accepts, Ultralytics decides
    opts, auto = planner.resolve_auto(opts, inventory, fake_pass=children.fake_pass)
    built = trainrun.build(opts, inventory)
    built = built if opts.train_images is None else dataclasses.replace(built, train_images=opts.train_images)
    memory = planner.memory_plan(built, inventory, opts, fake_pass=children.fake_pass, auto=auto)
    if memory is None:
        raise memmodel.UnknownModel(f"{built.model}: no memory figures (not in the table, and weights cannot be "
                                    "fake-passed); give the model's YAML")
    return Plan(plan=built, memory=memory, auto=auto)


def run_training(given: dict[str, Any], resume: str | Path | None, node_params: Mapping[str, Any],
                 dry_run: bool = False, command: list[str] | None = None) -> trainrun.Ended:
    """A new run, or the resume of ``resume``, from the options ``given`` (the command line's, or the keywords')."""
    validate.check_injection(os.environ)
    given = options.yolo_style(given)  # yolo train's own key=value names too (model=, device=, batch=-1, ...)
    resume = resume if resume is not None else given.get("resume_dir")
    where = multicli.resolve(dict(node_params))  # --nnodes ... or SLURM's variables; one machine without either
    try:
        if resume is not None:
            if not str(resume).strip():  # an unset variable ($RUN): never a new training instead
                raise UsageError(f"--resume {str(resume)!r}: empty; give the run directory to resume")
            if str(resume).strip() == trainrun.RESUME_AUTO:
                return trainrun.resume_auto(given, dry_run, where)
            return trainrun.resume_run(Path(resume), given, dry_run, where)
        opts = trainrun.resolve(given, given.get("config_file"), given.get("datasets_file"))
        if command:
            opts = opts.replace(command=command)
        return trainrun.new_run(opts, dry_run, where)
    except SystemExit as exc:  # nothing below exits on purpose; a library call must not end its caller
        raise YolosafeError(f"stopped with exit status {exc.code}") from None


def finish(ended: trainrun.Ended) -> Run:
    """The run as its story says once it ended; its lock given up (the calling process may resume it); a run that
    did not complete raised as the :class:`~yolosafe.errors.TrainingError` of its end."""
    ended.run.unlock()
    where = ended.run.resolve()
    try:
        run = Run.of(where, records.load_story(where))
    except (OSError, records.RecordError):
        run = Run(run=where, outcome=None, exit_code=Exit(ended.code))
    if ended.code == Exit.OK:
        return run
    log = ended.run.log
    if ended.code == Exit.OOM_EXHAUSTED:
        raise OutOfMemoryRetriesExhausted(f"{ended.run_dir}: still out of GPU memory after the retries; see {log}",
                                          run)
    if ended.code == Exit.INTERRUPTED:
        hint = f"yolosafe.train(resume={str(ended.run_dir)!r})"
        raise TrainingInterrupted(f"{ended.run_dir}: stopped; resume with {hint}", run)
    raise TrainingFailed(f"{ended.run_dir}: training {run.outcome or 'failed'}; see {log}", run)


def given_of(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keywords as the command line's options: yolosafe's (``device``/``batch`` read as Ultralytics reads them),
    the node options, and the rest as Ultralytics ``key=value`` words (in ``given["args"]``)."""
    values = {k: v for k, v in kwargs.items() if v is not None and k != "dry_run"}
    node_params = {k: values.pop(k) for k in multicli.NODE_KEYS if k in values}
    user_code = usercode.refs(values.pop("callbacks", None), values.pop("trainer", None))  # for every rank
    given: dict[str, Any] = {FILE_KEYS.get(k, k): values.pop(k) for k in [*OPTION_KEYS, *FILE_KEYS] if k in values}
    if "device" in values:
        _merge_device(given, values.pop("device"))
    if "gpus" in given:
        given["gpus"] = _gpu_words(given["gpus"], "gpus")
    if "batch" in given:
        _read_batch(given)
    for key in PATH_KEYS:
        if isinstance(given.get(key), os.PathLike):
            given[key] = os.fspath(given[key])
    words = [yolowords.word(key, os.fspath(value) if isinstance(value, os.PathLike) else value)
             for key, value in values.items()]
    if words:
        given["args"] = words
    if user_code:
        given["user_code"] = user_code
    return given, node_params


def _gpu_words(value: Any, name: str) -> str:
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise UsageError(f"{name}={value!r}: give GPU ids, e.g. {name}=[0, 1]")
        return ",".join(map(str, value)) or "cpu"
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        return options.yolo_device(value) or value  # the command line's device= mapping
    raise UsageError(f"{name}={value!r}: give GPU ids (e.g. [0, 1] or '0,1'), 'cpu' or -1 (auto)")


def _merge_device(given: dict[str, Any], device: Any) -> None:
    """Ultralytics' ``device`` is yolosafe's ``gpus``; both given, they must agree."""
    gpus = _gpu_words(device, "device")
    if "gpus" in given and _gpu_words(given["gpus"], "gpus") != gpus:
        raise UsageError(f"device={device!r} and gpus={given['gpus']!r} disagree: give one of them")
    given["gpus"] = gpus


def _read_batch(given: dict[str, Any]) -> None:
    """``batch=-1`` is Ultralytics' AutoBatch (yolosafe's ``auto``); a fraction 0-1 is AutoBatch filling that share
    of the GPU memory (yolosafe's ``auto`` with that ``memory_fraction``)."""
    batch = given["batch"]
    if isinstance(batch, bool):
        raise UsageError(f"batch={batch!r}: give the total batch, 'auto' or -1")
    given["batch"], fraction = options.yolo_batch(batch)  # the command line's batch= mapping
    if fraction is not None:
        given.setdefault("memory_fraction", fraction)


def _call_words(named: Mapping[str, Any], kwargs: Mapping[str, Any]) -> list[str]:
    """The call, for ``yolosafe.json``'s ``command``."""
    return [f"{k}={v!r}" for k, v in {**named, **kwargs}.items() if v is not None]

