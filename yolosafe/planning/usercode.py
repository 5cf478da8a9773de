"""The user's own code for every rank: Ultralytics callbacks (``model.add_callback``) and a custom trainer class.

``yolosafe.train(callbacks={"on_fit_epoch_end": fn}, trainer=MyTrainer)`` and the command line's
``callbacks=module:function`` / ``trainer=module:Class`` become references the run spec carries (JSON): an object
importable by name (``module:qualname``) travels by name; one defined in a notebook cell or a script's ``__main__``
travels by value, pickled with cloudpickle into the spec in the run directory. Every rank loads them
(:func:`load`) and registers the callbacks on its model and builds yolosafe's trainer on top of the user's class.

Names are never imported here: the supervisor never imports torch, and the user's module may import Ultralytics.
"""

from __future__ import annotations

import base64
import importlib
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from yolosafe.errors import UsageError

Ref = dict[str, str]  # {"name": "module:qualname"[, "path": the folder it was imported from]} or {"pickle": ...}


def refs(callbacks: Any = None, trainer: Any = None) -> dict[str, Any] | None:
    """The JSON references of ``callbacks`` (``{event: fn or [fn, ...]}``, ``"module:function"`` words or a list of
    them) and ``trainer`` (a class or ``"module:Class"``); None when neither is given. A callback that cannot be sent
    to the ranks is one :class:`UsageError` line."""
    if callbacks is None and trainer is None:
        return None
    listed: list[list[Any]] = []
    if isinstance(callbacks, Mapping):
        for event, fns in callbacks.items():
            for fn in (fns if isinstance(fns, (list, tuple)) else [fns]):
                listed.append([_event(str(event)), ref_of(fn, f"callback {event}")])
    elif callbacks is not None:
        for word in (callbacks.split(",") if isinstance(callbacks, str) else callbacks):
            if not isinstance(word, str):
                raise UsageError(f"callbacks={callbacks!r}: give {{event: function}} or 'module:function' words")
            event, name = _event_and_name(word.strip())
            listed.append([event, {"name": name}])
    return {"callbacks": listed, "trainer": None if trainer is None else ref_of(trainer, "trainer")}


def _event(event: str) -> str:
    if not event.startswith("on_"):
        raise UsageError(f"callbacks: {event!r} is not an Ultralytics callback event (on_train_start, "
                         "on_fit_epoch_end, ...)")
    return event


def _event_and_name(word: str) -> tuple[str, str]:
    """``module:on_fit_epoch_end`` (the function's name is its event) or ``on_fit_epoch_end:module:function``."""
    parts = word.split(":")
    if len(parts) == 3:
        return _event(parts[0]), f"{parts[1]}:{parts[2]}"
    if len(parts) == 2 and all(parts):
        return _event(parts[1].rpartition(".")[2]), word
    raise UsageError(f"callbacks={word!r}: give module:function (its name the event, e.g. on_fit_epoch_end) or "
                     "event:module:function")


def ref_of(obj: Any, what: str) -> Ref:
    """``obj`` by name where its module (already imported) holds it under its name, else by value."""
    if isinstance(obj, str):
        module, sep, qualname = obj.partition(":")
        if not (sep and module and qualname):
            raise UsageError(f"{what} {obj!r}: give module:name")
        return {"name": obj}
    if not callable(obj):
        raise UsageError(f"{what} {obj!r}: not a function or class")
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if module and module != "__main__" and "<" not in qualname and _lookup(sys.modules.get(module), qualname) is obj:
        found = _imported_from(module)
        return {"name": f"{module}:{qualname}", **({"path": found} if found else {})}
    try:
        import cloudpickle

        data = cloudpickle.dumps(obj)
    except Exception as exc:  # pickling runs the user's objects' own code: any error is theirs
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"{what} {qualname or obj!r}: cannot be sent to the ranks ({type(exc).__name__}: {first}); "
                         "define it in an importable module") from None
    return {"pickle": base64.b64encode(data).decode("ascii")}


def _imported_from(module: str) -> str | None:
    """The folder on this process's ``sys.path`` that ``module``'s top package was imported from: a rank is a fresh
    interpreter whose path may lack it (a notebook's ``sys.path.append``, a test runner's root, a script's folder)."""
    top = sys.modules.get(module.partition(".")[0])
    where = getattr(top, "__file__", None)
    if where:
        folder = Path(where).parent
        return str(folder.parent if folder.name == module.partition(".")[0] else folder)
    paths = list(getattr(top, "__path__", []) or [])  # a namespace package
    return str(Path(paths[0]).parent) if paths else None


def _lookup(module: Any, qualname: str) -> Any:
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


def load(ref: Ref) -> Any:
    """The object a reference names (imported) or holds (unpickled): in a rank, never in the supervisor."""
    if "name" in ref:
        module, _, qualname = ref["name"].partition(":")
        if ref.get("path") and ref["path"] not in sys.path:
            sys.path.append(ref["path"])  # after everything else: where the user's process found it, never ahead
        obj = _lookup(importlib.import_module(module), qualname)
        if obj is None:
            raise UsageError(f"{ref['name']}: {module} has no {qualname}")
        return obj
    import cloudpickle

    return cloudpickle.loads(base64.b64decode(ref["pickle"]))


def callbacks_of(user: Mapping[str, Any] | None) -> list[tuple[str, Callable[..., Any]]]:
    return [(event, load(ref)) for event, ref in (user or {}).get("callbacks", [])]


def trainer_of(user: Mapping[str, Any] | None) -> type | None:
    ref = (user or {}).get("trainer")
    return None if ref is None else load(ref)
