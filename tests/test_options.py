"""The resolved options as one typed object: its fields, its one constructor that parses every value into its type
and refuses what is out of range, what the story records of it."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from yolosafe.api import trainrun
from yolosafe.planning.options import DEFAULTS
from yolosafe.planning.saveevery import SaveEvery
from yolosafe.planning.trainoptions import DERIVED, PARSERS, TrainOptions, field_names
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
    assert {key: getattr(defaults, key) for key in DEFAULTS} == {key: PARSERS[key](key, DEFAULTS[key])
                                                                 for key in DEFAULTS}
    assert tuple(PARSERS) == (*(k for k in PARSERS if k in DEFAULTS), *RESOLVED)  # the options, then the rest
    assert set(PARSERS) == set(field_names())  # every field is parsed
    assert defaults.recorded(DEFAULTS) == {**DEFAULTS, "args": ()}  # as a JSON file holds them
    assert defaults.save_every == SaveEvery(auto=True) and str(defaults.save_every) == "auto"


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


@settings(max_examples=150, deadline=None)
@given(values=MAPPINGS)
def test_any_values_are_parsed_into_their_types_or_refused_in_one_line(values):
    """Whatever a --config file or a keyword holds: one InputError line, or options whose every field has its type,
    which read back through the constructor as the same options (parsing is done once: a parsed value parses to
    itself)."""
    try:
        options = TrainOptions.of(values)
    except InputError as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    assert_typed(options)
    assert TrainOptions.of(options.as_dict()) == options


def assert_typed(options: TrainOptions) -> None:
    whole = (int,)
    for key in ("batch", "imgsz", "epochs", "max_retries", "min_batch", "max_hang_restarts"):
        value = getattr(options, key)
        assert (isinstance(value, whole) and not isinstance(value, bool)) or (key == "batch" and value == "auto")
    for key in ("effective_batch", "val_batch"):
        assert getattr(options, key) is None or type(getattr(options, key)) is int
    for key in ("watch_interval", "warn_at", "memory_fraction"):
        assert type(getattr(options, key)) is float
    assert options.hang_timeout is None or type(options.hang_timeout) is float
    assert isinstance(options.save_every, SaveEvery)
    assert type(options.clear_before_val) is bool and type(options.download) is bool
    assert isinstance(options.args, tuple) and all(isinstance(w, str) for w in options.args)
    for key in ("model", "gpus", "alloc_conf", "task", "project"):
        assert getattr(options, key) is None or isinstance(getattr(options, key), str)
    assert isinstance(options.data, str) and isinstance(options.name, str)


GOOD = {  # each option in the forms a flag, a YAML file, a keyword or a yolo word gives it, and its parsed value
    "batch": [(8, 8), ("auto", "auto"), (" AUTO ", "auto")],
    "watch_interval": [(0, 0.0), (1, 1.0), ("0.5", 0.5), (0.02, 0.02)],
    "warn_at": [(1, 1.0), ("0.8", 0.8)],
    "hang_timeout": [(None, None), (0, 0.0), (600, 600.0)],
    "memory_fraction": [(1, 1.0), (0.7, 0.7)],
    "save_every": [("10m", SaveEvery(seconds=600.0)), ("500it", SaveEvery(iterations=500)), (0, SaveEvery()),
                   ("auto", SaveEvery(auto=True))],
    "args": [(["lr0=0.01"], ("lr0=0.01",)), ((), ())],
}


@pytest.mark.parametrize(("key", "given", "parsed"), [(k, g, p) for k, forms in GOOD.items() for g, p in forms])
def test_each_form_of_an_option_is_parsed_into_its_type(key, given, parsed):
    value = getattr(TrainOptions.of({key: given}), key)
    assert value == parsed and type(value) is type(parsed)


BAD = [  # out of range or of the wrong type: refused by the constructor, naming the option
    ({"batch": 0}, "--batch 0: must be at least 1"), ({"batch": "16"}, "--batch '16': must be a whole number"),
    ({"batch": 2.5}, "must be a whole number"), ({"imgsz": 10**30}, "at most 16384"),
    ({"epochs": True}, "--epochs True: must be a whole number"), ({"max_retries": -1}, "must be at least 0"),
    ({"watch_interval": 100}, "--watch-interval 100"), ({"watch_interval": "fast"}, "expected a number"),
    ({"warn_at": 90}, "--warn-at 90: give a share"), ({"memory_fraction": 0}, "--memory-fraction 0"),
    ({"memory_fraction": float("nan")}, "expected a number"), ({"hang_timeout": -1}, "--hang-timeout -1"),
    ({"hang_timeout": "10m"}, "--hang-timeout '10m'"), ({"save_every": "often"}, "--save-every 'often'"),
    ({"val_oom": "retry"}, "val_oom 'retry'"), ({"clear_before_val": "no"}, "clear_before_val 'no'"),
    ({"name": "a/b"}, "--name 'a/b': give a single folder name"), ({"name": "x" * 300}, "at most 255"),
    ({"model": 3}, "--model 3: must be text"), ({"args": "lr0=0.01"}, "args 'lr0=0.01'"),
    ({"batch": "auto", "nnodes": 2}, "--batch auto with 2 nodes"),
]


@pytest.mark.parametrize(("values", "said"), BAD)
def test_what_is_out_of_range_is_refused_when_the_options_are_built(values, said):
    with pytest.raises(InputError) as caught:
        TrainOptions.of(values)
    assert said in str(caught.value) and "\n" not in str(caught.value)


def test_a_later_step_s_replace_is_parsed_as_well():
    options = TrainOptions.of({"batch": "auto"})
    assert options.replace(batch=16).batch == 16
    with pytest.raises(InputError, match="--batch 0"):
        options.replace(batch=0)
    with pytest.raises(InputError, match="--batch auto with 3 nodes"):
        options.replace(nnodes=3)


def test_the_story_records_the_same_keys_and_reads_back_as_the_same_options():
    options = TrainOptions.of({**DEFAULTS, "max_retries": 5, "min_batch": 2, "watch_interval": 0.5, "warn_at": 0.8,
                               "clear_before_val": False, "command": ["yolosafe", "train"], "save_every": "10m",
                               "dataset_name": "shapes", "data_yaml": "/data/shapes.yaml"})
    recorded = options.to_story()
    assert set(recorded) == STORY_KEYS
    assert recorded["dataset"] == {"name": "shapes", "yaml": "/data/shapes.yaml"}
    assert recorded["save_every"] == "10m"  # the word as given
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
