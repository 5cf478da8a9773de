"""The training process: ``python -m yolosafe.worker SPEC``, started and watched by the supervisor.

It trains with Ultralytics in its own process so that the allocator settings are in its environment before torch
starts CUDA, and so that an OOM kills a process, not yolosafe. For more than one GPU the supervisor starts it once
per GPU through yolosafe's launcher (:mod:`yolosafe.launch`): each copy is one DDP rank, builds yolosafe's trainer and
trains as that rank (with fake GPUs, as a CPU rank over gloo: :mod:`yolosafe.cpuranks`). It records what it saw
(environment, torch, CUDA) in the run directory: proof that the settings reached the process that allocates GPU
memory.

Exit status: 0 done, 1 training failed (see the failure records), 3 the model or dataset could not be loaded,
130 stopped by yolosafe (Ctrl-C). It ends by itself when its parent is gone (:func:`yolosafe.proc.exit_with_parent`).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from yolosafe import allocator, callbacks, proc, rundir

EXIT_SETUP = 3  # the model could not be loaded (1, a training failure, is Python's own exit status)


def _observed(spec: dict[str, Any], resumed_from_epoch: int | None) -> dict[str, Any]:
    import torch
    import ultralytics

    return {
        "pid": os.getpid(),
        "attempt": spec["attempt"],
        "env": {k: os.environ.get(k) for k in (*allocator.ENV_VARS, "CUDA_VISIBLE_DEVICES", "RANK", "WORLD_SIZE",
                                               "MASTER_ADDR", "MASTER_PORT")},
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": torch.cuda.device_count(),
        "ultralytics": ultralytics.__version__,
        "resumed_from_epoch": resumed_from_epoch,
    }


def _load(model_path: str) -> Any:
    """Ultralytics model from a YAML (built, no download) or weights (which Ultralytics may fetch)."""
    from ultralytics import YOLO

    try:
        return YOLO(model_path)
    except Exception as exc:  # offline download failure, missing file, corrupt checkpoint: one line, no traceback
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"cannot load model {model_path!r}: {first}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_SETUP) from None


def _trainer_class(task: str, spec: dict[str, Any]) -> type:
    from yolosafe.trainer import TRAINERS

    if spec.get("fake_gpus") and callbacks.is_rank():
        from yolosafe import cpuranks

        return cpuranks.on_cpu(TRAINERS[task])
    return TRAINERS[task]


def train(spec: dict[str, Any], run_dir: Path) -> None:
    kwargs = dict(spec["train_kwargs"])
    if spec.get("resume"):
        model = _load(spec["resume"])
        kwargs["resume"] = spec["resume"]
        # The run directory where it is now: the checkpoint's own save_dir is where the run was (moved, or copied).
        kwargs["save_dir"] = str(run_dir)
        kwargs = {k: v for k, v in kwargs.items() if k not in {"project", "name", "exist_ok"}}
        resumed_from = (model.ckpt or {}).get("epoch")
    else:
        model = _load(spec["model"])
        resumed_from = None
    if callbacks.rank() <= 0:  # one record per attempt; every rank's pid is in its events
        rundir.write_json(rundir.worker_path(run_dir, spec["attempt"]), _observed(spec, resumed_from))
    callbacks.register(model)
    metrics = model.train(trainer=_trainer_class(model.task, spec), **kwargs)
    if callbacks.rank() <= 0:
        _save_metrics(run_dir, metrics)


def _save_metrics(run_dir: Path, metrics: Any) -> None:
    """The final validation's metrics (a metrics object, or the checkpoint's dict after DDP)."""
    values = getattr(metrics, "results_dict", metrics)
    if isinstance(values, dict):
        numbers = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
        rundir.write_json(run_dir / rundir.FINAL_METRICS, numbers)


def final_validation(spec: dict[str, Any], run_dir: Path) -> None:
    """Validate best.pt once more, alone on one device with a smaller batch: training itself is finished."""
    from yolosafe.trainer import write_failure

    weights = run_dir / "weights" / "best.pt"
    model = _load(str(weights if weights.is_file() else run_dir / "weights" / "last.pt"))
    rundir.write_json(rundir.worker_path(run_dir, spec["attempt"]), _observed(spec, None))
    callbacks.STATE.final = True
    callbacks.register(model)
    kwargs = spec["train_kwargs"]
    try:
        metrics = model.val(
            data=kwargs["data"],
            imgsz=kwargs["imgsz"],
            batch=spec["val_batch"],
            device=kwargs["device"].split(",")[0],
            project=kwargs["project"],
            name=kwargs["name"],
            exist_ok=True,
            plots=False,
        )
    except BaseException as exc:
        write_failure(exc, None, getattr(model, "device", None))
        raise
    _save_metrics(run_dir, metrics)


def warn_unsupported_ultralytics() -> None:
    """One line on stderr when the installed Ultralytics is outside the range whose private details were verified."""
    import ultralytics

    from yolosafe import compat

    line = compat.version_warning(ultralytics.__version__)
    if line:
        print(line, file=sys.stderr, flush=True)


def run(spec_file: Path) -> None:
    spec = rundir.read_json(spec_file)
    run_dir = Path(spec["run_dir"])
    os.environ[rundir.RUN_DIR_ENV] = str(run_dir)
    os.environ[rundir.SPEC_ENV] = str(spec_file.resolve())
    if spec["mode"] == "final_val":
        final_validation(spec, run_dir)
    else:
        train(spec, run_dir)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    proc.exit_with_parent()  # the supervisor (or, for a rank, the launcher) SIGKILLed: end too
    if not callbacks.is_rank() or callbacks.rank() == 0:
        warn_unsupported_ultralytics()  # once per attempt, not once per rank
    try:
        if callbacks.is_rank():  # the launcher's per-rank error file gets this rank's traceback
            from torch.distributed.elastic.multiprocessing.errors import record

            record(run)(Path(argv[0]))
        else:
            run(Path(argv[0]))
    except KeyboardInterrupt:  # stopped by yolosafe (Ctrl-C): the traceback for train.log, one line for the terminal
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher forwards the same Ctrl-C: once is enough
        traceback.print_exc()  # the supervisor's terminal filter keeps it off the terminal (yolosafe.terminal)
        where = f"rank {callbacks.rank()}" if callbacks.is_rank() else "worker"
        print(f"yolosafe: {where} stopped by SIGINT", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
