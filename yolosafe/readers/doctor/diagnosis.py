"""``yolosafe doctor``: why did it run out of memory when ``nvidia-smi`` shows gigabytes free?

Read-only. The diagnosis is data first (:class:`Diagnosis`), built from the package's own modules: the GPUs from
``gpus``, who holds their memory from ``holders``, the allocator variables as torch will read them from
``allocator``, the stray launcher variables that ``supervise`` strips, the run from ``records`` and ``report``, the
remedies computed with ``plan``. ``doctor_text`` renders it for people; ``--json`` for machines.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from yolosafe import gpus
from yolosafe.errors import UsageError
from yolosafe.planning import allocator
from yolosafe.proc import STRAY_DIST_VARS
from yolosafe.readers import report
from yolosafe.readers.holders import PROVEN, Holder, judge_gpus
from yolosafe.rundir import files as rundir
from yolosafe.rundir import records

BUSY_MIB = 1024  # other processes' memory on a GPU above which the verdict names it


class DoctorError(UsageError):
    """A bad argument (a RUN_DIR that is not a run, a malformed YOLOSAFE_FAKE_GPUS): one line, exit status 2."""


@dataclass
class GPUView:
    index: int
    name: str | None
    total_mib: float | None
    used_mib: float | None
    free_mib: float | None
    holders: list[Holder] = field(default_factory=list)

    @property
    def others_mib(self) -> float:
        """Memory of processes that are not a stale yolosafe process (a live yolosafe run is not free memory)."""
        return sum(h.used_mib or 0 for h in self.holders if h.action != PROVEN)


@dataclass
class Machine:
    backend: str
    driver: str | None
    cuda: str | None
    problem: str | None
    gpus: list[GPUView]


@dataclass
class AllocVar:
    name: str
    value: str | None
    problem: str | None = None  # why torch (or yolosafe) would refuse it
    note: str | None = None  # accepted by yolosafe, but not by torch as written


@dataclass
class Environment:
    allocator: list[AllocVar]
    expandable_segments: str  # True | False | unset | invalid, as torch in this shell would see it
    cuda_visible_devices: str | None
    visible_gpus: list[int]
    stray: dict[str, str]


@dataclass
class RunView:
    path: str
    problem: str | None = None  # a damaged file: one line
    story: records.Story | None = None
    failures: list[records.Failure] = field(default_factory=list)
    memory: dict[str, Any] | None = None  # report's summary (memory_summary.json, or computed read-only)
    memory_note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "problem": self.problem, "story": self.story.to_dict() if self.story else None,
                "failures": [f.to_dict() | {"file": f.name} for f in self.failures],
                "memory": self.memory, "memory_note": self.memory_note}


@dataclass
class Cause:
    finding: str
    remedy: str  # the exact command or flag


@dataclass
class Diagnosis:
    machine: Machine
    environment: Environment
    run: RunView | None
    verdict: list[Cause]

    def as_dict(self) -> dict[str, Any]:
        data = {"machine": asdict(self.machine), "environment": asdict(self.environment),
                "run": self.run.as_dict() if self.run else None, "verdict": [asdict(c) for c in self.verdict]}
        for gpu, view in zip(data["machine"]["gpus"], self.machine.gpus, strict=True):
            gpu["others_mib"] = view.others_mib
        return data


def machine(env: Mapping[str, str]) -> Machine:
    try:
        inventory = gpus.read_inventory(env)
    except gpus.FakeGpusError as exc:
        raise DoctorError(str(exc)) from None
    holders = judge_gpus(inventory.gpus)
    views = [GPUView(g.index, g.name, g.total_mib, g.used_mib, g.free_mib, [h for h in holders if h.gpu == g.index])
             for g in inventory.gpus]
    return Machine(inventory.backend, inventory.driver, inventory.cuda, inventory.problem, views)


def alloc_var(name: str, value: str) -> AllocVar:
    """One allocator variable, checked with yolosafe's parser (c10's rules); torch itself takes only True/False."""
    try:
        parsed = allocator.parse(value, name)
    except allocator.AllocConfError as exc:
        return AllocVar(name, value, problem=str(exc))
    items = (item.partition(":") for item in allocator._split_items(value, name))
    written = {key.strip(): raw.strip() for key, _, raw in items}
    odd = [f"{k}:{written.get(k)}" for k, v in parsed.items() if v in ("True", "False") and written.get(k) != v]
    note = f"torch itself accepts only True/False ({', '.join(odd)}); yolosafe corrects it for its workers" if odd \
        else None
    return AllocVar(name, value, note=note)


def environment(env: Mapping[str, str], inventory_gpus: list[GPUView]) -> Environment:
    checked = [alloc_var(n, env[n]) if n in env else AllocVar(n, None) for n in allocator.ENV_VARS]
    if any(v.problem for v in checked):
        expandable = "invalid"
    else:
        options: dict[str, str] = {}
        for var in checked:
            options.update(allocator.parse(var.value, var.name) if var.value is not None else {})
        expandable = options.get("expandable_segments", "unset")
    inventory = gpus.Inventory("view", tuple(gpus.GPU(g.index, g.name, None, None, None, None)
                                             for g in inventory_gpus))
    visible = gpus.visible_ids(inventory, env.get("CUDA_VISIBLE_DEVICES"))
    stray = {k: env[k] for k in STRAY_DIST_VARS if k in env}
    return Environment(checked, expandable, env.get("CUDA_VISIBLE_DEVICES"), list(visible), stray)


def find_run(run_dir: str | None, project: str | None) -> Path | None:
    """RUN_DIR (it must be a run), else the newest run under the project (default ./runs), else None."""
    if run_dir:
        path = Path(run_dir)
        if not (path / rundir.STORY).is_file():
            raise DoctorError(f"{run_dir}: not a yolosafe run directory (no {rundir.STORY})")
        return path
    return rundir.latest_run(Path(project or "runs"))


def memory(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The memory summary: the one ``yolosafe report`` wrote, else computed from memory.csv without writing."""
    summary_file = path / rundir.MEMORY_SUMMARY
    try:
        if summary_file.is_file():
            return rundir.read_json(summary_file), None
        return report.summarize(path, report.load(path)), None
    except report.NoMemoryData as exc:
        return None, str(exc)
    except Exception as exc:  # a damaged summary or CSV: one line, the rest of the diagnosis still stands
        return None, f"cannot read the memory data: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def run_view(path: Path) -> RunView:
    view = RunView(str(path))
    try:
        view.story = records.load_story(path)
    except records.RecordError as exc:
        view.problem = str(exc)
        return view
    try:
        view.failures = records.load_failures(path)
    except records.RecordError as exc:  # the story still tells most of it
        view.problem = str(exc)
    view.memory, view.memory_note = memory(path)
    return view


def diagnose(run_dir: str | None = None, project: str | None = None,
             env: Mapping[str, str] | None = None) -> Diagnosis:
    from yolosafe.readers.doctor.causes import verdict

    env = os.environ if env is None else env
    found = find_run(run_dir, project)
    box = machine(env)
    view = run_view(found) if found else None
    environ = environment(env, box.gpus)
    return Diagnosis(box, environ, view, verdict(box, environ, view))
