"""The text of ``yolosafe doctor``: the :class:`~yolosafe.readers.doctor.diagnosis.Diagnosis` rendered for a person.
No logic of its
own: every judgement is made in ``doctor``, ``holders`` and ``verdict``."""

from __future__ import annotations

from yolosafe.gpus import FAKE_ENV
from yolosafe.readers import report
from yolosafe.readers.doctor.diagnosis import Diagnosis, Environment, Machine, RunView


def _mib(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f} MiB"


def machine_lines(box: Machine) -> list[str]:
    lines = ["== machine =="]
    if not box.gpus:
        return [*lines, f"no GPU: {box.problem}; yolosafe train would run on the CPU (--gpus cpu)"]
    lines.append(f"backend {box.backend} (driver {box.driver}, CUDA {box.cuda})")
    if box.backend == "fake":
        lines.append(f"note: {FAKE_ENV} is set: these GPUs are fake")
    for gpu in box.gpus:
        lines.append(f"GPU {gpu.index}  {gpu.name}: {_mib(gpu.used_mib)} used, {_mib(gpu.free_mib)} free of "
                     f"{_mib(gpu.total_mib)}; other processes {_mib(gpu.others_mib)}")
        for h in gpu.holders:
            who = f"{h.user or '?':<10} {(h.command or '?')[:90]}" if h.command else ""
            lines.append(f"    pid {h.pid:<8} {_mib(h.used_mib):>10}  {who}")
            lines.append(f"        -> {h.kind}: {h.reason}")
    return lines


def environment_lines(environ: Environment) -> list[str]:
    lines = ["== environment =="]
    for var in environ.allocator:
        state = "(unset)" if var.value is None else var.value
        lines.append(f"{var.name:<24} {state}")
        lines += [f"    INVALID: {var.problem}"] * bool(var.problem) + [f"    note: {var.note}"] * bool(var.note)
    lines.append(f"expandable_segments in this shell: {environ.expandable_segments}")
    visible = environ.cuda_visible_devices
    lines.append("CUDA_VISIBLE_DEVICES (unset): every GPU visible" if visible is None else
                 f"CUDA_VISIBLE_DEVICES={visible}: GPUs {', '.join(map(str, environ.visible_gpus)) or 'none'}")
    stray = ", ".join(f"{k}={v}" for k, v in environ.stray.items())
    lines.append(f"stray launcher variables: {stray or 'none'}")
    return lines


def _attempt_lines(view: RunView) -> list[str]:
    assert view.story is not None
    lines = ["attempts", "  #  mode        batch  per-GPU  val  accum  outcome      phase  epoch  next"]
    for a in view.story.attempts:
        cells = (a.attempt, a.mode, a.batch, a.per_gpu_batch, a.val_batch, a.accumulate, a.outcome, a.phase, a.epoch)
        cells = (*cells[:-1], None if a.epoch is None else a.epoch + 1)  # 1-based, as Ultralytics prints epochs
        text = [("-" if c is None else str(c)) for c in cells]
        lines.append(f"  {text[0]:<2} {text[1]:<11} {text[2]:<6} {text[3]:<8} {text[4]:<4} {text[5]:<6} "
                     f"{text[6]:<12} {text[7]:<6} {text[8]:<6} {a.next or '-'}")
    return lines


def _failure_lines(view: RunView) -> list[str]:
    lines = ["failures"] if view.failures else ["failures: none recorded"]
    epochs = (view.story.plan or {}).get("epochs") if view.story else None
    for f in view.failures:
        figures = f.figures or {}
        numbers = ", ".join(f"{k.removesuffix('_mib').replace('_', ' ')} {v:.0f} MiB" for k, v in figures.items()
                            if k.endswith("_mib") and isinstance(v, (int, float)))
        what = "OOM" if f.oom else (f.error or "failure")
        place = f.place(epochs)
        batches = [f"batch {f.batch}/GPU"] if f.batch is not None else []
        batches += [f"val batch {f.val_batch}/GPU"] if f.val_batch is not None else []
        batches += [f"recovered in place at val batch {f.extra.get('next_val_batch')}"] if f.recovered else []
        lines.append(f"  {f.name}: {what}{' ' + place if place else ''}"
                     f"{' (' + ', '.join(batches) + ')' if batches else ''}{': ' + numbers if numbers else ''}")
    return lines


def run_lines(view: RunView | None) -> list[str]:
    if view is None:
        return ["== run ==", "no yolosafe run found (give RUN_DIR, or --project)"]
    lines = [f"== run: {view.path} =="]
    if view.story is None:
        return [*lines, f"cannot read: {view.problem}"]
    story = view.story
    p = story.plan
    lines.append(f"outcome     {story.outcome}")
    lines.append(f"command     {' '.join(story.command or []) or '?'}")
    lines.append(f"plan        GPUs {p.get('device', '?')}, batch {p.get('batch')} = {p.get('per_gpu_batch')} per "
                 f"GPU, val batch {p.get('val_batch')} per GPU, effective batch {p.get('effective_batch')} "
                 f"(accumulate {p.get('accumulate')}), imgsz {p.get('imgsz')}")
    lines += [*_attempt_lines(view), *_failure_lines(view)]
    lines += [f"  {report.hang_line(h, p.get('epochs'))}" for h in view.hangs]
    if view.problem:
        lines.append(f"cannot read: {view.problem}")
    if view.memory:
        lines += ["memory peaks per GPU (NVML):", *(f"  {ln}" for ln in report.table(view.memory))]
    else:
        lines.append(f"memory peaks: none ({view.memory_note})")
    return lines


def render(d: Diagnosis) -> list[str]:
    verdict = ["== verdict =="] + [f"- {c.finding}\n    -> {c.remedy}" for c in d.verdict]
    return [*machine_lines(d.machine), "", *environment_lines(d.environment), "", *run_lines(d.run), "", *verdict]
