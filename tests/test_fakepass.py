"""The fake pass's loss terms per task: each task's own loss, measured on CPU (a child's work, run here directly)."""

from __future__ import annotations

import pytest

from yolosafe.planning.memory import model as memmodel
from yolosafe.planning.memory import table as memtable
from yolosafe.rundir.childrecords import FakePassResult


@pytest.mark.slow
def test_every_task_has_its_own_measured_loss():
    from yolosafe.training import fakepass

    found = {}
    for yaml_name in ("yolov8n.yaml", "yolov8n-seg.yaml", "yolov8n-pose.yaml", "yolov8n-obb.yaml", "yolov8n-cls.yaml"):
        entry = fakepass.loss_terms(fakepass.build(yaml_name), 640)
        found[entry["task"]] = entry
        assert entry["task"] in entry["loss_source"] and entry["loss_per_image_mib"] > 0
    assert set(found) == {"detect", "segment", "pose", "obb", "classify"}
    assert found["classify"]["loss_per_object_mib"] == 0 and found["detect"]["loss_per_object_mib"] > 0.05
    assert found["segment"]["loss_per_image_mib"] > found["detect"]["loss_per_image_mib"]  # masks at mask_ratio
    assert found["pose"]["head_outputs"] == 4 + 1 + 17 * 3 and found["obb"]["head_outputs"] == 4 + 80 + 1
    with pytest.raises(memmodel.UnknownModel, match="could not measure its loss"):
        memtable.terms_from_entry("x", FakePassResult(params=1, imgsz=640, loss_error="boom"), "fake pass")
