"""The memory report on a hand-made two-GPU DDP run: the join by time and GPU, torch's peaks, the OOM, the plot."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from yolosafe.readers import report
from yolosafe.rundir import files as rundir
from yolosafe.rundir.layout import RunDir
from yolosafe.rundir.records import Failure, save_failure
from yolosafe.supervisor import watch

T0 = 1_700_000_000.0


def event(t: float, name: str, phase: str, rank: int, **fields) -> dict:
    return {"t": T0 + t, "event": name, "phase": phase, "epoch": 0, "final": False, "rank": rank, "gpu": rank,
            "attempt": 1, **fields}


@pytest.fixture
def ddp_run(tmp_path):
    """Ranks 0 and 1 on GPUs 2 and 3 (--gpus 2,3). Rank 1 validates from t=10 to t=14 and dies of an OOM at t=20
    in its second validation; GPU 3 peaks at 30 GiB during that first validation, GPU 2 at 12 GiB in training."""
    rundir.write_json(tmp_path / rundir.STORY, {"plan": {"gpus": [2, 3]},
                                                 "memory_watch": {"interval_s": 1.0, "warn_at": 0.9}})
    events = [
        event(1, "train_start", "train", 0), event(1, "train_start", "train", 1),
        event(9, "train_end", "train", 0, max_allocated_mib=9000.0, max_reserved_mib=11000.0),
        event(9, "train_end", "train", 1, max_allocated_mib=8000.0, max_reserved_mib=9000.0),
        event(10, "val_start", "val", 0), event(10, "val_start", "val", 1),
        event(12, "val_end", "val", 0, max_allocated_mib=7000.0, max_reserved_mib=7500.0),
        event(14, "val_end", "val", 1, max_allocated_mib=26000.0, max_reserved_mib=29000.0),
        event(18, "val_start", "val", 0, epoch=1), event(18, "val_start", "val", 1, epoch=1),
    ]
    for e in events:
        rundir.append_jsonl(tmp_path / rundir.EVENTS, e)
    save_failure(tmp_path, Failure.new(t=T0 + 20, oom=True, attempt=1, phase="val", epoch=1, rank=1, gpu=1))
    with open(tmp_path / rundir.MEMORY_CSV, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(watch.COLUMNS)
        for second in range(22):
            in_train, in_val = 1 <= second < 9, 10 <= second < 14
            out.writerow((T0 + second, 1, 2, 40960, 12000 if in_train else 8000, 7000, 1000))
            out.writerow((T0 + second, 1, 3, 40960, 30000 if in_val else 10000, 10000, ""))
        fh.write(f"{T0 + 22},1,2,409")  # the supervisor was killed in the middle of a line
    return tmp_path


def test_report_finds_the_validation_peak_on_its_gpu(ddp_run):
    summary = report.write(ddp_run)
    gpu2, gpu3 = summary["gpus"]["2"], summary["gpus"]["3"]
    assert gpu2["phases"]["train"]["peak_used_mib"] == 12000 and gpu2["phases"]["val"]["peak_used_mib"] == 8000
    val3 = gpu3["phases"]["val"]
    assert (val3["peak_used_mib"], val3["epoch_of_peak"], val3["headroom_mib"]) == (30000, 0, 10960)
    assert (val3["torch_max_allocated_mib"], val3["torch_max_reserved_mib"]) == (26000, 29000)
    assert val3["torch_reserved_minus_allocated_mib"] == 3000
    assert gpu3["phases"]["other"]["samples"] == 6  # t=0 (setup), 9 (train ended) and 14..17 (validation ended)
    assert gpu2["peak_others_mib"] == 1000 and gpu3["peak_others_mib"] is None  # NVML gave no per-process figure
    assert summary["ooms"] == [{"t": T0 + 20, "attempt": 1, "phase": "val", "epoch": 1, "rank": 1, "gpu": 3}]
    assert json.loads((ddp_run / rundir.MEMORY_SUMMARY).read_text()) == summary

    with Image.open(ddp_run / rundir.MEMORY_PLOT) as image:
        assert image.format == "PNG" and image.size == (1100, 500)
    lines = report.table(summary)
    assert len(lines) == 3 and "29.3 GiB 73% e1" in lines[2]


def test_no_samples_is_one_reason(tmp_path):
    rundir.write_json(tmp_path / rundir.STORY, {"plan": {"gpus": [0]}})
    with pytest.raises(report.NoMemoryData, match=r"no memory\.csv"):
        report.load(RunDir(tmp_path))
    (tmp_path / rundir.MEMORY_CSV).write_text(",".join(watch.COLUMNS) + "\n")
    with pytest.raises(report.NoMemoryData, match="no samples"):
        report.load(RunDir(tmp_path))
