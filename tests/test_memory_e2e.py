"""The memory watch end to end: a real CPU training under scripted fake GPUs, its report, `yolosafe report`."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.conftest import TINY, run_dir_of, story

# GPU 1 holds 5000 MiB of somebody else's; the run's validation peaks on GPU 2 (one more GiB each epoch, so at epoch
# 1) and, above the 90 % warning line, on GPU 3.
FAKE = json.dumps({"gpus": [
    {"total_mib": 24576, "phase_mib": {"train": 3000, "val": 4000}},
    {"total_mib": 24576, "used_mib": 5000, "processes": [{"pid": 4242, "used_mib": 5000}],
     "phase_mib": {"train": 3000, "val": 4000}},
    {"total_mib": 24576, "phase_mib": {"train": 3000, "val": 9000}, "epoch_mib": {"val": 1000}},
    {"total_mib": 24576, "phase_mib": {"train": 3000, "val": 23000}},
]})


@pytest.mark.slow
def test_fake_validation_peak_is_found_on_its_gpu_and_epoch(run_cli, tmp_path):
    result = run_cli("train", "--gpus", "0,1,2,3", "--epochs", "2", "--watch-interval", "0.02", *TINY,
                     env={"YOLOSAFE_FAKE_GPUS": FAKE})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = run_dir_of(tmp_path)
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    for kind in ("train_start", "train_end", "val_start", "val_end"):
        assert sorted({e["epoch"] for e in events if e["event"] == kind and not e["final"]}) == [0, 1], kind
    ends = [e for e in events if e["event"].endswith("_end")]
    assert ends and all(e["max_allocated_mib"] is None and e["max_reserved_mib"] is None for e in ends)  # CPU
    assert json.loads((run / "spec-1.json").read_text())["clear_before_val"] is True

    summary = json.loads((run / "memory_summary.json").read_text())
    gpus = summary["gpus"]
    val2 = gpus["2"]["phases"]["val"]
    assert (val2["peak_used_mib"], val2["epoch_of_peak"], val2["peak_ours_mib"]) == (10000, 1, 10000)
    assert gpus["0"]["phases"]["val"]["peak_used_mib"] == 4000 and gpus["2"]["phases"]["train"]["peak_used_mib"] == 3000
    assert gpus["1"]["peak_others_mib"] == 5000 and gpus["1"]["phases"]["val"]["peak_used_mib"] == 9000
    assert gpus["3"]["headroom_mib"] == 1576
    warnings = [line for line in result.stderr.splitlines() if "memory warning" in line]
    assert len(warnings) == 1 and "GPU 3 at 94% in val, epoch 1" in warnings[0]  # two validations: one line
    assert story(run)["memory_watch"]["warnings"][0]["gpu"] == 3

    csv_lines = (run / "memory.csv").read_text().splitlines()
    assert csv_lines[0] == "t,attempt,gpu,total_mib,used_mib,ours_mib,others_mib,phase,epoch" and len(csv_lines) > 100
    assert {line.split(",")[7] for line in csv_lines[1:]} >= {"train", "val"}
    png = run / "memory.png"
    assert png.stat().st_size > 20_000
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1100, 500)
    assert "val peak" in result.stderr and "9.8 GiB 41% e2" in result.stderr  # the table yolosafe train ends with

    png.unlink()
    again = run_cli("report", "--json")  # the latest run under ./runs
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["gpus"] == gpus and png.is_file()
    table = run_cli("report", str(run))
    assert table.returncode == 0 and "22.5 GiB 94% e1" in table.stdout


def test_report_without_memory_data_says_so_in_one_line(run_cli, tmp_path):
    run = run_dir_of(tmp_path)
    run.mkdir(parents=True)
    (run / "yolosafe.json").write_text(json.dumps({"plan": {"gpus": []}, "outcome": "completed"}))
    result = run_cli("report", str(run))
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "no memory data" in result.stderr
    missing = run_cli("report")
    assert missing.returncode == 1 and "no memory data" in missing.stderr  # found as the latest run


def test_watch_options_are_checked(run_cli):
    from tests.test_cli import assert_usage_error

    fake = {"YOLOSAFE_FAKE_GPUS": "2x24GB"}
    assert_usage_error(run_cli("train", "--warn-at", "90", "--dry-run", env=fake), "--warn-at 90", "at most 1")
    assert_usage_error(run_cli("train", "--watch-interval", "-1", "--dry-run", env=fake), "--watch-interval -1")
    ok = run_cli("train", "--watch-interval", "0", "--no-clear-before-val", "--dry-run", env=fake)
    assert ok.returncode == 0, ok.stderr
