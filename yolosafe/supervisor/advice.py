"""What to try when yolosafe has run out of retries: next steps fitted to how the run failed.

The advice follows from the failure records and the plan, so it never proposes what cannot help: a smaller model
when the model is already the smallest scale, fewer GPUs without saying that the same ``--batch`` on fewer GPUs
means a larger batch on each, host-RAM settings when the trouble was GPU memory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from yolosafe import gpus, oom
from yolosafe.planning.trainplan import TrainPlan

if TYPE_CHECKING:
    from yolosafe.supervisor.policy import AttemptEnd


def advice(failure: AttemptEnd, plan: TrainPlan, others_mib: dict[int, float] | None = None,
           min_batch: int | None = None) -> list[str]:
    """Next steps once retries are exhausted, fitted to the case: ``min_batch`` is given when the minimum per-GPU
    batch, not the number of retries, is what stopped it."""
    tips = []
    if min_batch is not None and failure.phase != "final":
        tips.append(f"the per-GPU batch {plan.per_gpu_batch} cannot be halved below --min-batch {min_batch}: "
                    "lower --min-batch, or see below")
    busy = sorted(gpu for gpu, mib in (others_mib or {}).items() if mib > gpus.BUSY_MIB)
    if busy:
        keep = [g for g in plan.gpus if g not in busy]
        tips.append(f"GPU(s) {', '.join(map(str, busy))} also hold other processes' memory: "
                    f"exclude them (--gpus {','.join(map(str, keep)) or 'cpu'}) or free them (yolosafe gpus)")
    if len(plan.gpus) > 1:
        tips.append(f"fewer GPUs do not help by themselves: at the same --batch {plan.batch} each GPU gets more "
                    f"(--gpus {plan.gpus[0]} --batch {plan.batch} is {plan.batch} per GPU); lower --batch with them")
    if failure.phase in {"val", "final"}:
        tips.append("validation is the peak: --val-batch 1, or val=False and validate once afterwards")
    tips.append(f"a smaller image size (--imgsz {max(plan.imgsz // 2 // 32 * 32, 32)})")
    if not _smallest_model(plan.model):
        tips.append("a smaller model (e.g. yolov8n instead of yolov8s/m/l/x)")
    if any(oom.is_host_oom(r.message or "") for r in failure.records) or oom.is_host_oom(failure.message):
        tips.append("host RAM ran out: cache=False (Ultralytics' RAM image cache) and fewer workers (workers=2)")
    figures = next((r.figures for r in failure.records if r.figures), None)
    if figures and figures.get("reserved_unallocated_mib", 0) > oom.FRAGMENTED_MIB:
        tips.append(f"{figures['reserved_unallocated_mib']:.0f} MiB was reserved but unallocated (fragmentation): "
                    "keep expandable_segments:True in --alloc-conf")
    return tips


def _smallest_model(model: str) -> bool:
    """yolov8n, yolo11n-seg, yolov5nu...: scale n is the smallest Ultralytics builds."""
    return re.search(r"yolo(?:v?\d+|e)[-_]?n(?:u|6)?(?:[-.]|$)", Path(model).name) is not None


# The checkpoints a resumed epoch can hold at once: last.pt, the copy kept of what the attempt resumes from
# (last-before-attemptN.pt), best.pt, unvalidated.pt (the epoch trained, before its validation), and the two
# partial files of a save (last's and best's, written beside them and renamed).
RESUME_HOLDS = ("last.pt", "the kept copy", "best.pt", "unvalidated.pt", "2 partial saves")
RESUME_CHECKPOINTS = 6


def resume_space(checkpoint_bytes: int, on_disk: int) -> int:
    """The free bytes a resume needs: each checkpoint it can hold at once (:data:`RESUME_CHECKPOINTS`, each the size
    of the one it resumes from) less the ``on_disk`` of them already there."""
    return checkpoint_bytes * max(RESUME_CHECKPOINTS - on_disk, 0)


def space_hint(weights: Path) -> str:
    """One clause for a full disk: how much free space the resume needs, from the checkpoints in ``weights``."""
    present = [weights / name for name in ("last.pt", "best.pt", "unvalidated.pt") if (weights / name).is_file()]
    sizes = [p.stat().st_size for p in present]
    if not sizes:
        return "free some disk space (nothing was saved yet: the resume starts over)"
    size = max(sizes)
    need = resume_space(size, len(present))
    return (f"free at least {_mib(need)} on {weights.parent}'s disk (the resume holds up to {RESUME_CHECKPOINTS} "
            f"checkpoints of {_mib(size)}: {', '.join(RESUME_HOLDS)}; {len(present)} are there)")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
