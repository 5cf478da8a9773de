"""Whose memory a GPU holds: the run's own processes or everybody else's, from the pids NVML lists.

Inside a container NVML names processes by the host's pids, which exist nowhere in the container's PID namespace:
there the split is unknown (never "other processes hold it all"), decided once per run by :class:`Namespace`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from yolosafe.gpus import MemoryReading, foreign_pids

HIDDEN_MIB = 1024.0  # used memory with no process listed above which the driver hides them (an idle GPU: its own)
FOREIGN_ROUNDS = 10  # foreign-looking readings, never one of the run's own pids: NVML's pids are another namespace's

UNKNOWN_SPLIT = ("NVML names the GPUs' processes by pids of another PID namespace (a container): this run's and "
                 "other processes' memory are unknown; used memory is still sampled")


def split(reading: MemoryReading, ours: set[int], absent_is_foreign: bool = True) -> tuple[float | None, float | None]:
    """The MiB of the run's own processes and of all others on one GPU (None where NVML gives no figure, or where its
    pids are another PID namespace's: a container's supervisor never sees its own ranks' pids there).
    ``absent_is_foreign``: whether pids that exist nowhere here mean another namespace (real NVML lists only live
    processes; a fake layout's other processes are made-up pids)."""
    if reading.processes is None:  # NVML cannot list this GPU's processes (some drivers, MIG)
        return None, None
    if not reading.processes and (reading.used_mib or 0) > HIDDEN_MIB:  # held, and nobody listed: a driver that
        return None, None  # hides the processes of other namespaces (a container's): unknown, never "ours 0"
    if absent_is_foreign and not any(p.pid in ours for p in reading.processes) and foreign_pids(
            p.pid for p in reading.processes):
        return None, None
    mine = [p.used_mib for p in reading.processes if p.pid in ours]
    theirs = [p.used_mib for p in reading.processes if p.pid not in ours]
    return _sum(mine), _sum(theirs)


class Namespace:
    """Whether NVML's pids are this PID namespace's, decided once per run from the readings (a run's namespace does
    not change). Proven ours when a reading lists one of the run's own pids; foreign (a container: the split between
    this run and others is unknown, said once) after ``FOREIGN_ROUNDS`` readings whose pids all exist nowhere here
    without such proof, or when sampling ends with some. A process that exited while NVML still listed it, or a
    phase read a moment before its memory appears, looks foreign once: it decides nothing."""

    def __init__(self) -> None:
        self.ours: bool = False
        self.foreign: bool = False
        self._seen = 0  # foreign-looking readings so far, while undecided

    def split(self, reading: MemoryReading, ours: set[int], foreign: bool,
              say: Callable[[str], None]) -> tuple[float | None, float | None]:
        if self.foreign:
            return None, None
        if not self.ours and reading.processes and any(p.pid in ours for p in reading.processes):
            self.ours = True
        mine, theirs = split(reading, ours, foreign and not self.ours)
        if mine is None and theirs is None and reading.processes:
            self._seen += 1
            if self._seen >= FOREIGN_ROUNDS:
                self.settle(say)
        return mine, theirs

    def settle(self, say: Callable[[str], None]) -> None:
        """Decide now (the end of sampling): foreign-looking readings and never a pid of the run's own."""
        if self._seen and not self.ours and not self.foreign:
            self.foreign = True
            say(f"memory watch: {UNKNOWN_SPLIT}")


def _sum(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known, 0.0) if known or not values else None
