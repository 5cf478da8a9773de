"""Stop a real run at a chosen stage, without any test hook inside yolosafe: wait for the stage's phase event in
``events.jsonl``, freeze the process that wrote it (SIGSTOP) so the stop lands inside that stage however short it
is, send the signal, then let it go on. Each drill stops at the first event that proves its point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.conftest import YOLOSAFE, alive, cli_env, wait_until


def events(run: Path) -> list[dict[str, Any]]:
    path = run / "events.jsonl"
    if not path.is_file():
        return []
    found = []
    for line in path.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return found


def start(cwd: Path, shared_cache: Path, *args: str, env: dict[str, str] | None = None,
          ignore_sigint: bool = False) -> subprocess.Popen[str]:
    """``yolosafe`` in its own process group (so a drill can signal the group), stderr captured.
    ``ignore_sigint``: started as a script's ``cmd &`` starts it, SIGINT ignored."""

    def setup() -> None:
        if ignore_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    return subprocess.Popen([YOLOSAFE, *args], cwd=cwd, env=cli_env(shared_cache, env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=setup)


def stop_at(proc: subprocess.Popen[str], run: Path, match: dict[str, Any], signum: int = signal.SIGTERM,
            group: bool = False, freeze: bool = True, timeout: float = 180) -> dict[str, Any]:
    """At the first event with every item of ``match``: freeze its process, ``signum`` to the supervisor (its pid, or
    its process group), then let the frozen process go on. Returns the event."""
    found: dict[str, Any] = {}

    def seen() -> bool:
        hit = next((e for e in events(run) if all(e.get(k) == v for k, v in match.items())), None)
        if hit:
            found.update(hit)
        return hit is not None

    wait_until(seen, proc, f"event {match}", timeout)
    if freeze:
        os.kill(found["pid"], signal.SIGSTOP)
    try:
        if group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        time.sleep(0.3)
    finally:
        if freeze:
            os.kill(found["pid"], signal.SIGCONT)
    return found


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def yolosafe_lines(stderr: str) -> list[str]:
    """yolosafe's own lines (the ones it says, not the training's output)."""
    return [ln for ln in stderr.splitlines() if ln.startswith("yolosafe:")]


def wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while alive({pid}):
        assert time.time() < deadline, f"pid {pid} still runs"
        time.sleep(0.05)
