"""A rank's heartbeat: one small file per rank and attempt, overwritten in place at every beat, read by the
supervisor's hang watch (:mod:`yolosafe.supervisor.hangwatch`). Written and read here, by the one type :class:`Beat`.

A beat costs one formatted line and one ``pwrite`` of a fixed width at offset 0 (no open, no rename, no fsync, no
collective): the page cache is what the supervisor reads on the same machine. A reader that meets a half-written
line keeps its previous reading; the record is shorter than a page, so the kernel writes it whole in practice.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

WIDTH = 320  # bytes of every record: the file never shrinks, so each beat overwrites the whole previous one


@dataclass(frozen=True)
class Beat:
    """Where one rank is: ``state`` is what it entered at this beat (setup, train, val, save, sync, final, done),
    with its epoch (0-based), the batch index within the phase, the time (``time.time()``, this machine's clock),
    the count of beats so far and the pid, which the watch checks against the attempt's process tree before it
    signals anything; ``longest``: per state, the longest interval this rank spent in it so far (measured by the rank
    at every beat, so the watch learns every interval however seldom it reads)."""

    state: str
    epoch: int
    iteration: int
    t: float
    n: int
    pid: int
    rank: int
    longest: dict[str, float] = field(default_factory=dict)
    own: float = 0.0  # seconds of this rank's own part of its training steps so far (data wait and forward)
    steps: int = 0  # the training steps ``own`` counts

    def encode(self) -> bytes:
        longest = ",".join(f'"{state}":{seconds:.3f}' for state, seconds in self.longest.items())
        line = (f'{{"state":"{self.state}","epoch":{self.epoch},"iteration":{self.iteration},"t":{self.t:.3f},'
                f'"n":{self.n},"pid":{self.pid},"rank":{self.rank},"longest":{{{longest}}},"own":{self.own:.4f},'
                f'"steps":{self.steps}}}')
        return line.encode().ljust(WIDTH - 1) + b"\n"


def read(path: Path) -> Beat | None:
    """The latest beat in ``path``; None while there is none or it is mid-write."""
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read(WIDTH))
        return Beat(str(data["state"]), int(data["epoch"]), int(data["iteration"]), float(data["t"]), int(data["n"]),
                    int(data["pid"]), int(data["rank"]), {str(k): float(v) for k, v in data["longest"].items()},
                    float(data["own"]), int(data["steps"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Writer:
    """The writing end, kept open by the rank for its life: the beat count, the state entered at the last beat and
    when, and the longest interval spent in each state."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        self.n = 0
        self.state: str | None = None
        self.since = 0.0
        self.longest: dict[str, float] = {}
        self.own, self.steps = 0.0, 0

    def beat(self, state: str, epoch: int, iteration: int, now: float, pid: int, rank: int) -> None:
        """Enter ``state`` at ``now``: the interval of the state left is measured, the beat written."""
        if self.state is not None and now - self.since > self.longest.get(self.state, 0.0):
            self.longest[self.state] = now - self.since
        self.n += 1
        self.state, self.since = state, now
        os.pwrite(self.fd, Beat(state, epoch, iteration, now, self.n, pid, rank, self.longest, self.own,
                                self.steps).encode(), 0)
