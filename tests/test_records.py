"""Typed run records: the schema the supervisor, the trainer and the callbacks write today loads, round-trips
unchanged (unknown keys and key order kept), tolerates missing keys, and a damaged file is one line."""

from __future__ import annotations

import json

import pytest

from tests.standins import failure, oom_run
from yolosafe.rundir import files as rundir
from yolosafe.rundir import records

STORY = {  # as cli.train builds it and Supervisor._attempts extends it
    "yolosafe": "0.1.0", "command": ["yolosafe", "train"], "run_dir": "/r", "dataset": {"name": "shapes"},
    "plan": {"model": "yolov8n.yaml", "gpus": [0, 1], "batch": 8, "effective_batch": 64, "val_batch": 4},
    "allocator": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, "versions": {"torch": "2.4"},
    "gpu_backend": "fake", "gpus": [], "simulated_on_cpu": True, "max_retries": 3, "min_batch": 1,
    "watch_interval": 0.1, "warn_at": 0.9, "clear_before_val": True,
    "attempts": [{"attempt": 1, "mode": "train", "started": "2025-01-01T10:00:00+0000", "batch": 8,
                  "per_gpu_batch": 4, "val_batch": 4, "nbs": 64, "accumulate": 8, "resumed_from": None,
                  "duration_s": 3.2, "exit_code": 1, "outcome": "oom", "reason": "CUDA out of memory", "phase": "val",
                  "epoch": 0, "rank": 0, "gpu": 0, "resumed_from_epoch": None, "next": "val batch 4 -> 2 per GPU",
                  "a_future_key": [1, 2]}],
    "outcome": "oom", "memory_watch": {"interval_s": 0.1}, "weights": {"last": "/r/weights/last.pt"},
}


def test_story_round_trips_the_current_schema(tmp_path):
    rundir.write_json(tmp_path / rundir.STORY, STORY)
    story = records.load_story(tmp_path)
    assert story.attempts[0].phase == "val" and story.attempts[0].extra == {"a_future_key": [1, 2]}
    assert story.plan_gpus == [0, 1] and story.outcome == "oom"
    assert story.to_dict() == STORY and list(story.to_dict()) == list(STORY)
    records.save_story(tmp_path, story)
    assert json.loads((tmp_path / rundir.STORY).read_text()) == STORY


def test_missing_keys_are_tolerated_and_new_values_are_written(tmp_path):
    rundir.write_json(tmp_path / rundir.STORY, {"plan": {}})
    story = records.load_story(tmp_path)
    assert story.attempts == [] and story.outcome is None
    story.attempts.append(records.Attempt(attempt=1, batch=8))
    story.outcome = "running"
    assert story.to_dict() == {"plan": {}, "attempts": [{"attempt": 1, "batch": 8}], "outcome": "running"}


def test_failures_load_in_numeric_attempt_order(tmp_path):
    for n in (10, 2, 1):
        records.save_failure(tmp_path, failure(n, "train", n, 8, 8))
    loaded = records.load_failures(tmp_path)
    assert [f.name for f in loaded] == ["failure-1-rank1.json", "failure-2-rank1.json", "failure-10-rank1.json"]
    assert [f.attempt for f in records.load_failures(tmp_path, attempt=2)] == [2]
    raw = json.loads((tmp_path / "failure-2-rank1.json").read_text())
    assert loaded[1].to_dict() == raw and "name" not in raw


@pytest.mark.parametrize("content, words", [
    ("{\"plan\": {", "damaged, not JSON"),
    ("[1, 2]", "expected a JSON object"),
    ("{\"attempts\": 3}", "'attempts' is 3, expected list[Attempt]"),
    ("{\"plan\": 3}", "'plan' is 3, expected dict[str, Any]"),
    ("{\"attempts\": [{\"attempt\": 1, \"batch\": \"x\"}]}", "'batch' is 'x', expected int | None"),
    ("{\"attempts\": [7]}", "'attempts' is not a list of objects"),
    (b"\xff\xfe", "damaged, not JSON"),
])
def test_a_damaged_story_is_one_line(tmp_path, content, words):
    path = tmp_path / rundir.STORY
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(records.RecordError) as caught:
        records.load_story(tmp_path)
    assert words in str(caught.value) and "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_events_skip_a_line_cut_short(tmp_path):
    rundir.append_jsonl(tmp_path / rundir.EVENTS, {"event": "val_start", "t": 1.0, "phase": "val", "attempt": 1})
    with open(tmp_path / rundir.EVENTS, "a") as fh:
        fh.write('{"event": "val_e')
    assert [(e.event, e.phase) for e in records.load_events(tmp_path)] == [("val_start", "val")]


def test_the_stand_in_run_is_written_through_the_records(tmp_path):
    run = oom_run(tmp_path / "run")
    story = records.load_story(run)
    assert [a.outcome for a in story.attempts] == ["oom", "oom"] and story.outcome == "oom_exhausted"
    assert [f.phase for f in records.load_failures(run)] == ["val", "train"]
