"""A run whose ``yolosafe.json`` is missing or damaged, resumed from what Ultralytics itself kept: ``weights/last.pt``
and ``args.yaml``.

The story is rebuilt with the plan ``args.yaml`` describes (model, data, epochs, image size, batch, ``nbs``, the
GPUs of its ``device``); the damaged file is kept beside it (``yolosafe.json.damaged``) for whoever wants to read it.
The attempts before are not known any more; the next one is numbered after the checkpoints kept in ``weights/``.
"""

from __future__ import annotations

from typing import Any

from yolosafe.planning import bounded
from yolosafe.rundir import files as rundir
from yolosafe.rundir import records
from yolosafe.rundir.layout import RunDir

ARGS = rundir.ARGS


def can_recover(run: RunDir) -> bool:
    return run.last_checkpoint.is_file() and run.args.is_file()


def _args(run: RunDir) -> dict[str, Any] | None:
    try:
        data = bounded.yaml_file(run.args, "args.yaml")
    except bounded.ReadError:
        return None
    return data if isinstance(data, dict) else None


def _gpus(device: Any) -> list[int]:
    text = str(device if device is not None else "").replace(" ", "")
    parts = text.split(",") if text else []
    return [int(p) for p in parts] if parts and all((p.isascii() and p.isdecimal()) for p in parts) else []


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def rebuild(run: RunDir, why: str, keep_damaged: bool = True) -> tuple[records.Story, str] | None:
    """The story rebuilt from ``args.yaml``, and the one line that says so; None when ``args.yaml`` cannot give a
    plan (then there is nothing to resume from). ``keep_damaged``: move a damaged story aside (not on a dry run)."""
    args = _args(run)
    if args is None:
        return None
    needed = {"model": args.get("model"), "data": args.get("data")}
    numbers = {key: _int(args.get(key)) for key in ("epochs", "batch", "imgsz")}
    if not all(isinstance(v, str) and v for v in needed.values()) or None in numbers.values():
        return None
    summary = {**needed, **numbers, "gpus": _gpus(args.get("device")), "effective_batch": _int(args.get("nbs")),
               "val_batch": None, "extra": {}}
    story_file = run.story_of_run
    if story_file.is_file() and keep_damaged:
        story_file.replace(run.damaged_story)
    kept = run.kept_attempts()
    unknown = f"not known: {rundir.STORY} was {why}"
    attempts = [records.Attempt.new(attempt=n, outcome=str(records.Outcome.ABANDONED), reason=unknown)
                for n in range(1, max(kept, default=0) + 1)]
    story = records.Story.new(run_dir=str(run.path), plan=summary, attempts=attempts,
                              outcome=str(records.Outcome.ABANDONED))
    last = run.last_checkpoint.relative_to(run.path).as_posix()
    line = (f"{rundir.STORY} is {why}: resuming from {last} and {ARGS} alone (model {needed['model']}, "
            f"{numbers['epochs']} epochs, batch {numbers['batch']}; the earlier attempts are not known)")
    return story, line
