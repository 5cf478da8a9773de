"""``yolo``'s own words, read as Ultralytics reads them, without importing it (``ultralytics.cfg`` imports torch).

The command line's ``key=value`` words, bare flags (``rect``), task and mode words (``detect``, ``train``) and the
spacing Ultralytics tolerates (``imgsz= 32``, ``epochs =1,``) are read here by copies of ``ultralytics.cfg``'s
``merge_equals_args``, ``parse_key_value_pair``, ``smart_value``, ``_handle_deprecation`` and the argument loop of
``entrypoint``; ``tests/test_yolowords.py`` runs Ultralytics' own functions on the same words (hypothesis-generated
too) and fails where the copies disagree with them.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from yolosafe.errors import UsageError

# ultralytics.cfg's TASKS and MODES, and the special commands of its entrypoint (tests/test_yolowords.py pins them).
TASKS = ("detect", "segment", "semantic", "depth", "classify", "pose", "obb")
MODES = ("train", "val", "predict", "export", "track", "benchmark")
SPECIAL = ("checks", "version", "settings", "cfg", "login", "logout", "copy-cfg", "solutions", "help")
VERBATIM_KEYS = ("name", "project")  # parse_key_value_pair keeps these as typed (name=001 stays "001")
# _handle_deprecation's maps: old key -> (new key, value transform); keys it drops.
DEPRECATED: Mapping[str, tuple[str, Callable[[Any], Any]]] = {
    "boxes": ("show_boxes", lambda v: v),
    "hide_labels": ("show_labels", lambda v: not bool(v)),
    "hide_conf": ("show_conf", lambda v: not bool(v)),
    "line_thickness": ("line_width", lambda v: v),
}
REMOVED = frozenset({"label_smoothing", "save_hybrid", "crop_fraction", "keras"})
BARE_TRUE = frozenset({"half", "int8", "end2end", "nms"})  # bare flags whose defaults are missing or None


class WordError(UsageError):
    """A word Ultralytics' parser refuses; ``str()`` is one line."""


def smart_value(v: str) -> Any:
    """``ultralytics.cfg.smart_value``: None, bools (any case), Python literals, numeric module constants, else the
    string."""
    v_lower = v.lower()
    if v_lower == "none":
        return None
    if v_lower == "true":
        return True
    if v_lower == "false":
        return False
    try:
        return ast.literal_eval(v)
    except Exception:
        name, _, attr = v.rpartition(".")
        if (module := sys.modules.get(name)) and attr.isupper():
            value = getattr(module, attr, None)
            if isinstance(value, (int, float)):
                return value
        return v


def parse_key_value_pair(pair: str) -> tuple[str, Any]:
    """``ultralytics.cfg.parse_key_value_pair``: split on the first ``=``, strip both sides; ``name``/``project``
    verbatim. An empty value is refused."""
    k, v = pair.split("=", 1)
    k, v = k.strip(), v.strip()
    if not v:
        raise WordError(f"{pair!r}: missing '{k}' value (Ultralytics: '{pair}' is not a valid YOLO argument)")
    return k, v if k in VERBATIM_KEYS and v.lower() != "none" else smart_value(v)


def merge_equals_args(args: Sequence[str]) -> list[str]:
    """``ultralytics.cfg.merge_equals_args``: ``['a', '=', 'v']``, ``['a=', 'v']``, ``['a', '=v']`` become ``a=v``;
    bracketed fragments are joined."""
    new_args: list[str] = []
    current: list[str] = []
    depth = 0
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "=" and 0 < i < len(args) - 1:
            arg = f"{new_args.pop()}={args[i + 1]}"
            i += 1
        elif arg.endswith("=") and i < len(args) - 1 and "=" not in args[i + 1]:
            arg += args[i + 1]
            i += 1
        elif arg.startswith("=") and i > 0:
            arg = new_args.pop() + arg
        depth += arg.count("[") - arg.count("]")
        current.append(arg)
        if depth == 0:
            new_args.append("".join(current))
            current = []
        i += 1
    if current:
        raise WordError(f"'{current[0]}' has an unmatched '[' or ']' bracket")
    return new_args


def handle_deprecation(custom: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``ultralytics.cfg._handle_deprecation`` on ``custom`` (in place, as there), with the notes it warns."""
    notes = []
    if "end2end" in custom:
        end2end = custom.pop("end2end")
        if end2end is not None:
            if not isinstance(end2end, bool):
                raise WordError("end2end: the deprecated 'end2end' must be a bool")
            custom["nms"] = False if end2end else True if custom.get("nms") is True else None
            notes.append(f"end2end={end2end} is deprecated; Ultralytics uses nms={custom.get('nms')}")
    int8, half = custom.pop("int8", None), custom.pop("half", None)
    if (int8 is not None or half is not None) and "quantize" not in custom:
        int8_on = int8 is not None and str(int8).strip().lower() not in {"none", "false", "0"}
        half_on = half is not None and str(half).strip().lower() not in {"none", "false", "0"}
        custom["quantize"] = 8 if int8_on else 16 if half_on else None
        notes.append(f"{'int8' if int8 is not None else 'half'} is deprecated; Ultralytics uses quantize")
    for old_key, (new_key, transform) in DEPRECATED.items():
        if old_key in custom:
            notes.append(f"{old_key} is deprecated; Ultralytics uses {new_key}")
            custom[new_key] = transform(custom.pop(old_key))
    for key in sorted(REMOVED & set(custom)):
        notes.append(f"{key} is no longer an Ultralytics argument; ignored")
        custom.pop(key)
    return custom, notes


def parse(words: Sequence[str], defaults: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The words of a ``yolo`` command (after its first word) as ``entrypoint`` reads them: typed ``key=value``
    pairs, ``task``/``mode`` from task and mode words, ``True`` for a bare boolean flag of ``defaults`` (Ultralytics'
    default config), deprecated keys mapped; and the notes Ultralytics would warn. ``cfg=`` stays a key."""
    overrides: dict[str, Any] = {}
    notes: list[str] = []
    try:
        merged = merge_equals_args(list(words))
    except IndexError:  # ['a=[1,', '=']: Ultralytics' own loop fails the same way
        raise WordError(f"{' '.join(words)!r}: a lone '=' with no argument before it") from None
    for a in merged:
        if a.startswith("--"):
            notes.append(f"argument '{a}' does not require leading dashes '--', updating to '{a[2:]}'")
            a = a[2:]
        if a.endswith(","):
            notes.append(f"argument '{a}' does not require trailing comma ',', updating to '{a[:-1]}'")
            a = a[:-1]
        if "=" in a:
            k, v = parse_key_value_pair(a)
            overrides[k] = v
        elif a in TASKS:
            overrides["task"] = a
        elif a in MODES:
            overrides["mode"] = a
        elif a.lower() in SPECIAL:
            raise WordError(f"'{a}' is a yolo command of its own: run 'yolosafe {a}' alone")
        elif (a in defaults and isinstance(defaults[a], bool)) or a in BARE_TRUE:
            overrides[a] = True
        elif a in DEPRECATED or a in REMOVED:  # entrypoint checks the bare word alone and keeps nothing of it
            notes.append(f"'{a}' alone is deprecated and sets nothing; ignored")
        elif a in defaults:
            raise WordError(f"'{a}' is a valid YOLO argument but is missing an '=' sign to set its value, "
                            f"i.e. try '{a}={defaults[a]}'")
        else:
            raise WordError(f"'{a}' is not a valid YOLO argument (key=value, e.g. lr0=0.01)")
    overrides, more = handle_deprecation(overrides)
    return overrides, notes + more


def word(key: str, value: Any) -> str:
    """``key=value`` that :func:`parse_key_value_pair` reads back as ``(key, value)``."""
    if isinstance(value, str) and ((key in VERBATIM_KEYS and value.lower() != "none" and value.strip() == value != "")
                                   or _reads_back(value)):
        return f"{key}={value}"
    return f"{key}={value!r}"


def _reads_back(text: str) -> bool:
    return text != "" and text.strip() == text and not text.startswith("=") and type(smart_value(text)) is str \
        and smart_value(text) == text
