"""The supervisor's process handling, with a stand-in child (no training): tee, signals, the whole tree stopped."""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time

from tests.conftest import wait_gone
from yolosafe.proc import child_env, run_child

# A child that starts a grandchild in a new session (as a DDP launcher's ranks may be), then waits forever.
FAMILY = """
import subprocess, sys, time
g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print("GRANDCHILD", g.pid, flush=True)
time.sleep(600)
"""


def test_output_is_teed_and_env_cleaned():
    log, out = io.BytesIO(), io.BytesIO()
    env = child_env({**os.environ, "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}, {"X_MARK": "yes"})
    code = "import os; print(os.environ.get('RANK'), os.environ.get('WORLD_SIZE'), os.environ['X_MARK'])"
    result = run_child([sys.executable, "-c", code], env, log, out=out)
    assert result.exit_code == 0
    assert log.getvalue() == out.getvalue() == b"None None yes\n"


def test_sigterm_kills_child_and_detached_grandchild():
    log, out = io.BytesIO(), io.BytesIO()
    seen: list[int] = []

    def on_start(tree):
        def fire():
            while not out.getvalue().count(b"GRANDCHILD"):
                time.sleep(0.05)
            time.sleep(0.6)  # let the tree tracker see the grandchild
            seen.extend(tree.refresh())
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=fire, daemon=True).start()

    result = run_child([sys.executable, "-c", FAMILY], dict(os.environ), log, on_start=on_start, out=out)
    assert result.interrupted == signal.SIGTERM
    grandchild = int(out.getvalue().split()[1])
    assert grandchild in seen
    assert not wait_gone(set(seen))
