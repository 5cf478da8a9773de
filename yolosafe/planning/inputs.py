"""The shape of what yolosafe reads before a run directory exists, each refused in one line: files decoded as
UTF-8 (``--config``, the dataset registry), the runs' folder where Ultralytics puts it (symlink loops, writability),
and a ``YOLOSAFE_INJECT_OOM`` that can never fire in the plan (the run's name and the path's size and encoding: the
options' own parsing, :func:`yolosafe.planning.trainoptions.check_run_names`).

Dataset contents (the data YAML's keys and its images) are checked where datasets are read
(:mod:`yolosafe.planning.datasets`, :mod:`yolosafe.planning.validate`).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import yaml

from yolosafe import oom
from yolosafe.errors import UsageError
from yolosafe.planning import bounded
from yolosafe.planning.validate import InputError

KERNEL_FILE_SYSTEMS = ("/proc", "/sys")
NAME_MAX = 255  # bytes of one path component (Linux's NAME_MAX)
PATH_MAX = 4000  # bytes of a whole path, under Linux's PATH_MAX with room for the run's own files
LINE_MAX = 500  # characters of one line for the user: a 20 MB value is named by its start and its size


def shorten(line: str, limit: int = LINE_MAX) -> str:
    """``line`` cut to a readable length: its start and end, and how much was left out."""
    if len(line) <= limit:
        return line
    keep = limit - 60
    return f"{line[:keep - 80]} ...[{len(line) - keep} characters left out]... {line[-80:]}"


def utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        raise InputError(f"{what} {shown!r}: not valid UTF-8; use a name of plain characters") from None


def text_file(path: str | Path, what: str) -> str:
    """The file's text; one line when it cannot be read, is not a regular file of a bounded size
    (:mod:`yolosafe.planning.bounded`: a FIFO, ``/dev/zero``) or is not UTF-8."""
    data = bounded.read_bytes(path, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {path}: not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
                         "save it as UTF-8") from None


def yaml_mapping(path: str | Path, what: str, holds: str) -> dict[str, Any]:
    """A YAML file of the user's that holds a mapping (``--config``, ``cfg=``): UTF-8, valid YAML within the bounds
    of :func:`yolosafe.planning.bounded.load_yaml`, a mapping of ``holds`` (or empty); one line naming ``what``
    otherwise."""
    utf8(str(path), what)
    shown = f"{what}{path}" if what.endswith("=") else f"{what} {path}"
    try:
        text = text_file(path, what)
        data = bounded.load_yaml(text)
    except yaml.YAMLError as exc:
        raise InputError(f"{shown}: not valid YAML ({' '.join(str(exc).split())[:300]})") from None
    except UsageError as exc:
        raise InputError(str(exc).replace(f"{what} {path}", shown, 1)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{shown}: expected a mapping of {holds}, found a {type(data).__name__}")
    return data


def check_registry(path: Path | None) -> None:
    """The dataset registry (``--datasets``, ``$YOLOSAFE_DATASETS``, ``./datasets.yaml``): UTF-8 text."""
    if path is not None and Path(path).is_file():
        text_file(path, "--datasets")


def _no_loop(path: Path, what: str) -> None:
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{what} {path}: a symbolic link loop") from None
        if exc.errno == errno.ENAMETOOLONG:
            raise InputError(f"{what} {path}: the path is too long") from None


def _nearest_existing(path: Path) -> Path:
    current = path.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def writable_dir(path: Path, what: str, instead: str = "choose another --project") -> None:
    """``path`` can be created or written: its nearest existing folder is writable, on a file system mounted
    read-write (root ignores permission bits, not a read-only mount)."""
    here = _nearest_existing(path)
    if not here.is_dir():
        return  # "is a file": said by the name checks
    real = os.path.realpath(here)
    if any(real == top or real.startswith(f"{top}/") for top in KERNEL_FILE_SYSTEMS):
        raise InputError(f"{what} {path}: {here} is the kernel's own file system, not a place for files; {instead}")
    read_only_mount = bool(os.statvfs(here).f_flag & os.ST_RDONLY)
    if read_only_mount or not os.access(here, os.W_OK | os.X_OK):
        why = "on a read-only file system" if read_only_mount else "not writable"
        raise InputError(f"{what} {path}: {here} is {why}; {instead}")


def check_asked_project(project: str | None) -> None:
    """An absolute ``--project`` as asked: no symbolic link loop, before anything resolves it (a relative one: see
    :func:`check_run_place`)."""
    if project is not None and Path(project).is_absolute():
        _no_loop(Path(project), "--project")


def check_run_place(project: str, name: str, asked: str | None = None) -> None:
    """The runs' folder where Ultralytics puts it (``project``: ``get_save_dir``'s answer in the input check; a
    relative ``--project`` lands under ``runs/<task>``), named as the user gave it (``asked``): each folder on the way
    a folder (or not there yet), no symlink loop, a place this process can write."""
    moved = bool(asked) and os.path.abspath(str(asked)) != os.path.abspath(project)
    what = f"--project {asked}, which Ultralytics puts at" if moved else "--project"
    path = Path(project)
    _no_loop(path, what)
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            raise InputError(f"{what} {project}: {parent} is a file, not a folder")
    writable_dir(path / name, what)


def check_injection_reachable(text: str | None, epochs: int) -> None:
    """A fault injection that can never fire in a run of ``epochs`` epochs: its epoch past the run, or the final
    validation named at an epoch that is not the last."""
    injection = oom.parse_injection(text)  # an InjectionError: a usage error of its own
    if injection is None or injection.epoch is None:
        return
    if injection.epoch >= epochs:
        raise InputError(f"{oom.INJECT_ENV}: epoch={injection.epoch} never comes: this run has epochs 0-{epochs - 1} "
                         "(0-based)")
    if injection.phase == "final" and injection.epoch != epochs - 1:
        raise InputError(f"{oom.INJECT_ENV}: phase=final runs after the last epoch: give epoch={epochs - 1} "
                         f"(epoch={injection.epoch}, the default when left out, never fires in {epochs} epochs)")

