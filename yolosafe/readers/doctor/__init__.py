"""``yolosafe doctor``: the machine, the environment and the last run read (``diagnosis``), the likely causes with
their remedies (``causes``), the text (``text``). Read-only."""

from __future__ import annotations

import os
from collections.abc import Mapping

from yolosafe.readers.doctor import diagnosis
from yolosafe.readers.doctor.causes import verdict


def diagnose(run_dir: str | None = None, project: str | None = None,
             env: Mapping[str, str] | None = None) -> diagnosis.Diagnosis:
    env = os.environ if env is None else env
    found = diagnosis.find_run(run_dir, project)
    box = diagnosis.machine(env)
    view = diagnosis.run_view(found) if found else None
    environ = diagnosis.environment(env, box.gpus)
    return diagnosis.Diagnosis(box, environ, view, verdict(box, environ, view))
