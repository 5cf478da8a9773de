"""Benchmark switches (benchmarks/overhead.py, docs/overhead.md): the parts of yolosafe a benchmark run switches off
or profiles, read here alone. A run without these variables, every real one, has every part on."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

BENCH_OFF_ENV = "YOLOSAFE_BENCH_OFF"  # comma-separated: tee, filter, tree, events, checkpoint, peaks, heartbeat
BENCH_PROFILE_ENV = "YOLOSAFE_BENCH_PROFILE"  # a folder: the worker writes its cProfile stats there


def bench_off(part: str) -> bool:
    """Whether a benchmark run switched ``part`` off (``YOLOSAFE_BENCH_OFF=events,checkpoint``): never in a real run."""
    return part in os.environ.get(BENCH_OFF_ENV, "").split(",")


def bench_profiled(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, under cProfile when a benchmark asks (``YOLOSAFE_BENCH_PROFILE=DIR``: ``DIR/name-PID.prof``)."""
    folder = os.environ.get(BENCH_PROFILE_ENV)
    if not folder:
        return fn(*args)
    import cProfile

    profile = cProfile.Profile()
    try:
        return profile.runcall(fn, *args)
    finally:
        profile.dump_stats(os.path.join(folder, f"{name}-{os.getpid()}.prof"))
