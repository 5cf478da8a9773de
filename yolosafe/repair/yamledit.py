"""Editing a user's YAML file without disturbing it: every byte outside the values changed stays as it was.

ruamel.yaml's round-trip parser finds each value (its line and column in the file) and checks the result; the new
value is written in place of the old one's characters, so comments, key order, flow or block style, quoting
elsewhere, document markers (``---``/``...``), a value on the line after its key, and CRLF line endings all survive.
A key that is missing is added at the end of the top-level mapping in the file's own style. Files are backed up
before they change and replaced atomically (a temporary file in the same folder, then a rename).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from yolosafe.errors import YolosafeError

EOL_CRLF = "\r\n"
_PLAIN = re.compile(r"""("(?:[^"\\]|\\.)*"|'(?:[^']|'')*'|[^\s,\]}#]+)""")
_END_MARKER = re.compile(r"^\.\.\.[ \t]*$", re.MULTILINE)


class EditError(YolosafeError, ValueError):
    """The file cannot be edited safely; ``str()`` is one line."""


def _yaml() -> Any:
    from ruamel.yaml import YAML

    return YAML(typ="rt")


def load(text: str, name: str) -> Any:
    """The round-trip document (a mapping), or EditError."""
    from ruamel.yaml.error import YAMLError

    try:
        data = _yaml().load(io.StringIO(text))
    except YAMLError as exc:
        raise EditError(f"{name}: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    if not hasattr(data, "lc") or not isinstance(data, dict):
        raise EditError(f"{name}: expected a mapping of option names to values")
    return data


def canonical(key: Any) -> str:
    return str(key).replace("-", "_")


def find_key(data: dict[str, Any], name: str) -> Any:
    """The key as the file spells it (``val-batch`` or ``val_batch``), or None."""
    return next((k for k in data if canonical(k) == name), None)


def _offset(text: str, line: int, col: int) -> int:
    starts = [0] + [m.end() for m in re.finditer("\n", text)]
    return starts[line] + col


def _replace_value(text: str, data: Any, key: Any, value: int, name: str) -> tuple[int, int, str]:
    """(start, end, new text) of the value of ``key``, after checking the characters there are that value."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    line, col = data.lc.value(key)
    start, match = 0, None
    try:
        start = _offset(text, line, col)
        match = _PLAIN.match(text, start)
        found = match is not None and YAML(typ="safe").load(match.group(0)) == data[key]
    except (IndexError, YAMLError):
        found = False
    if not found or match is None:
        raise EditError(f"{name}: cannot locate the value of {key!r} (line {line + 1}); edit it by hand")
    return start, match.end(), str(value)


def _spelling(data: dict[str, Any], name: str) -> str:
    return name.replace("_", "-") if any("-" in str(k) for k in data) else name


def _append(text: str, data: Any, additions: list[tuple[str, int]]) -> str:
    """Add keys at the end of the top-level mapping, in its style (flow ``{...}`` or block lines)."""
    if not additions:
        return text
    if data.fa.flow_style():
        end = text.rfind("}")
        items = "".join(f", {key}: {value}" for key, value in additions)
        return text[:end] + items + text[end:]
    eol = EOL_CRLF if EOL_CRLF in text else "\n"
    indent = " " * data.lc.col if data else ""
    lines = "".join(f"{indent}{key}: {value}{eol}" for key, value in additions)
    marker = _END_MARKER.search(text)
    at = marker.start() if marker else len(text)
    head = text[:at]
    if head and not head.endswith("\n"):
        head += eol
    return head + lines + text[at:]


def set_values(text: str, changes: dict[str, int], name: str) -> str:
    """``text`` with each key of ``changes`` (canonical spelling) set to its value; checked by parsing it again."""
    data = load(text, name)
    spans, additions = [], []
    for key_name, value in changes.items():
        key = find_key(data, key_name)
        if key is None:
            additions.append((_spelling(data, key_name), value))
        else:
            spans.append(_replace_value(text, data, key, value, name))
    for start, end, new in sorted(spans, reverse=True):
        text = text[:start] + new + text[end:]
    text = _append(text, data, additions)
    _check(text, data, changes, name)
    return text


def _plain(data: Any) -> dict[str, Any]:
    import json

    return {canonical(k): json.loads(json.dumps(v, default=str)) for k, v in data.items()}


def _check(text: str, before: Any, changes: dict[str, int], name: str) -> None:
    after = _plain(load(text, name))
    expected = _plain(before) | changes
    if after != expected:
        raise EditError(f"{name}: the edit would change more than {', '.join(changes)}; not written")


def backup(path: Path) -> Path:
    """``FILE.bak.YYYYmmdd-HHMMSS`` (``-2``, ``-3``... if taken), a copy with the file's mode and times."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.bak.{stamp}")
    n = 2
    while target.exists():
        target = path.with_name(f"{path.name}.bak.{stamp}-{n}")
        n += 1
    shutil.copy2(path, target)
    return target


def replace_atomically(path: Path, data: bytes, check: Callable[[Path], None] | None = None) -> None:
    """Write a temporary file beside ``path`` with its mode, ``check`` it (it raises to stop), rename it over
    ``path``. The temporary file never outlives the call. A symlink is followed: the file it points to is replaced,
    the link stays (a dotfile manager's ``~/.bashrc -> dotfiles/bashrc``)."""
    path = Path(os.path.realpath(path))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        if path.exists():
            shutil.copymode(path, tmp)
        if check is not None:
            check(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_only(path: Path) -> bool:
    """No write permission bit set (checked by mode, so it holds for root too: a read-only file stays so)."""
    return not path.stat().st_mode & 0o222
