"""The resolved options as one typed object: its fields, its one constructor, what the story records of it."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from yolosafe.api import trainrun
from yolosafe.planning.options import DEFAULTS
from yolosafe.planning.trainoptions import DERIVED, TrainOptions, field_names
from yolosafe.planning.validate import InputError
from yolosafe.rundir.records import Story

RESOLVED = ("data_yaml", "dataset_name", "data_hint", "named", "differences", "user_code",
            "nnodes", "train_images", "dataset_figures", "command")
STORY_KEYS = {"command", "dataset", "max_retries", "min_batch", "watch_interval", "warn_at", "clear_before_val",
              "hang_timeout", "max_hang_restarts", "save_every"}
VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                  max_size=3), max_leaves=6)
MAPPINGS = st.dictionaries(st.sampled_from(sorted(field_names())), VALUES, max_size=8)


def test_the_fields_are_the_defaults_keys_then_the_resolved_ones_with_the_defaults_values():
    assert field_names() == (*DEFAULTS, *RESOLVED)
    assert DERIVED == RESOLVED
    defaults = TrainOptions()
    assert {key: getattr(defaults, key) for key in DEFAULTS} == dict(DEFAULTS)
    assert defaults.args is not DEFAULTS["args"]  # a fresh list: no run changes another's default


def test_an_unknown_key_is_refused_in_one_line():
    with pytest.raises(InputError) as caught:
        TrainOptions.of({**DEFAULTS, "bacth": 8, "data_yaml": "d.yaml"})
    message = str(caught.value)
    assert "\n" not in message and "unknown option(s) bacth" in message and "batch" in message


def test_the_options_are_resolved_once_and_a_later_step_replaces_fields():
    options = TrainOptions.of({"batch": "auto", "gpus": "auto:2"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.batch = 8  # type: ignore[misc]
    later = options.replace(batch=8, gpus="0,1", task="detect", train_images=12)
    assert (later.batch, later.gpus, later.task, later.train_images) == (8, "0,1", "detect", 12)
    assert (options.batch, options.gpus) == ("auto", "auto:2")


@settings(max_examples=40, deadline=None)
@given(values=MAPPINGS)
def test_as_dict_round_trips_through_the_constructor(values):
    options = TrainOptions.of(values)
    assert options.as_dict() == {**TrainOptions().as_dict(), **values}
    assert TrainOptions.of(options.as_dict()) == options


def test_the_story_records_the_same_keys_and_reads_back_as_the_same_options():
    options = TrainOptions.of({**DEFAULTS, "max_retries": 5, "min_batch": 2, "watch_interval": 0.5, "warn_at": 0.8,
                               "clear_before_val": False, "command": ["yolosafe", "train"],
                               "dataset_name": "shapes", "data_yaml": "/data/shapes.yaml"})
    recorded = options.to_story()
    assert set(recorded) == STORY_KEYS
    assert recorded["dataset"] == {"name": "shapes", "yaml": "/data/shapes.yaml"}
    story = Story.from_dict(json.loads(json.dumps(Story.new(**recorded).to_dict())))
    assert TrainOptions.from_story(story).to_story() == recorded
    assert TrainOptions.from_story(Story()) == TrainOptions()  # nothing recorded: the defaults


def test_resolve_gives_the_options_with_what_it_learned_about_the_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("YOLOSAFE_DATASETS", raising=False)
    data = tmp_path / "mine.yaml"
    data.write_text("path: .\ntrain: images\nval: images\nnames: {0: a}\n")
    options = trainrun.resolve({"data": str(data), "name": "exp", "epochs": 2}, None, None)
    assert isinstance(options, TrainOptions)
    found = (options.data_yaml, options.dataset_name, options.named, options.epochs, options.imgsz)
    assert found == (str(data), "mine", True, 2, DEFAULTS["imgsz"])
    assert options.model in ("yolov8n.pt", "yolov8n.yaml")
