"""Stragglers: a rank whose own part of each training step takes persistently longer than the other ranks'.

In DDP every rank waits for the slowest at each step's gradient all-reduce, so the steps of all ranks last equally
long and a thermally throttled, slower or shared GPU, a busy CPU or a slow disk only shows in what each rank does
alone: from the end of its last step (its data wait) to the end of its forward. Each rank measures that itself and
reports it with its heartbeat (``own``, ``steps``: :mod:`yolosafe.rundir.heartbeat`); this module compares the ranks
of a node window by window. Pure: fed the beats the hang watch read.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from yolosafe.rundir.heartbeat import Beat

WINDOW_STEPS = 25  # a comparison once every rank did this many more steps
WINDOWS = 2  # consecutive windows the same rank must be the slow one in
RATIO = 1.5  # its own time per step against the median of the others'
MIN_EXCESS_S = 0.005  # and at least this much longer per step (below it, noise)


@dataclass
class Stragglers:
    """One attempt's comparison (:meth:`feed` at every read); ``found`` what was named, one entry per rank."""

    window: int = WINDOW_STEPS
    windows: int = WINDOWS
    ratio: float = RATIO
    found: list[dict[str, Any]] = field(default_factory=list)
    _start: dict[int, tuple[float, int]] = field(default_factory=dict)
    _strikes: dict[int, int] = field(default_factory=dict)

    def feed(self, beats: Mapping[int, Beat]) -> dict[str, Any] | None:
        """The straggler named at this read (once per rank), else None."""
        if len(beats) < 2:
            return None
        start = {r: self._start.get(r, (0.0, 0)) for r in beats}
        if any(b.steps - start[r][1] < self.window for r, b in beats.items()):
            return None
        means = {r: (b.own - start[r][0]) / (b.steps - start[r][1]) for r, b in beats.items()}
        self._start = {r: (b.own, b.steps) for r, b in beats.items()}
        slow = max(means, key=lambda r: means[r])
        others = statistics.median(v for r, v in means.items() if r != slow)
        persistent = others > 0 and means[slow] >= self.ratio * others and means[slow] - others >= MIN_EXCESS_S
        self._strikes = {slow: self._strikes.get(slow, 0) + 1} if persistent else {}
        if self._strikes.get(slow, 0) < self.windows or any(f["rank"] == slow for f in self.found):
            return None
        named = {"rank": slow, "ratio": round(means[slow] / others, 2), "own_s": round(means[slow], 4),
                 "others_s": round(others, 4), "steps": self.window * self.windows, "epoch": beats[slow].epoch}
        self.found.append(named)
        return named


def describe(named: Mapping[str, Any], node: int = 0) -> str:
    """The one warning that names a straggler."""
    where = f"rank {named['rank']}" + (f" of node {node}" if node else "")
    return (f"straggler: {where}'s own part of each training step (data wait and forward) takes {named['ratio']:g}x "
            f"the other ranks' ({named['own_s'] * 1000:.0f} ms against {named['others_s'] * 1000:.0f} ms, over "
            f"{named['steps']} steps, epoch {named['epoch'] + 1}); every rank waits for it at each step: a slower, "
            "throttled or shared GPU, a busy CPU or a slow disk")
