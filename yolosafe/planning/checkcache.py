"""The input check's verdicts, kept so that a repeated ``train``, ``--dry-run`` or ``plan`` of unchanged inputs does not
start torch again (``$YOLOSAFE_CACHE/checks/``, by default ``~/.cache/yolosafe/checks/``).

An entry is Ultralytics' acceptance of one request, found by a key over everything the answer depends on that is
known before asking: the request itself (model, data, arguments, a relative runs' folder), where each of its paths
points from the working directory, the installed Ultralytics and torch versions, the code of the check, the
environment variables Ultralytics reads. The entry also lists what the check read (Ultralytics' settings file,
the model file, the data YAML, every image list and every image and label folder): each is stat'ed again at every
lookup, and any change of size or modification time, or a file appearing or vanishing, is a miss. Only acceptances
are kept (a refusal is asked again: the user is mending something), never an answer that carries notes, and never a
request that downloads. An entry holds the child's own record (:class:`~yolosafe.rundir.childrecords.CheckAnswer`)
and the stamps of what it read; a file that is not valid JSON, not an entry of this format or not for this key is
ignored and asked again, never trusted.

Limits, said in ``docs/overhead.md``: a label file edited in place (same folder, same directory listing) keeps the
entry; the dataset's figures it holds are then the memory model's estimate of the previous labels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from yolosafe.planning import datasets
from yolosafe.rundir import files
from yolosafe.rundir.childrecords import CheckAnswer, CheckRequest, CheckResult
from yolosafe.rundir.typed import RecordError

FOLDER = "checks"
FORMAT = 3  # 2: the answer as its record, the stamps beside it; 3: it holds the run's name as Ultralytics makes it
# What Ultralytics reads from the environment that can change its answer (where its settings and datasets are).
ENV_KEYS = ("YOLO_CONFIG_DIR", "XDG_CONFIG_HOME", "HOME", "YOLO_OFFLINE", "YOLO_VERBOSE")
# The code whose answer is kept: the check and the dataset figures it computes.
CODE = ("training/inputcheck.py", "rundir/childrecords.py", "planning/memory/objects.py",
        "planning/memory/valshapes.py")
PATH_FIELDS = ("model", "data")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _code_digest() -> str:
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for part in CODE:
        try:
            digest.update((root / part).read_bytes())
        except OSError:
            digest.update(b"?")
    return digest.hexdigest()


def _absolute(project: Any) -> bool:
    return isinstance(project, str) and bool(project) and Path(project).is_absolute()


def _where(value: Any) -> str | None:
    """A request's path as the working directory resolves it: the absolute path when it is there, else ``None``
    (Ultralytics then looks elsewhere: its package, its datasets dir, and the entry's reads pin what it found)."""
    if not isinstance(value, str) or not value:
        return None
    path = Path(value)
    try:
        return str(path.resolve()) if path.exists() else None
    except (OSError, RuntimeError):
        return None


def key(request: CheckRequest) -> str:
    """The entry's name for a request: everything its answer depends on that is known before asking."""
    # An absolute project= never changes the answer (the answer is that folder: ``project_is_asked``); a relative one
    # does (Ultralytics puts it under runs/<task>), and so does the run's name (Ultralytics' own for it: name=model
    # is the model's stem).
    asked = {k: v for k, v in request.to_dict().items() if k not in ("download", "dry_run")}
    if _absolute(request.project):
        asked["project"] = "<absolute>"
    material = {
        "format": FORMAT,
        "request": asked,
        "resolved": {field: _where(getattr(request, field)) for field in PATH_FIELDS},
        "versions": {name: _version(name) for name in ("ultralytics", "torch", "yolosafe")},
        "code": _code_digest(),
        "env": {name: os.environ.get(name) for name in ENV_KEYS},
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def stamp(path: Path | str) -> list[int] | None:
    """What says a file or folder changed: its size and modification time in nanoseconds (``None``: not there)."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return [info.st_size, info.st_mtime_ns]


def stamps(paths: Iterable[str]) -> dict[str, list[int] | None]:
    return {str(p): stamp(p) for p in sorted(set(paths))}


def _entry_path(name: str) -> Path:
    return datasets.cache_dir() / FOLDER / f"{name}.json"


def cacheable(request: CheckRequest) -> bool:
    return not request.download


def lookup(request: CheckRequest) -> CheckAnswer | None:
    """The kept answer to ``request`` when every file it read is as it was, else ``None``."""
    if not cacheable(request):
        return None
    name = key(request)
    try:
        entry = json.loads(_entry_path(name).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    result = _valid(entry, name)
    if result is None or stamps(result.reads) != entry["stamps"]:
        return None
    if _absolute(request.project):  # the folder asked for is the answer
        if not result.project_is_asked:
            return None
        return dataclasses.replace(result, project=str(Path(str(request.project)).resolve()))
    if result.project_in_cwd:  # Ultralytics resolves a relative runs' folder from the working directory
        return dataclasses.replace(result, project=str(Path(result.project_in_cwd).resolve()))
    return result


def _valid(entry: Any, name: str) -> CheckAnswer | None:
    """The entry's answer, when it is an entry of this format for this key, its stamps of the files it read."""
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("key") != name:
        return None
    try:
        result = CheckAnswer.from_dict(entry.get("result"), "a kept verdict")
    except RecordError:
        return None
    kept = entry.get("stamps")
    if not isinstance(kept, dict) or sorted(kept) != sorted(set(result.reads)):
        return None
    shaped = all(s is None or (isinstance(s, list) and len(s) == 2) for s in kept.values())
    return result if shaped else None


def store(request: CheckRequest, result: CheckResult) -> None:
    """Keep an acceptance without notes, with the stamps of what the check read (``result.reads``)."""
    if not isinstance(result, CheckAnswer) or result.notes:
        return
    name = key(request)
    entry = {"format": FORMAT, "key": name, "result": result.to_dict(), "stamps": stamps(result.reads)}
    try:
        _entry_path(name).parent.mkdir(parents=True, exist_ok=True)
        files.write_json(_entry_path(name), entry)
    except OSError:
        pass  # a cache that cannot be written costs the next check its seconds, nothing else
