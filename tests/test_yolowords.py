"""The copies of Ultralytics' parser in :mod:`yolosafe.planning.yolowords` pinned to the originals: each test runs
``ultralytics.cfg``'s own function (``smart_value``, ``parse_key_value_pair``, ``merge_equals_args``,
``_handle_deprecation``, ``entrypoint``'s argument loop) on the same words, hypothesis-generated ones included, and
fails where the copy reads them differently. No training, no process."""

from __future__ import annotations

import ast
import inspect
import math
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from yolosafe.planning import trainplan, yolowords

cfg = pytest.importorskip("ultralytics.cfg")

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _same(a, b) -> bool:
    """Equal values, NaN included (``nan`` reads as the float NaN in both)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except Exception:
        return "refused", None


# Values as a user types them: numbers in every notation, literals, bools in any case, paths, devices, junk.
VALUE_WORDS = st.one_of(
    st.sampled_from(["1e-3", "1E-3", "0.01", ".5", "5.", "-1", "001", "0x10", "1_000", "0,1", "[0, 1]", "(0,1)",
                     "cuda:0", "cpu", "True", "true", "FALSE", "none", "None", "off", "on", "yes", "no", "nan",
                     "inf", "disk", "ram", "'quoted'", '"dq"', "{'a': 1}", "runs/detect/train", "last.pt", "a b",
                     " 32", "32 ", "cv2.COLORMAP_JET", "math.pi", "os.SEEK_END", "[1,", "]", "=", "==", "1=2"]),
    st.integers(-1000, 1000).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(alphabet="abc019.,-_/:[]() '\"=eE", max_size=12),
)


@given(VALUE_WORDS)
@SETTINGS
def test_smart_value_reads_as_ultralytics_reads(text):
    assert _same(yolowords.smart_value(text), cfg.smart_value(text))


KEYS = st.sampled_from(["lr0", "name", "project", "classes", "device", "imgsz", "model", "batch", "cache", " epochs",
                        "val ", "boxes", "hide_labels"])


@given(KEYS, VALUE_WORDS)
@SETTINGS
def test_parse_key_value_pair_reads_as_ultralytics_reads(key, value):
    pair = f"{key}={value}"
    ours, theirs = _outcome(yolowords.parse_key_value_pair, pair), _outcome(cfg.parse_key_value_pair, pair)
    assert ours[0] == theirs[0], pair
    if ours[0] == "ok":
        assert ours[1][0] == theirs[1][0] and _same(ours[1][1], theirs[1][1]), pair


@pytest.mark.parametrize(("pair", "value"), [("lr0=1e-3", 0.001), ("name=001", "001"), ("classes=0,1", (0, 1)),
                                             ("device=(0,1)", (0, 1)), ("val=off", "off"), ("project=None", None)])
def test_the_words_yolo_users_type(pair, value):
    assert cfg.parse_key_value_pair(pair)[1] == value == yolowords.parse_key_value_pair(pair)[1]


FRAGMENTS = st.lists(st.sampled_from(["imgsz", "=", "imgsz=", "=32", "32", "epochs", "=1,", "[3,", "640,", "640]",
                                      "rect", "lr0=1e-3", "]", "[", "a=[1,", "2]", "cache", "disk"]), max_size=8)


@given(FRAGMENTS)
@SETTINGS
def test_merge_equals_args_joins_as_ultralytics_joins(words):
    assert _outcome(yolowords.merge_equals_args, words) == _outcome(cfg.merge_equals_args, words)


DEPRECATED = st.dictionaries(
    st.sampled_from(["boxes", "hide_labels", "hide_conf", "line_thickness", "label_smoothing", "save_hybrid",
                     "crop_fraction", "keras", "end2end", "nms", "int8", "half", "quantize", "lr0"]),
    st.sampled_from([True, False, None, 0, 1, 2, "False", "", "0", 16]), max_size=6)


@given(DEPRECATED)
@SETTINGS
def test_deprecated_keys_map_as_ultralytics_maps(custom):
    ours = _outcome(lambda c: yolowords.handle_deprecation(c)[0], dict(custom))
    assert ours == _outcome(cfg._handle_deprecation, dict(custom)), custom


def test_tasks_modes_and_special_commands_are_ultralytics_own():
    assert yolowords.TASKS == cfg.TASKS and yolowords.MODES == cfg.MODES
    assert set(yolowords.SPECIAL) == _entrypoint_special_commands()
    assert set(yolowords.DEPRECATED) | yolowords.REMOVED == _deprecation_keys()
    assert yolowords.VERBATIM_KEYS == ("name", "project") and '{"name", "project"}' in inspect.getsource(
        cfg.parse_key_value_pair)


def test_the_architecture_guess_is_entrypoints():
    source = inspect.getsource(cfg.entrypoint)
    assert 'if "rtdetr" in stem:' in source and "model = RTDETR(model)" in source


def _entrypoint_special_commands() -> set[str]:
    """The keys of the ``special`` dict literal in ``entrypoint``'s source."""
    tree = ast.parse(inspect.getsource(cfg.entrypoint))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "special" \
                and isinstance(node.value, ast.Dict):
            return {k.value for k in node.value.keys}
    raise AssertionError("entrypoint has no 'special' dict")


def _deprecation_keys() -> set[str]:
    tree = ast.parse(inspect.getsource(cfg._handle_deprecation))
    keys: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) in ("deprecated_mappings",
                                                                                     "removed_keys"):
            keys |= {k.value for k in (node.value.keys if isinstance(node.value, ast.Dict) else node.value.elts)}
    return keys


class _Parsed(Exception):
    """Raised where ``entrypoint`` has read every word and checked the keys: carries what it read."""


def entrypoint_reads(words: list[str], monkeypatch) -> tuple[str, dict | None]:
    """Ultralytics' own ``entrypoint`` on ``yolo WORDS``, stopped after its argument loop and key check: the typed
    overrides (deprecations mapped), or ``refused``. Nothing is built, trained or downloaded."""
    real = cfg.check_dict_alignment

    def check(base, custom, e=None, allowed_custom_keys=None):
        final = sys._getframe(1).f_locals.get("overrides") is custom  # the key check after the loop
        real(base, custom, e, allowed_custom_keys)  # refuses as Ultralytics refuses
        if final:
            raise _Parsed(custom)

    with monkeypatch.context() as m:
        m.setattr(cfg, "check_dict_alignment", check)
        m.setattr(cfg, "ARGV", ["yolo", *words])
        try:
            cfg.entrypoint()
        except _Parsed as parsed:
            return "ok", dict(parsed.args[0])
        except Exception:
            return "refused", None
    raise AssertionError(f"entrypoint returned on {words}")  # a special command ran


def yolosafe_reads(words: list[str]) -> tuple[str, dict | None]:
    try:
        typed, _ = trainplan.read_words(words)
    except trainplan.PlanError:
        return "refused", None
    # entrypoint's key check: Ultralytics' train keys, and its task, mode and command words (``detect=1`` passes
    # there and is refused by Model.train's own check, as by yolosafe's check_passthrough)
    known = {*trainplan.ultralytics_train_keys(), *yolowords.TASKS, *yolowords.MODES, *yolowords.SPECIAL}
    if set(typed) - known - {"augmentations", "save_dir"}:
        return "refused", None
    return "ok", typed


@pytest.mark.parametrize("words", [
    ["train", "detect", "model=yolov8n.yaml", "data=coco8.yaml", "imgsz=32"],
    ["detect", "train", "rect", "cos_lr", "lr0=1e-3"],
    ["train", "imgsz=", "32", "epochs", "=1,", "cache", "=", "disk"],
    ["train", "--epochs=1", "name=001", "classes=0,1", "device=cuda:0"],
    ["train", "boxes=False", "hide_labels=True", "line_thickness=2", "label_smoothing=0.1"],
    ["train", "half", "int8", "nms", "end2end"],
    ["train", "imgsz=[3,", "640,", "640]"],
    ["train", "name="],
    ["train", "epochs"],
    ["train", "epoch=3"],
    ["train", "imgsz=[3,"],
])
def test_entrypoint_and_yolosafe_read_the_same_command(words, monkeypatch):
    ours, theirs = yolosafe_reads(words), entrypoint_reads(words, monkeypatch)
    assert ours[0] == theirs[0], words
    if ours[0] == "ok":
        assert ours[1].keys() == theirs[1].keys() and all(_same(ours[1][k], theirs[1][k]) for k in ours[1]), words


COMMAND_WORDS = st.lists(st.one_of(
    st.sampled_from([*yolowords.TASKS, *yolowords.MODES, "rect", "cos_lr", "val", "epochs", "=", "=1", "imgsz=",
                     "32,", "--lr0=0.1", "[3,", "640]", "hide_conf", "half", "nms", "noval", "boxes=0"]),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["lr0", "name", "batch", "device", "classes", "epochs",
                                                        "line_thickness", "save_hybrid"]), VALUE_WORDS),
), max_size=6)


@given(COMMAND_WORDS)
@SETTINGS
def test_generated_commands_read_as_entrypoint_reads_them(monkeypatch, words):
    words = [w for w in words if " " not in w] or ["train"]  # a shell word never holds a space unquoted
    ours, theirs = yolosafe_reads(words), entrypoint_reads(words, monkeypatch)
    assert ours[0] == theirs[0], words
    if ours[0] == "ok":
        assert ours[1].keys() == theirs[1].keys() and all(_same(ours[1][k], theirs[1][k]) for k in ours[1]), words
