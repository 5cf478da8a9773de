"""``yolosafe fix``: the repairs the diagnosis points to, proposed one at a time, each asked ``[y/N]`` (default No).

Without a terminal every answer is No, unless ``--yes``; and ``--yes`` accepts only what is provably safe: stopping
yolosafe's own stale processes (``holders`` decides, and checks each process's start time right before the signal),
adding the allocator export to the shell rc file, and the config change. A process that is merely *likely* stale (a
Jupyter kernel) needs a person's yes on a terminal. Every file is backed up before it changes and replaced
atomically. A failure is one line, and the other proposals still run. Exit status 0, or 1 when something failed.
"""

from __future__ import annotations

import difflib
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from yolosafe import gpus
from yolosafe.errors import UsageError
from yolosafe.planning import allocator, inputs
from yolosafe.readers.doctor import diagnosis as doctor
from yolosafe.readers.holders import NEVER, PROVEN, Holder, judge_gpus, stop
from yolosafe.repair import configchange as configfix
from yolosafe.repair import yamledit as configedit

EXIT_OK, EXIT_FAILED = 0, 1
RC_ENV = "YOLOSAFE_RC_FILE"  # the shell rc file to edit (default ~/.bashrc)
STOP_TIMEOUT_S = 10.0


class FixUsageError(UsageError):
    """A bad argument: one line, exit status 2, nothing changed."""


@dataclass
class Summary:
    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    not_done: list[str] = field(default_factory=list)
    backups: list[str] = field(default_factory=list)


def say(line: str = "") -> None:
    print(line, flush=True)


@dataclass
class Asker:
    """y/N on a terminal (Enter or end of input: No); without one, No, except ``--yes`` for what is safe."""

    yes: bool
    stdin: IO[str] = field(default_factory=lambda: sys.stdin)

    def __call__(self, question: str, safe: bool) -> bool:
        if self.yes and safe:
            say(f"    {question} yes (--yes)")
            return True
        if not self.stdin.isatty():
            why = "not provably safe: answer it on a terminal" if self.yes else "no terminal; --yes to accept"
            say(f"    {question} no ({why})")
            return False
        print(f"    {question} [y/N] ", end="", flush=True)
        return self.stdin.readline().strip().lower() in ("y", "yes")


def _describe(h: Holder) -> str:
    mib = "?" if h.used_mib is None else f"{h.used_mib:.0f} MiB"
    who = f": {(h.command or '?')[:100]} ({h.user or '?'})" if h.command else ""
    return f"pid {h.pid}, {mib} on GPU {h.gpu}{who}"


def processes(inventory: gpus.Inventory, ask: Asker, summary: Summary) -> None:
    holders = judge_gpus(inventory.gpus)
    if not holders:
        say("no process holds GPU memory" if inventory.gpus else f"no GPU here ({inventory.problem})")
    for h in holders:
        say(_describe(h))
        say(f"    {h.kind}: {h.reason}")
        if h.action == NEVER:
            if h.advice:
                say(f"    {h.advice}")
                summary.not_done.append(f"pid {h.pid} ({h.kind}): {h.advice}")
            continue
        if not ask(f"stop pid {h.pid} (kill -TERM {h.pid})?", safe=h.action == PROVEN):
            summary.not_done.append(f"pid {h.pid} ({(h.command or '?')[:60]}) left running")
            continue
        ok, message = stop(h, STOP_TIMEOUT_S)
        say(f"    {message}")
        (summary.done if ok else summary.failed).append(f"stop pid {h.pid}: {message}")


def rc_path(env: Mapping[str, str]) -> Path:
    if env.get(RC_ENV):
        return Path(env[RC_ENV])
    if not env.get("HOME"):
        raise OSError(f"HOME is not set: no rc file to edit (name one with {RC_ENV})")
    return Path(env["HOME"]) / ".bashrc"


def rc_lines(env: Mapping[str, str]) -> list[str] | None:
    """The export lines: the user's settings of both variables merged by ``allocator``, expandable segments on;
    None when this shell has them on already."""
    mine: dict[str, str] = {}
    for name in allocator.ENV_VARS:
        mine.update(allocator.parse(env[name], name) if name in env else {})
    if mine.get("expandable_segments") == "True":
        return None
    value = shlex.quote(allocator.render(allocator.merge(env, "expandable_segments:True")))
    names = [n for n in allocator.ENV_VARS if n in env or n == allocator.ENV_VARS[0]]
    return [f"export {name}={value}" for name in names]


def allocator_rc(inventory: gpus.Inventory, ask: Asker, summary: Summary, env: Mapping[str, str]) -> None:
    if not inventory.gpus:
        say("no GPU here: expandable_segments does not matter; nothing proposed")
        return
    lines = rc_lines(env)
    if lines is None:
        say("expandable_segments:True is on in this shell: nothing to do")
        return
    rc = rc_path(env)
    existing = rc.read_bytes().decode(errors="replace") if rc.is_file() else ""
    if any(line in existing for line in lines):
        say(f"{rc} already has {lines[0]} (new shells get it; this one: source {rc})")
        return
    say(f"expandable_segments is off in this shell: PyTorch outside yolosafe train fragments more. Proposed, "
        f"appended to {rc}:")
    for line in lines:
        say(f"    {line}")
    if not ask(f"add it to {rc}?", safe=True):
        summary.not_done.append(f"{rc}: not changed")
        return
    if rc.exists():
        summary.backups.append(str(configedit.backup(rc)))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    head = existing + ("\n" if existing and not existing.endswith("\n") else "")
    text = head + f"# yolosafe fix {stamp}: fewer fragmentation OOMs in PyTorch\n" + "".join(f"{ln}\n" for ln in lines)
    configedit.replace_atomically(rc, text.encode())
    summary.done.append(f"{rc}: {lines[0]} (new shells; now: source {rc})")
    say(f"    added to {rc}")


def _validator(story_view: doctor.RunView) -> Callable[[Path], None]:
    def check(tmp: Path) -> None:
        assert story_view.story is not None
        configfix.config_plan(configfix.read_config(tmp), story_view.story)

    return check


def training_config(config: Path | None, run: Path | None, ask: Asker, summary: Summary) -> None:
    if config is None:
        say("no --config: nothing to change (yolosafe fix --config FILE.yaml)")
        return
    if run is None:
        raise configfix.ConfigFixError("no run to derive the change from: give --run RUN_DIR")
    view = doctor.run_view(run)
    if view.story is None:
        raise configfix.ConfigFixError(str(view.problem))
    say(f"config {config}, run {run}")
    change = configfix.propose(config, view.story, view.failures)
    for reason in change.reasons:
        say(reason)
    if not change.changes:
        return
    if configedit.read_only(config):
        raise configfix.ConfigFixError(f"{config} is read-only: not changed")
    old = config.read_bytes().decode()
    new = configedit.set_values(old, change.changes, str(config))
    settings = " ".join(f"{k}={v}" for k, v in change.changes.items())
    if not ask(f"change {config}: {settings}?", safe=True):
        summary.not_done.append(f"{config}: not changed")
        return
    backup = configedit.backup(config)
    summary.backups.append(str(backup))
    configedit.replace_atomically(config, new.encode(), check=_validator(view))
    say(f"    backup: {backup}")
    for line in difflib.unified_diff(old.splitlines(), new.splitlines(), str(backup), str(config), lineterm=""):
        say(f"    {line}")
    summary.done.append(f"{config}: {settings}")


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror}"
    return " ".join(str(exc).split()) or type(exc).__name__


def print_summary(summary: Summary) -> None:
    say("\n== summary ==")
    for title, items in (("done", summary.done), ("failed", summary.failed), ("not done", summary.not_done),
                         ("backups", summary.backups)):
        if items:
            say(f"{title}:")
            for item in items:
                say(f"  - {item}")
    if not (summary.done or summary.failed or summary.not_done):
        say("nothing to do")
    say("check: yolosafe doctor")


def main(config_file: str | None, run_dir: str | None, yes: bool, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    config = Path(config_file) if config_file else None
    if config is not None and not config.exists():
        raise FixUsageError(f"--config {config}: no such file")
    if config is not None:
        inputs.text_file(config, "--config")  # a regular UTF-8 file of a bounded size: one line and exit 2 otherwise
    try:
        run = doctor.find_run(run_dir, None)
        inventory = gpus.read_inventory(env)
    except (doctor.DoctorError, gpus.FakeGpusError) as exc:
        raise FixUsageError(f"--run {exc}" if run_dir and isinstance(exc, doctor.DoctorError) else str(exc)) from None
    ask, summary = Asker(yes), Summary()
    say(f"GPU memory repair, {time.strftime('%Y-%m-%d %H:%M:%S')}: each change is asked first (default No)")
    sections: list[tuple[str, Callable[[], None]]] = [
        ("1. processes holding GPU memory", lambda: processes(inventory, ask, summary)),
        ("2. PyTorch allocator: expandable_segments", lambda: allocator_rc(inventory, ask, summary, env)),
        ("3. training config", lambda: training_config(config, run, ask, summary)),
    ]
    for title, section in sections:
        say(f"\n== {title} ==")
        try:
            section()
        except Exception as exc:  # one line per failure; the other proposals still run
            say(f"failed: {_one_line(exc)}")
            summary.failed.append(f"{title.split('. ', 1)[1]}: {_one_line(exc)}")
    print_summary(summary)
    return EXIT_FAILED if summary.failed else EXIT_OK
