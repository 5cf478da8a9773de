"""Everything a user can get wrong, checked before a run directory or a worker exists.

Each check raises :class:`InputError` with one line for the user. What Ultralytics accepts, Ultralytics decides:
:func:`ultralytics_check` asks it about the model, the arguments, the dataset and the run's folder through the
function its caller hands it (a short-lived child, :func:`yolosafe.supervisor.children.input_check`: torch and
Ultralytics stay out of this process, and planning starts no process). What is checked here is only what Ultralytics
leaves to yolosafe and its options' parsing (:class:`yolosafe.planning.trainoptions.TrainOptions`) cannot see: the
fault injection and a checkpoint to be loaded (read without torch: PyTorch checkpoints are zip archives whose pickle
names the classes it holds; an Ultralytics checkpoint names ``ultralytics`` modules).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from yolosafe import hang, oom
from yolosafe.errors import UsageError
from yolosafe.planning import checkcache, checkpoint, trainplan
from yolosafe.rundir.childrecords import CheckAnswer, CheckRefusal, CheckRequest, CheckResult

ULTRALYTICS_PROJECT = "runs/<task>"  # --project not given: the folder Ultralytics' get_save_dir gives the task


class InputError(UsageError):
    """Bad input; ``str()`` is the one line the user sees."""


def check_injection(environ: Mapping[str, str]) -> None:
    """``YOLOSAFE_INJECT_OOM`` and ``YOLOSAFE_INJECT_HANG`` are read by the trainer in every rank: a typo there would
    be a silent no-op."""
    oom.parse_injection(environ.get(oom.INJECT_ENV))  # an InjectionError: a usage error of its own
    hang.parse_injections(environ.get(hang.INJECT_ENV))


# --- checkpoints --------------------------------------------------------------------------------------------------


def check_checkpoint(path: Path, what: str) -> None:
    """A PyTorch zip checkpoint whose pickle names Ultralytics' model classes and nothing a load would run as code
    (its opcodes read, never executed: :func:`yolosafe.planning.checkpoint.pickled_globals`)."""
    try:
        text = checkpoint.pickle_of(path)
    except checkpoint.UNREADABLE as exc:
        raise InputError(f"{what}: not a readable PyTorch checkpoint ({exc or type(exc).__name__})") from None
    if text is None:
        raise InputError(f"{what}: not a PyTorch checkpoint (no data.pkl inside)")
    names = checkpoint.pickled_globals(path)
    if names is None:
        raise InputError(f"{what}: not a readable PyTorch checkpoint (its pickle does not parse)")
    unsafe = checkpoint.unsafe_globals(names)
    if unsafe:
        raise InputError(f"{what}: its pickle would run {unsafe[0].replace(' ', '.')} when loaded, which no "
                         "Ultralytics checkpoint does: not loaded")
    if not any(n.startswith("ultralytics.") for n in names):
        held = next((n.replace(" ", ".") for n in names if n.startswith("torch.nn.")), None)
        raise InputError(f"{what}: a PyTorch file, but not an Ultralytics checkpoint"
                         + (f" (it holds a {held})" if held else ""))


def check_model_file(model: Any) -> None:
    """``--model x.pt`` that is a file here: vetted before Ultralytics' own load (which runs any code its pickle
    names) in the input check."""
    path = Path(str(model))
    if path.suffix == ".pt" and path.is_file():
        check_checkpoint(path, f"--model {model}")


# --- what Ultralytics decides --------------------------------------------------------------------------------------


AskCheck = Callable[[CheckRequest], CheckResult]  # the input check: supervisor.children.input_check


def ultralytics_request(opts: Any, dry_run: bool) -> CheckRequest:
    """What the input check asks Ultralytics of the options (a ``TrainOptions``): the model, the data, the train
    arguments as the worker passes them."""
    extra = trainplan.check_passthrough(trainplan.parse_passthrough(opts.args or []))  # a PlanError: a usage error
    batch = opts.batch
    overrides = {**extra, "epochs": opts.epochs, "imgsz": opts.imgsz,
                 "batch": batch if isinstance(batch, int) else 16, "nbs": opts.effective_batch}
    project = opts.project
    return CheckRequest(model=opts.model, data=opts.data_yaml, task=opts.task,
                        overrides={k: v for k, v in overrides.items() if v is not None},
                        project=None if project == ULTRALYTICS_PROJECT else project, name=opts.name,
                        download=opts.download and not dry_run, dry_run=dry_run,  # a dry run fetches nothing
                        user_code=getattr(opts, "user_code", None) or None)


def ultralytics_check(opts: Any, dry_run: bool, ask: AskCheck) -> CheckAnswer:
    """Whether Ultralytics trains this, asked through ``ask`` (the input check's child); returns the task, the runs'
    folder (``project``) and the training images, or raises :class:`InputError` with Ultralytics' reason. With
    ``download`` set, the data and the weights are fetched there, once, before any rank starts."""
    request = ultralytics_request(opts, dry_run)
    check_model_file(request.model)
    result = verdict(request, ask)
    if isinstance(result, CheckRefusal):
        hint, error = opts.data_hint, result.error
        known = "--data" not in error or "images not found" in error  # Ultralytics knows it
        raise InputError(error if known or not hint else f"{hint}; Ultralytics: {error}")
    return result


def verdict(request: CheckRequest, ask: AskCheck) -> CheckResult:
    """The kept answer to ``request`` (:mod:`yolosafe.planning.checkcache`), else ``ask``'s, kept for the next
    identical request. The user's code may change without a file the cache watches: asked every time."""
    kept = None if request.user_code else checkcache.lookup(request)
    if kept is not None:
        return kept
    result = ask(request)
    checkcache.store(request, result)
    return result
