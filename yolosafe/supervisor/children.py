"""The short-lived children planning needs, started here so that planning starts none: Ultralytics' input check
(:mod:`yolosafe.training.inputcheck`) and the fake-tensor memory pass (:mod:`yolosafe.training.fakepass`).

Each is a function from its request to its answer (the records of :mod:`yolosafe.rundir.childrecords`), handed by the
caller to the planning that needs it (:func:`yolosafe.planning.validate.ultralytics_check` takes ``input_check``,
:mod:`yolosafe.planning.memory.planner` ``fake_pass``). Both run in a throw-away child of this interpreter: torch and
Ultralytics stay out of this process; offline unless ``--download`` asks for the network
(:func:`yolosafe.proc.offline_env`). A child that fails, does not answer in time or answers something damaged is
one line for the user.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from yolosafe import proc
from yolosafe.planning.memory.model import UnknownModel
from yolosafe.planning.validate import InputError
from yolosafe.rundir import childrecords
from yolosafe.rundir.childrecords import CheckRequest, CheckResult, FakePassRequest, FakePassResult
from yolosafe.rundir.typed import RecordError

INPUT_CHECK = "yolosafe.training.inputcheck"
INPUT_CHECK_TIMEOUT_S = 600  # loading a large checkpoint and listing a large dataset's images
DOWNLOAD_TIMEOUT_S = 24 * 3600  # --download: the dataset may be large
FAKE_PASS = "yolosafe.training.fakepass"
FAKE_PASS_TIMEOUT_S = 600


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or ["no output"])[-1]


def input_check(request: CheckRequest) -> CheckResult:
    """Ask Ultralytics in a child whether it trains this: its acceptance or its refusal, as it answered."""
    with tempfile.TemporaryDirectory(prefix="yolosafe-check-") as tmp:
        asked, answer = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.save(asked)
        timeout = DOWNLOAD_TIMEOUT_S if request.download else INPUT_CHECK_TIMEOUT_S
        try:
            env = os.environ if request.download else proc.offline_env(os.environ)  # the network if asked only
            done = proc.run_module(INPUT_CHECK, [str(asked), str(answer)], timeout=timeout, env=env)
        except proc.subprocess.TimeoutExpired:
            raise InputError(f"Ultralytics' input check did not answer within {timeout} s") from None
        if not answer.is_file():
            raise InputError(f"Ultralytics' input check failed: {_last_line(done.stderr)}")
        try:
            return childrecords.load_check_result(answer)
        except RecordError as exc:
            raise InputError(f"Ultralytics' input check failed: {exc}") from None


def fake_pass(request: FakePassRequest) -> FakePassResult:
    """The fake-tensor pass of one model in a child (torch stays out of this process): its memory terms."""
    try:
        done = proc.run_module(FAKE_PASS, request.args(), timeout=FAKE_PASS_TIMEOUT_S,
                               env=proc.offline_env(os.environ))
    except proc.subprocess.TimeoutExpired:
        raise UnknownModel(f"{request.model}: the fake-tensor memory pass did not answer within "
                           f"{FAKE_PASS_TIMEOUT_S} s") from None
    if done.returncode != 0:
        raise UnknownModel(f"{request.model}: the fake-tensor memory pass failed ({_last_line(done.stderr)})")
    try:
        return FakePassResult.from_json(_last_line(done.stdout))
    except RecordError as exc:
        raise UnknownModel(f"{request.model}: the fake-tensor memory pass failed ({exc})") from None
