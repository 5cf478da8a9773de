"""Everything a user can get wrong, checked before a run directory or a worker exists.

Each check raises :class:`InputError` with one line for the user. Nothing here imports torch or ultralytics: a
mistyped option must be refused in a fraction of a second, and importing ``ultralytics.cfg`` (to call its own
``check_cfg``) costs about two seconds because it imports torch. So Ultralytics' own type rules are read from its
source instead: the ``CFG_*_KEYS`` sets and ``CFG_INT_MIN`` of ``ultralytics/cfg/__init__.py`` (literal values,
parsed with ``ast``) and the defaults of ``cfg/default.yaml``, applied as ``check_cfg(hard=True)`` applies them,
except that an integer stays an integer (``epochs: 1.5`` and ``epochs: 2.0`` are refused, not truncated).

A ``.pt`` file is checked without torch too: PyTorch checkpoints are zip archives whose pickle names the classes
it holds; an Ultralytics checkpoint names ``ultralytics`` modules. A truncated or foreign file fails here.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from yolosafe import oom
from yolosafe.errors import UsageError

# Ultralytics release weights (yolov8n.pt, yolo11s-seg.pt, rtdetr-l.pt...): a bare name Ultralytics fetches when the
# user names it; any other .pt must be a file here.
RELEASE_WEIGHTS = re.compile(r"^(yolo|yoloe|rtdetr|sam|mobile_sam|FastSAM)[\w.-]*\.pt$")
# yolosafe's own options, integers and numbers (from a --config file they arrive untyped).
INT_OPTIONS = MappingProxyType({"batch": 1, "effective_batch": 1, "val_batch": 1, "imgsz": 32, "epochs": 1,
                               "max_retries": 0, "min_batch": 1})
STR_OPTIONS = ("model", "data", "project", "name", "alloc_conf", "gpus")


class InputError(UsageError):
    """Bad input; ``str()`` is the one line the user sees."""


def _ultralytics_root() -> Path:
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("ultralytics is not installed: pip install -c constraints.txt -e .")
    return Path(next(iter(spec.submodule_search_locations)))


# --- yolosafe's own options -----------------------------------------------------------------------------------------


def check_options(options: Mapping[str, Any]) -> None:
    """Types and ranges of yolosafe's options, whether they came from flags or a ``--config`` file."""
    for key, minimum in INT_OPTIONS.items():
        value = options.get(key)
        if value is None or (key == "batch" and value == "auto"):  # --batch auto: planner.resolve_auto decides
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{flag} {value!r}: must be a whole number")
        if value < minimum:
            raise InputError(f"{flag} {value}: must be at least {minimum}")
    for key in STR_OPTIONS:
        value = options.get(key)
        if value is not None and not isinstance(value, str):
            raise InputError(f"--{key.replace('_', '-')} {value!r}: must be text")
    if not isinstance(options.get("clear_before_val", True), bool):
        raise InputError(f"clear_before_val {options['clear_before_val']!r}: must be true or false")
    check_run_location(str(options["project"]), str(options["name"]))


def check_run_location(project: str, name: str) -> None:
    """``--name`` is one folder inside ``--project``, and ``--project`` is a folder (or not there yet)."""
    if not name or name in {".", ".."} or "/" in name or (os.sep != "/" and os.sep in name):
        raise InputError(f"--name {name!r}: give a single folder name (no '/'); use --project for the parent folder")
    path = Path(project)
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            raise InputError(f"--project {project}: {parent} is a file, not a folder")


def check_injection(environ: Mapping[str, str]) -> None:
    """``YOLOSAFE_INJECT_OOM`` is read by the trainer in every rank: a typo there would be a silent no-op."""
    try:
        oom.parse_injection(environ.get(oom.INJECT_ENV))
    except oom.InjectionError as exc:
        raise InputError(str(exc)) from None


# --- the model ------------------------------------------------------------------------------------------------------


def check_model(model: str) -> None:
    """A model YAML (a file, or one Ultralytics ships), or a ``.pt`` (a checkpoint file, or a release name)."""
    path = Path(model)
    if path.suffix in {".yaml", ".yml"}:
        if path.is_file():
            return _check_model_yaml(path)
        if os.sep in model or not _ships_model(path.name):
            raise InputError(f"--model {model}: no such file, and not a model Ultralytics knows "
                             "(e.g. yolov8n.yaml, yolo11s.yaml)")
        return None
    if path.suffix == ".pt":
        if path.is_file():
            return check_checkpoint(path, f"--model {model}")
        if os.sep in model or not RELEASE_WEIGHTS.match(path.name):
            raise InputError(f"--model {model}: no such file")
        return None  # a release name the user gave: Ultralytics fetches it (docs: offline)
    raise InputError(f"--model {model}: expected a model YAML (yolov8n.yaml) or a checkpoint (.pt)")


def _ships_model(name: str) -> bool:
    """Whether Ultralytics builds this YAML: ``yolov8n.yaml`` is ``yolov8.yaml`` at scale n (its own rule)."""
    unified = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", name)
    models = _ultralytics_root() / "cfg" / "models"
    return any(True for wanted in {name, unified} for _ in models.rglob(wanted))


def _check_model_yaml(path: Path) -> None:
    data = _read_yaml(path, f"--model {path}")
    if not isinstance(data, dict) or "backbone" not in data or "head" not in data:
        raise InputError(f"--model {path}: not a model YAML (needs 'backbone:' and 'head:')")


def check_checkpoint(path: Path, what: str) -> None:
    """A PyTorch zip checkpoint whose pickle refers to Ultralytics' classes (read without torch)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            text = archive.read(pickles[0]) if pickles else b""
    except (zipfile.BadZipFile, OSError, KeyError, zipfile.LargeZipFile) as exc:
        raise InputError(f"{what}: not a readable PyTorch checkpoint ({exc or type(exc).__name__})") from None
    if not pickles:
        raise InputError(f"{what}: not a PyTorch checkpoint (no data.pkl inside)")
    if b"ultralytics" not in text:
        raise InputError(f"{what}: a PyTorch file, but not an Ultralytics checkpoint")


# --- the data -------------------------------------------------------------------------------------------------------


def check_data(data_yaml: str) -> None:
    """A data YAML file: a mapping with ``train`` and ``val`` that exist and ``names`` or ``nc``.

    A YAML Ultralytics ships (``coco8.yaml``) is not a file here: the user named it, Ultralytics finds it in its
    datasets folder or downloads it; so is one of the user's own files with a ``download:`` key whose images are not
    there yet. Nothing else is downloaded.
    """
    path = Path(data_yaml)
    if not path.is_file():
        return  # a name Ultralytics ships (datasets.resolve found it)
    data = _read_yaml(path, f"--data {path}")
    if not isinstance(data, dict):
        raise InputError(f"--data {path}: expected a mapping with train:, val: and names: (Ultralytics data YAML)")
    missing = [k for k in ("train", "val") if not data.get(k)]
    if missing:
        raise InputError(f"--data {path}: no {' or '.join(missing)}: key (Ultralytics needs train:, val:, names:)")
    if data.get("names") is None and data.get("nc") is None:
        raise InputError(f"--data {path}: no names: (or nc:) key, so the classes are unknown")
    nc = data.get("nc")
    if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int) or nc < 1):
        raise InputError(f"--data {path}: nc: {nc!r} must be a whole number of classes")
    if data.get("download"):
        return
    root = _data_root(path, data.get("path"))
    for key in ("train", "val"):
        for entry in data[key] if isinstance(data[key], list) else [data[key]]:
            if not (root / str(entry)).exists():
                raise InputError(f"--data {path}: {key}: {entry} not found (looked in {root / str(entry)})")


def _data_root(yaml_path: Path, path: Any) -> Path:
    """Ultralytics' rule: ``path:`` as given (relative to here), else its datasets folder; no ``path:``, the YAML's
    folder."""
    if not path:
        return yaml_path.parent
    given = Path(str(path))
    if given.exists() or given.is_absolute():
        return given
    return _datasets_dir() / given


def _datasets_dir() -> Path:
    """Ultralytics' ``datasets_dir`` setting, read from its settings file (its default when there is none)."""
    config = Path(os.environ.get("YOLO_CONFIG_DIR") or Path.home() / ".config" / "Ultralytics")
    try:
        return Path(json.loads((config / "settings.json").read_text())["datasets_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return Path("datasets").resolve()


def _read_yaml(path: Path, what: str) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InputError(f"{what}: {exc.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"{what}: not valid YAML ({' '.join(str(exc).split())[:160]})") from None


# --- Ultralytics' own arguments -------------------------------------------------------------------------------------


@functools.cache
def ultralytics_rules() -> dict[str, Any]:
    """The literal ``CFG_*`` key sets and minima of Ultralytics' config checker, and its defaults."""
    root = _ultralytics_root() / "cfg"
    rules: dict[str, Any] = {}
    for node in ast.parse((root / "__init__.py").read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, value = node.targets[0].id, node.value
            if not name.startswith("CFG_"):
                continue
            if isinstance(value, ast.Call) and value.args:  # frozenset({...})
                value = value.args[0]
            try:
                rules[name] = ast.literal_eval(value)
            except ValueError:
                continue
    rules["DEFAULTS"] = yaml.safe_load((root / "default.yaml").read_text())
    return rules


def check_ultralytics_args(args: Mapping[str, Any]) -> None:
    """Each ``key=value`` against the type rules of Ultralytics' ``check_cfg(hard=True)``."""
    rules = ultralytics_rules()
    number = (int, float)
    for key, value in args.items():
        if value is None:
            if rules["DEFAULTS"].get(key) is not None and any(key in rules.get(k, ()) for k in _TYPED):
                raise InputError(f"{key}=None: Ultralytics needs a value for '{key}'")
            continue
        if key in rules.get("CFG_FLOAT_KEYS", ()) and (isinstance(value, bool) or not isinstance(value, number)):
            raise InputError(f"{key}={value}: Ultralytics needs a number (e.g. {key}={_default(key)})")
        if key in rules.get("CFG_FRACTION_KEYS", ()):
            _check_fraction(key, value)
        if key in rules.get("CFG_INT_KEYS", ()):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"{key}={value}: Ultralytics needs a whole number (e.g. {key}={_default(key)})")
            minimum = rules.get("CFG_INT_MIN", {}).get(key)
            if minimum is not None and value < minimum:
                raise InputError(f"{key}={value}: Ultralytics needs {key} >= {minimum}")
        if key in rules.get("CFG_BOOL_KEYS", ()) and not isinstance(value, bool):
            raise InputError(f"{key}={value}: Ultralytics needs True or False")
        if key in rules.get("CFG_STR_KEYS", ()) and not isinstance(value, str):
            raise InputError(f"{key}={value}: Ultralytics needs text")


def _default(key: str) -> Any:
    return ultralytics_rules()["DEFAULTS"].get(key, 0.5)


_TYPED = ("CFG_FLOAT_KEYS", "CFG_FRACTION_KEYS", "CFG_INT_KEYS", "CFG_BOOL_KEYS", "CFG_STR_KEYS")


def _check_fraction(key: str, value: Any) -> None:
    if key == "fraction" and (isinstance(value, list) or (isinstance(value, int) and value > 1)):
        return  # counts and [train, val] splits: Ultralytics checks those itself
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{key}={value}: Ultralytics needs a number between 0 and 1 (e.g. {key}={_default(key)})")
    if not 0.0 <= value <= 1.0:
        raise InputError(f"{key}={value}: Ultralytics needs a value between 0.0 and 1.0")
