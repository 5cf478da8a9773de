"""One check per private Ultralytics detail yolosafe relies on; each raises :class:`CheckFailed` naming what it
found. Listed, with what yolosafe assumes and where in Ultralytics it lives, in :data:`yolosafe.training.compat.
ASSUMPTIONS`."""

from __future__ import annotations

import ast
import inspect
import math
import re
from typing import Any

from yolosafe.planning import accumulation
from yolosafe.training.compat.source import base_trainer, collapsed_source, in_order, rank_guarded, require


def check_oom_retries() -> None:
    in_order(base_trainer()._do_train, "self._oom_retries = 0", 'self.run_callbacks("on_train_epoch_start")',
              "except RuntimeError", "self._oom_retries >= 3", "raise")


def check_do_train_signature() -> None:
    params = list(inspect.signature(base_trainer()._do_train).parameters)
    require(params == ["self"], f"_do_train{inspect.signature(base_trainer()._do_train)}")
    in_order(base_trainer().train, "if self.ddp:", "generate_ddp_command(self)", "else: self._do_train()")
    in_order(base_trainer()._do_train, "self._setup_ddp()", "self._setup_train()", "self.final_eval()")


def check_val_loader() -> None:
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.models.yolo.detect import DetectionTrainer

    in_order(base_trainer()._build_train_pipeline, "self.test_loader = self.get_dataloader(", 'mode="val"')
    in_order(DetectionTrainer.get_validator, "self.test_loader")
    in_order(BaseValidator.__call__, "self.dataloader = self.dataloader or", 'self.run_callbacks("on_val_start")')
    in_order(base_trainer().final_eval, "self.validator(model=model)")


def check_preprocess_in_try() -> None:
    import torch

    require(issubclass(torch.OutOfMemoryError, RuntimeError), "torch.OutOfMemoryError is no RuntimeError")
    in_order(base_trainer()._do_train, 'self.run_callbacks("on_train_batch_start")', "try:",
              "batch = self.preprocess_batch(batch)", "self.scaler.scale(self.loss).backward()", "except RuntimeError")


def check_save_model() -> None:
    in_order(base_trainer().__init__, 'self.last, self.best = self.wdir / "last.pt", self.wdir / "best.pt"')
    in_order(base_trainer().save_model, "self.last.write_bytes(", "if self.best_fitness == self.fitness:",
              "self.best.write_bytes(", 'self.wdir / f"epoch{self.epoch}.pt"')
    writes = collapsed_source(base_trainer().save_model).count(".write_bytes(")
    require(writes == 3, f"{writes} checkpoint writes, not last, best and epochN")


def check_final_eval_writes() -> None:
    in_order(base_trainer().final_eval, "strip_optimizer(self.last)", "strip_optimizer(self.best")


def check_callback_order() -> None:
    in_order(base_trainer()._do_train, "self.epoch = epoch", 'self.run_callbacks("on_train_epoch_start")',
              'self.run_callbacks("on_train_batch_start")', 'self.run_callbacks("on_train_epoch_end")',
              "self.validate()", "self.save_model()", 'self.run_callbacks("on_fit_epoch_end")', "self.final_eval()",
              'self.run_callbacks("on_train_end")')
    in_order(base_trainer().final_eval, "self.validator(model=model)", 'self.run_callbacks("on_fit_epoch_end")')


def check_heartbeat_points() -> None:
    from ultralytics.engine.validator import BaseValidator

    in_order(base_trainer()._setup_train, 'self.run_callbacks("on_pretrain_routine_end")')
    in_order(base_trainer()._do_train, "self.optimizer_step()", 'self.run_callbacks("on_train_batch_end")',
              'self.run_callbacks("on_fit_epoch_end")', "dist.broadcast_object_list(broadcast_list, 0)")
    in_order(BaseValidator.__call__, 'self.run_callbacks("on_val_batch_start")',
             'self.run_callbacks("on_val_batch_end")')


def check_val_loop_alone() -> None:
    """The validation loop runs between init_metrics and gather_stats with no collective (valretry's retry point);
    in it the network's forward pass (``preds = model(``, which the retry splits) comes before the loss, the
    postprocess and the metrics, which read the whole batch's preds; every network's predict returns its head's
    (``model[-1]``) output."""
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.nn import tasks

    in_order(BaseValidator.__call__, 'self.loss = {k: torch.zeros_like(v)', "self.init_metrics(",
             "for batch_i, batch in enumerate(bar):", 'self.run_callbacks("on_val_batch_end")', "self.gather_stats()")
    text = collapsed_source(BaseValidator.__call__)
    loop = text[text.find("self.init_metrics("):text.find("self.gather_stats()")]
    require("dist." not in loop, "a collective inside the validation loop")
    in_order(BaseValidator.__call__, "self.init_metrics(", 'preds = model(batch["img"]', "model.loss(batch, preds)",
             "preds = self.postprocess(preds)", "self.update_metrics(preds, batch)", "self.gather_stats()")
    import sys

    require(hasattr(sys.modules[BaseValidator.__module__], "torch_distributed_zero_first"), "no barrier to lift")
    for cls in (tasks.BaseModel, tasks.RTDETRDetectionModel, tasks.WorldModel, tasks.YOLOEModel):
        source = collapsed_source(cls.predict if cls is not tasks.BaseModel else cls._predict_once)
        require(source.rstrip().endswith("return x"), f"{cls.__name__}: predict does not end with the head's output")


def check_assigner_warning() -> None:
    from ultralytics.utils.tal import TaskAlignedAssigner

    from yolosafe.training import callbacks

    text = inspect.getsource(TaskAlignedAssigner.forward)
    found = re.search(r'f"(CUDA out of memory in TaskAlignedAssigner with batch_size=)\{bs\}( and max_num_obj=)'
                      r'\{n_max_boxes\}', text)
    require(found, "the assigner's OOM warning is not worded as yolosafe reads it")
    require(found and callbacks.ASSIGNER_OOM.search(f"{found[1]}32{found[2]}7"), "ASSIGNER_OOM does not match it")
    in_order(TaskAlignedAssigner.forward, "except RuntimeError", "LOGGER.warning(", "self._forward(")


def check_val_batch_start() -> None:
    from ultralytics.engine.validator import BaseValidator

    in_order(BaseValidator.__call__, 'self.run_callbacks("on_val_start")', "for batch_i, batch in enumerate(",
              'self.run_callbacks("on_val_batch_start")', "batch = self.preprocess(batch)", "preds = model(")


def check_callback_ranks() -> None:
    from ultralytics.engine.validator import BaseValidator

    trainer = base_trainer()
    for event in ("on_train_epoch_start", "on_train_batch_start", "on_train_epoch_end", "on_fit_epoch_end"):
        require(not rank_guarded(trainer._do_train, event), f"{event} no longer runs on every rank")
    for event in ("on_val_start", "on_val_batch_start"):
        require(not rank_guarded(BaseValidator.__call__, event), f"{event} no longer runs on every rank")
    require(rank_guarded(BaseValidator.__call__, "on_val_end"), "on_val_end now runs on every rank")
    in_order(trainer._setup_train, "self._build_train_pipeline()", "self.validator = self.get_validator()",
              "if RANK in {-1, 0}:")


def check_resume_batch() -> None:
    tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(base_trainer().check_resume)))
    allowed = next((n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                    and ast.unparse(n.targets[0]) == "allowed"), None)
    require(isinstance(allowed, ast.Set), "no 'allowed' set of resume overrides")
    keys = {e.value for e in allowed.elts if isinstance(e, ast.Constant)}
    require({"batch", "device", "workers", "plots"} <= keys, f"resume overrides {sorted(keys)}")
    in_order(base_trainer().resume_training, 'start_epoch = ckpt.get("epoch", -1) + 1')
    in_order(base_trainer().save_model, '"epoch": self.epoch')


def check_accumulate() -> None:
    in_order(base_trainer()._build_train_pipeline, "batch_size = self.batch_size // max(self.world_size, 1)",
              "self.accumulate = max(round(self.args.nbs / self.batch_size), 1)", "if not self.args.time:",
              "self.accumulate = min(self.accumulate, len(self.train_loader) * self.epochs)")
    for nbs, batch, iterations in ((64, 16, None), (16, 8, 8), (64, 8, 4), (100, 48, None), (96, 64, 1)):
        capped = max(round(nbs / batch), 1) if iterations is None else min(max(round(nbs / batch), 1), iterations)
        require(accumulation.nominal_accumulate(nbs, batch, iterations) == capped, str((nbs, batch, iterations)))


def check_warmup() -> None:
    from types import SimpleNamespace

    import numpy as np

    in_order(base_trainer()._do_train, "nw = self._get_warmup_iterations(nb)", "acc0 = self.accumulate",
              "ni = i + nb * epoch", "if nw and ni <= nw:", "xi = [0, nw]",
              "self.accumulate = max(1, int(np.interp(ni, xi, [1, acc0]).round()))")
    for warmup_epochs, epochs, nb in ((3.0, 100, 7), (3.0, 2, 4), (0.5, 10, 3), (0.0, 5, 9), (3.0, 1, 4)):
        fake = SimpleNamespace(args=SimpleNamespace(warmup_epochs=warmup_epochs), epochs=epochs)
        real = base_trainer()._get_warmup_iterations(fake, nb)
        ours = accumulation.warmup_iterations(warmup_epochs, epochs, nb)
        require(real == ours, f"warmup_epochs={warmup_epochs}, epochs={epochs}, {nb} batches: {real} != plan's {ours}")
    for acc0 in (1, 2, 3, 4, 7, 16):
        for nw in (1, 2, 4, 5, 12, 21):
            for ni in range(nw + 1):
                real = max(1, int(np.interp(ni, [0, nw], [1, acc0]).round()))
                ours = accumulation.warmup_accumulate(ni, nw, acc0)
                require(ours == real, f"iteration {ni} of {nw}, accumulate {acc0}: {real} != plan's {ours}")


def check_loader_length() -> None:
    from ultralytics.data.build import build_dataloader

    in_order(build_dataloader, "batch = min(batch, dataset_len)", "distributed.DistributedSampler(dataset,")
    for images, batch in ((32, 8), (30, 8), (5, 8), (16, 16), (33, 4)):
        loader = build_dataloader(list(range(images)), batch, 0, shuffle=True, rank=-1, device="cpu")
        require(len(loader) == accumulation.batches_per_epoch(images, batch, 1), str((images, batch)))
    require(accumulation.batches_per_epoch(33, 4, 2) == math.ceil(math.ceil(33 / 2) / 4),  # DistributedSampler pads up
             "33 images over 2 ranks in batches of 4")


def check_defaults() -> None:
    import yaml
    from ultralytics.utils import DEFAULT_CFG_PATH

    cfg = yaml.safe_load(DEFAULT_CFG_PATH.read_text())
    require(cfg["nbs"] == accumulation.ULTRALYTICS_DEFAULT_NBS, f"nbs default {cfg['nbs']}")
    warmup = cfg["warmup_epochs"]
    require(warmup == accumulation.ULTRALYTICS_DEFAULT_WARMUP_EPOCHS, f"warmup_epochs {warmup}")


def check_ddp_flag() -> None:  # train() acting on it: check_do_train_signature
    in_order(base_trainer().__init__, "self.ddp = world_size > 1 and LOCAL_RANK == -1", "self.world_size = world_size")


def check_model_api() -> None:
    from ultralytics.engine.model import Model

    require("trainer" in inspect.signature(Model.train).parameters, "Model.train has no 'trainer' argument")
    in_order(Model.train, "(trainer or self._smart_load(\"trainer\"))(overrides=args, _callbacks=self.callbacks)")
    in_order(Model._load, "self.ckpt")



def check_ddp_setup() -> None:  # what cpuranks' _setup_ddp replaces on the CPU
    in_order(base_trainer()._setup_ddp, "index = int(devices[LOCAL_RANK])", "self.device = torch.device(device_type, "
              "index)", "self.accelerator.set_device(index)", "dist.init_process_group(", "rank=RANK",
              "world_size=self.world_size")


def check_ddp_device_ids() -> None:  # what cpuranks' DistributedDataParallel replaces on the CPU
    in_order(base_trainer()._setup_train, "if self.world_size > 1:", "nn.parallel.DistributedDataParallel(",
              "device_ids=[self.device.index]")


def _environ_writes(func: Any) -> list[str]:
    """The statements of ``func`` that may write ``CUDA_VISIBLE_DEVICES``: an item of ``os.environ`` set under that
    name, or the environment changed wholesale (update/setdefault/pop/putenv)."""
    tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(func)))
    found = []
    for node in ast.walk(tree):
        targets = [node.target] if isinstance(node, ast.AugAssign) else getattr(node, "targets", [])
        item = any(isinstance(t, ast.Subscript) and "environ" in ast.unparse(t.value)
                   and "CUDA_VISIBLE_DEVICES" in ast.unparse(t.slice) for t in targets)
        method = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
            node.func.attr in {"putenv", "unsetenv"}
            or (node.func.attr in {"update", "setdefault", "pop"} and "environ" in ast.unparse(node.func)))
        if item or method:
            found.append(ast.unparse(node)[:80])
    return found


def check_select_device_keeps_visible() -> None:
    import os

    from ultralytics.utils import torch_utils

    writes = _environ_writes(torch_utils.select_device)
    require(not writes, f"select_device writes the environment: {writes}")
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    torch_utils.select_device("cpu", verbose=False)  # older releases set CUDA_VISIBLE_DEVICES=-1 here
    require(os.environ.get("CUDA_VISIBLE_DEVICES") == before, "select_device('cpu') changed CUDA_VISIBLE_DEVICES")


def check_final_val_device() -> None:  # what cpuranks' final_eval replaces on the CPU
    from ultralytics.engine import validator

    in_order(validator.BaseValidator.__call__, "model = AutoBackend(", "select_device(self.args.device) if RANK "
              "== -1 else torch.device(device_type, get_torch_device_backend(device_type).current_device())")
    require(callable(getattr(validator, "get_torch_device_backend", None)) and callable(validator.AutoBackend),
             "ultralytics.engine.validator no longer imports get_torch_device_backend and AutoBackend")
