"""``yolosafe doctor``: why did it run out of memory when ``nvidia-smi`` shows gigabytes free?

Read-only. The diagnosis is data first (:class:`Diagnosis`), built from the package's own modules: the GPUs from
``gpus``, who holds their memory from ``holders``, the allocator variables as torch will read them from
``allocator``, the stray launcher variables that ``supervise`` strips, the run from ``records`` and ``report``, the
remedies computed with ``plan``. ``doctor_text`` renders it for people; ``--json`` for machines.
"""

from __future__ import annotations

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
from yolosafe.rundir.layout import RunDir


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
    uuid: str | None = None
    mig_uuids: list[str] = field(default_factory=list)  # MIG on: its MIG devices' UUIDs
    openable: bool = True

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
    hangs: list[records.Hang] = field(default_factory=list)  # what the hang watch found (report.hangs)
    memory: dict[str, Any] | None = None  # report's summary (memory_summary.json, or computed read-only)
    memory_note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "problem": self.problem, "story": self.story.to_dict() if self.story else None,
                "failures": [f.to_dict() | {"file": f.name} for f in self.failures],
                "hangs": [h.to_dict() for h in self.hangs],
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
    views = [GPUView(g.index, g.name, g.total_mib, g.used_mib, g.free_mib, [h for h in holders if h.gpu == g.index],
                     g.uuid, [m.uuid for m in g.mig_devices if m.uuid], g.openable)
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
    read = allocator.torch_reads(env)  # torch reads one variable whole: the other is ignored, not merged
    for var in checked:
        if var.value is not None and read != var.name:
            var.note = "; ".join(filter(None, [var.note, f"torch ignores it while {read} is set (yolosafe train "
                                                         "gives its workers both, merged)"]))
    if any(v.problem for v in checked):
        expandable = "invalid"
    else:
        options = allocator.parse(env[read], read) if read else {}
        expandable = options.get("expandable_segments", "unset")
    inventory = gpus.Inventory("view", tuple(_as_gpu(g) for g in inventory_gpus))
    visible = gpus.visible_ids(inventory, env.get("CUDA_VISIBLE_DEVICES"))
    stray = {k: env[k] for k in STRAY_DIST_VARS if k in env}
    return Environment(checked, expandable, env.get("CUDA_VISIBLE_DEVICES"), list(visible), stray)


def _as_gpu(view: GPUView) -> gpus.GPU:
    """The identity of a viewed GPU (index, UUID, MIG devices), enough to read CUDA_VISIBLE_DEVICES as train does."""
    slices = tuple(gpus.GPU(view.index, None, u, None, None, None, mig=True, mig_of=view.index)
                   for u in view.mig_uuids)
    return gpus.GPU(view.index, view.name, view.uuid, None, None, None, mig=bool(slices) or None, mig_devices=slices,
                    openable=view.openable)


def find_run(run_dir: str | None, project: str | None) -> Path | None:
    """RUN_DIR (it must be a run), else the newest run under the project (default ./runs), else None."""
    if run_dir:
        path = Path(run_dir)
        if not RunDir(path).is_run():
            raise DoctorError(f"{run_dir}: not a yolosafe run directory (no {rundir.STORY})")
        return path
    return rundir.latest_run(Path(project or "runs"))


def memory(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The memory summary: the one ``yolosafe report`` wrote, else computed from memory.csv without writing."""
    run = RunDir(path)
    try:
        if run.memory_summary.is_file():
            return rundir.read_json(run.memory_summary), None
        return report.summarize(run, report.load(run)), None
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
    view.hangs = report.hangs(path)
    view.memory, view.memory_note = memory(path)
    return view
