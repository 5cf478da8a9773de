"""Whose pids NVML reports: the driver names every process by its pid in the host's PID namespace. Inside a
container (Docker, Kubernetes) those pids are not this namespace's: the run's own ranks never match them, and a
local process that happens to have such a pid is somebody else entirely. So when none of NVML's pids exists here,
the pids say nothing about who holds the memory: the watch's split between this run and others is unknown, and no
process is judged (or stopped) by such a pid.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


def pid_exists(pid: int) -> bool:
    """Whether a process ``pid`` exists in this PID namespace (signal 0: nothing is sent)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def foreign_pids(pids: Iterable[int]) -> bool:
    """NVML's ``pids`` come from another PID namespace: there are some, and none of them exists here."""
    listed = [pid for pid in pids if pid > 0]
    return bool(listed) and not any(pid_exists(pid) for pid in listed)
