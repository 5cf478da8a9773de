"""Every private Ultralytics detail yolosafe relies on, in one list, each with a cheap check that names it.

yolosafe subclasses Ultralytics' trainers and hooks its callbacks (training.trainer, training.callbacks,
training.fake, training.worker, planning.accumulation): it leans on details Ultralytics does not promise to keep.
When a new Ultralytics changes one, the check of that detail fails with its name, what yolosafe assumes and where in
Ultralytics it lives, instead of an OOM recovery that silently does the wrong thing. The checks read Ultralytics'
source (``inspect``/``ast``) or make tiny real calls: no training, no GPU. tests/test_compat.py runs them all; the
worker warns in one line when the installed Ultralytics is outside :data:`SUPPORTED` (the range whose private
details were verified; pyproject declares the same range).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from yolosafe.training.compat import checks
from yolosafe.training.compat.source import CheckFailed, CompatError

__all__ = ("ASSUMPTIONS", "SUPPORTED", "Assumption", "CheckFailed", "CompatError", "failed", "supported",
           "version_warning")

SUPPORTED = (">=8.4.190", "<8.5")  # pyproject.toml's ultralytics requirement; constraints.txt pins the tested one


@dataclass(frozen=True)
class Assumption:
    name: str
    assumes: str  # what yolosafe takes for granted
    where: str  # Ultralytics module.function
    check: Callable[[], None]  # raises CheckFailed (with details) when the assumption is broken

    def verify(self) -> None:
        try:
            self.check()
        except Exception as exc:
            raise CompatError(f"Ultralytics assumption '{self.name}' broken ({self.where}): yolosafe assumes "
                              f"{self.assumes}; {type(exc).__name__}: {exc}") from exc


ASSUMPTIONS: tuple[Assumption, ...] = (
    Assumption("oom_retries_cap", "a training-step OOM is re-raised once trainer._oom_retries >= 3, and the counter "
               "is reset before on_train_epoch_start (which sets it to 3: no in-process halving)",
               "ultralytics.engine.trainer.BaseTrainer._do_train", checks.check_oom_retries),
    Assumption("do_train_signature", "_do_train(self) takes no arguments and runs the whole training (DDP setup to "
               "final_eval) in a single process and in every DDP rank", "BaseTrainer.train/_do_train",
               checks.check_do_train_signature),
    Assumption("val_loader_from_get_dataloader", "get_dataloader(mode='val') builds the validation loader that the "
               "validator (and final_eval) reuses", "BaseTrainer._build_train_pipeline, DetectionTrainer."
               "get_validator, BaseValidator.__call__", checks.check_val_loader),
    Assumption("preprocess_batch_in_oom_try", "preprocess_batch runs inside the training step's try whose "
               "'except RuntimeError' handles OOMs", "BaseTrainer._do_train", checks.check_preprocess_in_try),
    Assumption("save_model_paths", "save_model writes last.pt and best.pt only through self.last/self.best (best only "
               "when fitness improved); epochN.pt bypasses them", "BaseTrainer.save_model", checks.check_save_model),
    Assumption("final_eval_strip_writes", "final_eval rewrites last.pt and best.pt in place (strip_optimizer), "
               "outside save_model", "BaseTrainer.final_eval", checks.check_final_eval_writes),
    Assumption("final_eval_callback_order", "each epoch runs on_train_epoch_start (after setting trainer.epoch), "
               "on_train_batch_start per batch, on_train_epoch_end, validation, save_model, on_fit_epoch_end; then "
               "final_eval validates best.pt and runs on_fit_epoch_end, before on_train_end",
               "BaseTrainer._do_train/final_eval", checks.check_callback_order),
    Assumption("val_loop_without_collective", "BaseValidator.__call__ resets the loss and metrics, then loops over "
               "its own loader with no collective until gather_stats, so one rank can catch an OOM there and validate "
               "its shard again while the others wait at the gather (InPlaceValRetry); the loop's forward pass comes "
               "before the loss, postprocess and metrics, and every network's predict returns its head's output "
               "(the retry splits the layers before the head)",
               "BaseValidator.__call__, ultralytics.nn.tasks predict", checks.check_val_loop_alone),
    Assumption("assigner_oom_warning", "TaskAlignedAssigner catches a CUDA OOM, logs 'CUDA out of memory in "
               "TaskAlignedAssigner with batch_size=B and max_num_obj=N' on Ultralytics' logger and assigns one image "
               "at a time (callbacks.AssignerNearMiss records it)", "ultralytics.utils.tal.TaskAlignedAssigner.forward",
               checks.check_assigner_warning),
    Assumption("val_batch_start_per_batch", "on_val_batch_start runs once per validation batch before its forward "
               "pass (yolosafe counts the batches itself, never reads validator.batch_i: it is set after the callback)",
               "ultralytics.engine.validator.BaseValidator.__call__", checks.check_val_batch_start),
    Assumption("callback_ranks", "train epoch/batch callbacks, on_fit_epoch_end, on_val_start and on_val_batch_start "
               "run on every rank, on_val_end on rank 0 only; every rank has a validator",
               "BaseTrainer._do_train/_setup_train, BaseValidator.__call__", checks.check_callback_ranks),
    Assumption("heartbeat_points", "every rank runs on_pretrain_routine_end, on_train_batch_end after each step and "
               "on_val_batch_end after each validation batch; after on_fit_epoch_end every rank meets rank 0 in the "
               "broadcast of its stop flag (the heartbeat's sync state)", "BaseTrainer._do_train/_setup_train, "
               "BaseValidator.__call__", checks.check_heartbeat_points),
    Assumption("resume_accepts_batch", "resume accepts a new batch/device/workers/plots and starts at the "
               "checkpoint's epoch + 1", "BaseTrainer.check_resume/resume_training", checks.check_resume_batch),
    Assumption("accumulate_formula", "accumulate = max(round(nbs / total batch), 1), capped at len(train_loader) * "
               "epochs unless time=", "BaseTrainer._build_train_pipeline", checks.check_accumulate),
    Assumption("warmup_ramp", "warm-up ramps accumulate from 1 to its nominal value by np.interp over the "
               "_get_warmup_iterations first iterations", "BaseTrainer._do_train/_get_warmup_iterations",
               checks.check_warmup),
    Assumption("train_loader_length", "len(train_loader) per rank = ceil(ceil(images / world) / per-GPU batch)",
               "ultralytics.data.build.build_dataloader", checks.check_loader_length),
    Assumption("default_cfg", "Ultralytics' defaults nbs=64 and warmup_epochs=3.0 (accumulation.py's constants)",
               "ultralytics/cfg/default.yaml", checks.check_defaults),
    Assumption("ddp_flag", "BaseTrainer.__init__ sets self.ddp and world_size (Ultralytics' own rank launch) from "
               "the device string, and train() launches ranks only if self.ddp, else runs _do_train here: yolosafe "
               "sets ddp False and the world size from its launcher after __init__", "BaseTrainer.__init__/train",
               checks.check_ddp_flag),
    Assumption("model_train_api", "Model.train(trainer=cls) instantiates our trainer with the model's callbacks, and "
               "a loaded model keeps its checkpoint in model.ckpt", "ultralytics.engine.model.Model.train/_load",
               checks.check_model_api),
    Assumption("ddp_setup_device", "_setup_ddp takes the rank's device from the device string at LOCAL_RANK, calls "
               "set_device before init_process_group (the CPU ranks of fake GPUs replace it with the CPU and gloo)",
               "BaseTrainer._setup_ddp", checks.check_ddp_setup),
    Assumption("ddp_device_ids", "DDP wraps the model with device_ids=[self.device.index] (the CPU ranks pass None)",
               "BaseTrainer._setup_train", checks.check_ddp_device_ids),
    Assumption("select_device_keeps_visible", "select_device never writes CUDA_VISIBLE_DEVICES: the supervisor's "
               "list of GPU UUIDs stays what every rank sees", "ultralytics.utils.torch_utils.select_device",
               checks.check_select_device_keeps_visible),
    Assumption("final_val_current_device", "the validation of a DDP rank builds AutoBackend on the current device "
               "of its backend (the CPU ranks answer device 0 and build it on the CPU)",
               "ultralytics.engine.validator.BaseValidator.__call__", checks.check_final_val_device),
)


def failed() -> list[str]:
    """The names of the assumptions the installed Ultralytics breaks."""
    names = []
    for assumption in ASSUMPTIONS:
        try:
            assumption.verify()
        except CompatError:
            names.append(assumption.name)
    return names


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def supported(version: str) -> bool:
    low, high = (_version(bound) for bound in SUPPORTED)
    return low <= _version(version) < high


def version_warning(version: str) -> str | None:
    """One line when ``version`` is outside :data:`SUPPORTED`: which assumptions are unverified, which fail."""
    if supported(version):
        return None
    broken = failed()
    verdict = f"these checks fail: {', '.join(broken)}" if broken else "the cheap checks pass"
    return (f"yolosafe: warning: ultralytics {version} is outside the supported range {','.join(SUPPORTED)}; "
            f"unverified assumptions: {', '.join(a.name for a in ASSUMPTIONS)}; {verdict}")
