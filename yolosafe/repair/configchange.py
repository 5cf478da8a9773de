"""The training-config change ``yolosafe fix`` proposes after a run that ran out of memory.

The config is read and checked by the code of ``yolosafe train --config`` (``options.load_config`` and ``plan``), the
change is computed with ``plan`` (half the per-GPU batch that ran out of memory, the config's own effective batch
kept; or what finally worked, for a run that recovered by itself), and the config must belong to the run: the GPUs,
model, data and batches it names must be those the run started with.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from yolosafe.errors import YolosafeError
from yolosafe.planning import gpuselect
from yolosafe.planning import trainplan as plan
from yolosafe.rundir.records import VAL_PHASES, Failure, Story, epoch_label


class ConfigFixError(YolosafeError, ValueError):
    """The config cannot be adapted (unreadable, invalid, made for another run); one line."""


@dataclass
class ConfigChange:
    """What to write (canonical key -> value) and why, one line per reason."""

    changes: dict[str, int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)


def read_config(path: Path) -> dict[str, Any]:
    """``options.load_config``: the reader of ``yolosafe train --config``; its usage error becomes one line here."""
    from yolosafe.planning import options

    try:
        return options.load_config(str(path))
    except options.InputError as exc:
        raise ConfigFixError(str(exc)) from None


def config_plan(config: dict[str, Any], story: Story, **override: Any) -> plan.TrainPlan:
    """The plan the config gives on the run's GPUs (keys it lacks come from the run), checked by ``plan``."""
    ran = story.plan
    values = {key: config.get(key, ran.get(key)) for key in ("batch", "val_batch", "imgsz", "epochs")}
    values["effective_batch"] = config.get("effective_batch")
    values.update(override)
    try:
        return plan.replan(ran, model=config.get("model") or ran.get("model"), gpus=tuple(story.plan_gpus),
                           batch=int(values["batch"]),
                           effective_batch=values["effective_batch"],
                           val_batch=None if values["val_batch"] is None else int(values["val_batch"]),
                           imgsz=int(values["imgsz"]), epochs=int(values["epochs"]),
                           extra=plan.parse_passthrough(config.get("args") or []))
    except (plan.PlanError, TypeError, ValueError) as exc:
        raise ConfigFixError(f"the config is not valid for this run: {exc}") from None


def mismatch(config: dict[str, Any], story: Story) -> str | None:
    """Why the config is not the one the run started from, or None."""
    ran = story.plan
    if config.get("gpus") is not None:
        try:
            gpus = gpuselect.parse_gpus(str(config["gpus"]), story.plan_gpus)
        except plan.PlanError:
            gpus = None
        if gpus != tuple(story.plan_gpus):
            return f"gpus {config['gpus']} in the config, {ran.get('device')} in the run"
    names = (story.dataset or {}).get("name"), (story.dataset or {}).get("yaml"), ran.get("data")
    if config.get("data") is not None and str(config["data"]) not in names:
        return f"data {config['data']} in the config, {names[0] or names[2]} in the run"
    for key in ("model", "imgsz", "batch", "effective_batch", "val_batch"):
        if config.get(key) is not None and ran.get(key) is not None and str(config[key]) != str(ran[key]):
            return f"{key} {config[key]} in the config, {ran[key]} in the run"
    return None


def _smallest(records: list[Failure], val: bool, attr: str) -> Failure | None:
    """The OOM record of validation (or of training) with the smallest batch that still failed."""
    found = [r for r in records if r.oom and (r.phase in VAL_PHASES) == val and getattr(r, attr)]
    return min(found, key=lambda r: getattr(r, attr)) if found else None


def targets(story: Story, failures: list[Failure]) -> tuple[tuple[int, str] | None, tuple[int, str] | None]:
    """((per-GPU batch, why), (val batch per GPU, why)) the run says the config should use at most."""
    done = [a for a in story.attempts if a.outcome == "completed"]
    if any(f.oom for f in failures) and done and done[-1].per_gpu_batch:
        last = done[-1]
        why = f"what attempt {last.attempt} completed with after the OOMs"
        return (last.per_gpu_batch, why), (last.val_batch, why) if last.val_batch else None
    found = []
    for val, attr in ((False, "batch"), (True, "val_batch")):
        r = _smallest(failures, val, attr)
        size = getattr(r, attr) if r else None
        where = f"in {r.phase or 'training'} at {epoch_label(r.epoch, story.plan.get('epochs'))}" if r else ""
        found.append((max(size // 2, 1), f"half of {size} per GPU, which ran out of memory {where} "
                                         f"(attempt {r.attempt})") if r and size else None)
    return found[0], found[1]


def propose(config_path: Path, story: Story, failures: list[Failure]) -> ConfigChange:
    """The change, or an empty one with the reason nothing is needed; ConfigFixError when it cannot be made."""
    config = read_config(config_path)
    current = config_plan(config, story)
    train, val = targets(story, failures)
    if train is None and val is None:
        return ConfigChange(reasons=["the run had no OOM: nothing to change"])
    change = ConfigChange()
    if train is not None and current.per_gpu_batch > train[0]:
        _batch_change(config, story, current, train, change)
    if val is not None and current.val_batch > val[0]:
        change.changes["val_batch"] = val[0]
        change.reasons.append(f"val_batch {current.val_batch} -> {val[0]} per GPU: {val[1]}")
    if not change.changes:
        return ConfigChange(reasons=["the config is already at or below what the run asks for: nothing to change"])
    off = mismatch(config, story)
    if off:
        raise ConfigFixError(f"{config_path} does not belong to the run ({off}): not changed")
    config_plan(config, story, **change.changes)  # the result must be a valid plan too
    return change


def _batch_change(config: dict[str, Any], story: Story, current: plan.TrainPlan, target: tuple[int, str],
                  change: ConfigChange) -> None:
    """Half the per-GPU batch through ``TrainPlan.halved`` (repeated down to the target), and the config's own
    effective batch kept: written out when the config has none, since the default follows the batch."""
    per_gpu, why = target
    smaller: plan.TrainPlan | None = current
    while smaller is not None and smaller.per_gpu_batch > per_gpu:
        smaller = smaller.halved()
    if smaller is None:
        raise ConfigFixError(f"cannot go below 1 image per GPU ({why})")
    change.changes["batch"] = smaller.batch
    kept = current.effective_batch
    if config.get("effective_batch") is None:
        change.changes["effective_batch"] = kept
        ran = story.plan.get("effective_batch")
        other = f"; the run itself used {ran}, given on its command line" if ran not in (None, kept) else ""
        note = (f"the config has no effective_batch: with batch {current.batch} it means Ultralytics' default, "
                f"an effective batch of {kept}; written so it stays {kept}{other}")
    else:
        note = f"effective_batch {kept} (the config's own) kept"
    accumulate = replace(smaller, effective_batch=change.changes.get("effective_batch", kept)).accumulate
    change.reasons.append(f"batch {current.batch} -> {smaller.batch} ({current.per_gpu_batch} -> "
                          f"{smaller.per_gpu_batch} per GPU over {current.world_size} GPU(s)), {note} "
                          f"(accumulation {current.accumulate} -> {accumulate}): {why}")
