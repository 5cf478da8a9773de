"""Where a resume continues inside an epoch and the work it trains again, read from the ranks' events (no torch).

Rank 0 records each step checkpoint it writes (``step_saved``: the epoch, the iterations of it done, of how many,
the save's seconds; :mod:`yolosafe.training.stepckpt`). The supervisor, which never reads a checkpoint with torch,
says from these where the next attempt resumes and how much of the failed attempt it trains again.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from yolosafe.rundir import files
from yolosafe.rundir.layout import RunDir
from yolosafe.rundir.records import Event, load_events


def _leads(e: Event) -> bool:
    return e.rank in (-1, 0)


def newest_save(events: list[Event]) -> Event | None:
    """The newest step checkpoint written (the one ``weights/step.pt`` holds while it exists)."""
    return next((e for e in reversed(events) if e.event == "step_saved" and _leads(e)), None)


def resume_point(run: RunDir | Path, checkpoint: Path | None, world: int | None = None,
                 batch: int | None = None) -> dict[str, Any] | None:
    """Where an attempt of ``world`` ranks at ``batch`` per rank continues from ``checkpoint``, when it is the step
    checkpoint: ``{"epoch", "iteration", "of"}`` in that attempt's iterations (0-based iteration, the first one it
    trains; at another batch the epoch keeps its samples, so its iterations are counted again:
    :func:`yolosafe.training.stepckpt.skipped_iterations`), with ``saved`` (the iteration and ``of`` as written);
    ``restart: True`` when it has another number of ranks than the save (the epoch restarts). None for an epoch
    checkpoint, or a save of unknown shape."""
    if checkpoint is None or checkpoint.name != files.STEP:
        return None
    saved = newest_save(load_events(run))
    if saved is None or saved.iteration is None or saved.of is None:
        return None
    point: dict[str, Any] = {"epoch": saved.epoch, "iteration": saved.iteration, "of": saved.of,
                             "saved": {"iteration": saved.iteration, "of": saved.of, "world": saved.world}}
    if world is not None and saved.world is not None and world != saved.world:
        return {**point, "iteration": 0, "restart": True}
    if batch and saved.shard and saved.done_samples is not None:
        of = math.ceil(saved.shard / batch)
        point.update(iteration=of - math.ceil((saved.shard - saved.done_samples) / batch), of=of)
    return point


def words(point: dict[str, Any] | None, world: int | None = None) -> str:
    """``from epoch 7, iteration 812 of 1849`` (1-based epoch and iteration, as Ultralytics prints them), or the
    one line of an epoch that restarts on another number of ranks."""
    if not point:
        return ""
    if point.get("restart"):
        was = point["saved"]["world"]
        return (f"(saved by {was} rank{'s' if was != 1 else ''} at iteration {point['saved']['iteration']} of "
                f"{point['saved']['of']}; which samples each of {world} ranks has left cannot be known: epoch "
                f"{point['epoch'] + 1} restarts from its first iteration, from last.pt)")
    return f"from epoch {point['epoch'] + 1}, iteration {point['iteration'] + 1} of {point['of']}"


def redone(run: RunDir | Path, attempt: int, point: dict[str, Any] | None, ended_at: float | None,
           iteration: int | None) -> dict[str, Any] | None:
    """What the next attempt trains again of ``attempt``: its iterations and seconds after the checkpoint resumed
    from (``point``: a step checkpoint; None: the epoch's start, last.pt). ``iteration``: where it failed, as its
    failure record says; None when unknown (a kill): the seconds alone. ``ended_at`` None: its last event's time."""
    every = [e for e in load_events(run) if e.attempt == attempt]
    events = [e for e in every if _leads(e)]
    if ended_at is None:
        ended_at = max((e.t for e in every if e.t is not None), default=None)
        if ended_at is None:
            return None
    started = [e for e in events if e.event == "train_start"]
    if not started:
        return None
    epoch = started[-1].epoch
    if point is not None and point.get("epoch") == epoch and not point.get("restart"):
        at = point["saved"]["iteration"]
        saved = next((e for e in reversed(events) if e.event == "step_saved" and e.epoch == epoch
                      and e.iteration == at), None)
        since, done = (saved.t if saved else None), at
        if iteration is None and saved is not None and saved.preempted:  # saved at the stop: nothing after it
            iteration = at
    else:
        since, done = started[-1].t, 0
    if since is None:
        return None
    return {"epoch": epoch, "iterations": None if iteration is None else max(iteration - done, 0),
            "seconds": round(max(ended_at - since, 0.0), 2)}


def save_seconds(run: RunDir | Path) -> list[float]:
    """The seconds of every step checkpoint rank 0 wrote (the share of training time they cost: ``report``)."""
    return [e.seconds for e in load_events(run) if e.event == "step_saved" and _leads(e) and e.seconds is not None]


def train_seconds(run: RunDir | Path) -> float:
    """The seconds rank 0 spent in training epochs (each train_start to its train_end, or to the attempt's last
    event for the epoch an attempt did not finish), every attempt."""
    total, started, last = 0.0, None, None
    for e in load_events(run):
        if not _leads(e) or e.t is None:
            continue
        if started is not None and e.attempt != started.attempt:  # an attempt ended inside an epoch
            total, started = total + (last or started.t) - started.t, None
        if e.event == "train_start":
            started = e
        elif e.event == "train_end" and started is not None:
            total, started = total + e.t - started.t, None
        last = e.t
    if started is not None:
        total += (last or started.t) - started.t
    return total
