"""The training process: ``python -m yolosafe.training.worker RUN_DIR/spec-N.json``, started and watched by the
supervisor.

It trains with Ultralytics in its own process so that the allocator settings are in its environment before torch
starts CUDA, and so that an OOM kills a process, not yolosafe. For more than one GPU the supervisor starts it once
per GPU through yolosafe's launcher (:mod:`yolosafe.supervisor.launchcmd`): each copy is one DDP rank, builds
yolosafe's trainer and
trains as that rank (with fake GPUs, as a CPU rank over gloo: :mod:`yolosafe.training.fake.cpuranks`). Each process
loads its
:class:`~yolosafe.training.context.RunContext` once, from the run spec on its command line, and hands it to the
trainer and
the callbacks. It records what it saw (environment, torch, CUDA) in the run directory: proof that the settings
reached the process that allocates GPU memory.

Exit status (:class:`yolosafe.exits.Exit`): 0 done, 1 training failed (see the failure records), 4 the model could
not be loaded (SETUP), 130 stopped by yolosafe (Ctrl-C). It ends by itself when its parent is gone
(:func:`yolosafe.proc.exit_with_parent`).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

from yolosafe import bench, proc
from yolosafe.exits import Exit
from yolosafe.planning import allocator, usercode
from yolosafe.rundir import files as rundir
from yolosafe.rundir import results, runspec
from yolosafe.rundir.layout import RunDir
from yolosafe.training import callbacks, cutbars, heartbeat, offline
from yolosafe.training import failure as failurerecord
from yolosafe.training.context import Rank, RunContext
from yolosafe.training.fake import phases as fakephase


def _observed(context: RunContext, resumed_from_epoch: int | None) -> dict[str, Any]:
    import torch
    import ultralytics

    return {
        "pid": os.getpid(),
        "attempt": context.attempt,
        "env": {k: os.environ.get(k) for k in (*allocator.ENV_VARS, "CUDA_VISIBLE_DEVICES", "RANK", "WORLD_SIZE",
                                               "MASTER_ADDR", "MASTER_PORT")},
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": torch.cuda.device_count(),
        "ultralytics": ultralytics.__version__,
        "resumed_from_epoch": resumed_from_epoch,
    }


def _cannot_load(model_path: str, exc: Exception) -> NoReturn:
    """One line, no traceback: an offline download failure, a missing file, a corrupt checkpoint."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    print(f"cannot load model {model_path!r}: {first}", file=sys.stderr, flush=True)
    raise SystemExit(Exit.SETUP) from None


def _load(model_path: str) -> Any:
    """Ultralytics model from a YAML (built, no download) or weights (which Ultralytics may fetch)."""
    from yolosafe.training.inputcheck import model_of

    try:
        return model_of(model_path)
    except Exception as exc:
        _cannot_load(model_path, exc)


def install_callbacks(model: Any, context: RunContext) -> None:
    """yolosafe's callbacks on ``model``; with fake GPUs, the fake phase file's around them; the heartbeat's last
    (it reads the progress the others keep)."""
    own = callbacks.TrainingCallbacks(context).register
    if context.spec.fake_gpus:
        fakephase.FakePhaseFile(context).register_around(model, own)
    else:
        own(model)
    callbacks.add_callbacks(model, heartbeat.HeartbeatCallbacks(context).hooks())


def _save_metrics(run: RunDir, metrics: Any) -> None:
    """The final validation's metrics (a metrics object, or the checkpoint's dict after DDP)."""
    values = getattr(metrics, "results_dict", metrics)
    if isinstance(values, dict):
        numbers = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
        rundir.write_json(run.final_metrics, numbers)


def train(context: RunContext) -> None:
    from yolosafe.training.trainer import trainer_class

    spec, run_dir = context.spec, context.run_dir
    kwargs = dict(spec.train_kwargs)
    if spec.resume:
        model = _load(spec.resume)
        kwargs["resume"] = spec.resume
        # The run directory where it is now: the checkpoint's own save_dir is where the run was (moved, or copied).
        kwargs["save_dir"] = str(run_dir)
        kwargs = {k: v for k, v in kwargs.items() if k not in {"project", "name", "exist_ok"}}
        resumed_from = (model.ckpt or {}).get("epoch")
        if context.rank.leads and isinstance(resumed_from, int) and resumed_from >= 0:
            results.trim(run_dir, resumed_from + 1)  # Ultralytics appends: the epochs after the checkpoint go
    else:
        model = _load(spec.model)
        resumed_from = None
        if context.rank.leads:  # a run trained again from the start in its own directory: no rows of before
            results.trim(run_dir, 0)
    if context.rank.leads:  # one record per attempt; every rank's pid is in its events
        rundir.write_json(context.run.worker(context.attempt), _observed(context, resumed_from))
    install_callbacks(model, context)
    for event, fn in usercode.callbacks_of(spec.user_code):  # the user's, after yolosafe's: every rank
        model.add_callback(event, fn)
    base = usercode.trainer_of(spec.user_code) or model.task_map[model.task]["trainer"]
    metrics = model.train(trainer=trainer_class(model.task, context, base), **kwargs)
    if context.rank.leads:
        _save_metrics(context.run, metrics)


# What the trainer's validator gets that the training's arguments do not say, or say otherwise: the validation set's
# loader is rectangular (``build_dataset(mode="val")``, and ``YOLO.val``'s own default), final_eval turns compile off,
# and yolosafe's own batch, device and run folder.
NOT_FOR_VALIDATION = frozenset({"rect", "compile", "resume", "model", "batch", "device", "project", "name", "exist_ok",
                                "plots", "save_dir", "mode"})


def final_validation_args(context: RunContext, cuda: bool) -> dict[str, Any]:
    """``model.val()``'s arguments for the validation of best.pt alone: what the trainer's validator had (the
    user's training arguments: ``classes``, ``max_det``, ``iou``, ``conf``, ``single_cls``, ``split`` ...) and its
    precision: ``BaseValidator`` validates in FP16 on a GPU when the trainer used AMP (``quantize=16``), which
    ``final_eval`` keeps for best.pt."""
    kwargs = context.spec.train_kwargs
    amp = kwargs.get("amp", True) not in {False, "fp32"}
    return {
        **{k: v for k, v in kwargs.items() if k not in NOT_FOR_VALIDATION},
        "batch": context.spec.val_batch,
        "device": str(kwargs["device"]).split(",")[0],
        "project": kwargs["project"],
        "name": kwargs["name"],
        "exist_ok": True,
        "plots": False,
        "compile": False,
        "quantize": 16 if cuda and amp else None,
    }


def final_validation(context: RunContext) -> None:
    """Validate best.pt once more, alone on one device with a smaller batch, as the trainer's validator would have
    (:func:`final_validation_args`): training itself is finished."""
    import torch

    run = context.run
    best = run.best_checkpoint
    model = _load(str(best if best.is_file() else run.last_checkpoint))
    rundir.write_json(run.worker(context.attempt), _observed(context, None))
    context.progress.final = True
    install_callbacks(model, context)
    device = str(context.spec.train_kwargs["device"]).split(",")[0]
    cuda = device not in {"cpu", "mps"} and torch.cuda.is_available()
    try:
        metrics = model.val(**final_validation_args(context, cuda))
    except BaseException as exc:
        failurerecord.write_failure(context, exc, None, getattr(model, "device", None))
        cutbars.cut_short(exc)  # the validation's bar: train.log's (training.cutbars)
        raise
    _save_metrics(run, metrics)


def warn_unsupported_ultralytics() -> None:
    """One line on stderr when the installed Ultralytics is outside the range whose private details were verified."""
    import ultralytics

    from yolosafe.training import compat

    line = compat.version_warning(ultralytics.__version__)
    if line:
        print(line, file=sys.stderr, flush=True)


def run(spec_path: Path, rank: Rank) -> None:
    """Load this process's context (inside ``@record`` in a rank: a spec that cannot be read is in its error file)
    and do what the run spec asks."""
    context = RunContext.load(spec_path, rank)
    heartbeat.beat(context, "setup")  # from here on the supervisor's hang watch sees this process
    with offline.no_probes():  # an offline machine's attempt never waits on the network (training.offline)
        if context.spec.mode == runspec.FINAL_VAL:
            final_validation(context)
        else:
            train(context)
    heartbeat.beat(context, "done")


def _stopped(rank: Rank) -> NoReturn:
    """Stopped by yolosafe (Ctrl-C): the traceback for train.log, one line for the terminal."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher forwards the same Ctrl-C: once is enough
    traceback.print_exc()  # the supervisor's terminal filter keeps it off the terminal (yolosafe.supervisor.terminal)
    where = f"rank {rank.index}" if rank.distributed else "worker"
    print(f"yolosafe: {where} stopped by SIGINT", file=sys.stderr, flush=True)
    raise SystemExit(Exit.INTERRUPTED) from None


def main(argv: list[str] | None = None) -> None:
    proc.reset_inherited_signals()  # first: a stop must reach this process however it was started
    argv = sys.argv[1:] if argv is None else argv
    proc.exit_with_parent()  # the supervisor (or, for a rank, the launcher) SIGKILLed: end too
    rank = Rank.from_env()
    if rank.leads:
        warn_unsupported_ultralytics()  # once per attempt, not once per rank
    try:
        if rank.distributed:  # the launcher's per-rank error file gets this rank's traceback
            from torch.distributed.elastic.multiprocessing.errors import record

            bench.bench_profiled("worker", record(run), Path(argv[0]), rank)
        else:
            bench.bench_profiled("worker", run, Path(argv[0]), rank)
    except KeyboardInterrupt:
        _stopped(rank)


if __name__ == "__main__":
    main()
