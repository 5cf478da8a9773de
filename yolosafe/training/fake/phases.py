"""The fake GPUs' phase files: callbacks that let the fake NVML backend follow a training's phases.

Test and drill behaviour only: the worker registers them when the run spec says the plan's GPUs are fake
(``fake_gpus``) around yolosafe's own callbacks: a phase's memory appears after its start event and is gone before its
end event, so the memory watch, which tags each sample with the latest event, never sees one phase's memory under
another phase's name (as on a real GPU, where memory follows the work). At every phase start and end each process
writes ``{"phase", "pid", "epoch", "batch"}`` to its GPU's phase file in the run directory,
``.fake-phase-gpuN.json`` (a single process, standing for every GPU, writes ``.fake-phase.json`` itself; node R > 0
of a multi-node rehearsal ``.fake-phase-nodeR-gpuN.json``); the fake
backend the supervisor's memory watch reads (``YOLOSAFE_FAKE_PHASE_FILE``, which ``yolosafe train`` points at
``.fake-phase.json`` in the run directory) adds the phase's scripted memory to that GPU (docs/fake-gpus.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from yolosafe.gpus import fake_phase_file, nvml_index
from yolosafe.rundir import files as rundir
from yolosafe.training.callbacks import Hook, add_callbacks
from yolosafe.training.context import RunContext


class FakePhaseFile:
    """The phase file callbacks of one process, bound to its context."""

    def __init__(self, context: RunContext) -> None:
        self.context = context

    def start_hooks(self) -> dict[str, Hook]:
        """Registered after yolosafe's callbacks: they read the phase those have just entered."""
        return {"on_train_epoch_start": self.started, "on_val_start": self.started}

    def end_hooks(self) -> dict[str, Hook]:
        """Registered before yolosafe's callbacks: the memory is gone before the end event is written."""
        return {
            "on_train_epoch_end": self.ended,
            "on_val_end": self.ended,
            "on_fit_epoch_end": self.ended,  # other ranks than 0 end their validation here (no on_val_end)
        }

    def register_around(self, model: Any, own: Callable[[Any], None]) -> None:
        """These callbacks around ``own`` (which registers yolosafe's): end hooks first, start hooks last."""
        add_callbacks(model, self.end_hooks())
        own(model)
        add_callbacks(model, self.start_hooks())

    def started(self, obj: Any) -> None:
        """A phase began: the one yolosafe's callbacks have just entered in the progress."""
        self._write(obj, self.context.progress.phase)

    def ended(self, obj: Any) -> None:
        self._write(obj, None)

    def _write(self, obj: Any, phase: str | None) -> None:
        planned = self.context.spec.plan
        batch = planned.get("per_gpu_batch") if phase == "train" else planned.get("val_batch")  # for per_image_mib
        gpu = nvml_index(planned.get("gpus", []), self.context.gpu_index(getattr(obj, "device", None)))
        base = self.context.run.fake_phase
        rundir.write_json(fake_phase_file(base, gpu),
                          {"phase": phase, "pid": os.getpid(), "epoch": self.context.progress.epoch, "batch": batch})
