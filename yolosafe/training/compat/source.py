"""The tools of the checks: Ultralytics' source read with whitespace collapsed, needles found in order, the
named errors (never ``assert``: ``python -O`` would strip a check)."""

from __future__ import annotations

import ast
import inspect
from typing import Any

from yolosafe.errors import YolosafeError


class CompatError(YolosafeError, AssertionError):
    """An assumption about Ultralytics does not hold; ``str()`` names it."""


class CheckFailed(CompatError):
    """One check's finding (what :meth:`Assumption.verify` wraps with the assumption's name). Raised by
    :func:`require`, never by ``assert``: ``python -O`` strips asserts, and a check must not pass by being gone."""


def require(condition: object, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def collapsed_source(obj: Any) -> str:
    """The source with whitespace collapsed, so formatting changes do not break a check."""
    return " ".join(inspect.getsource(obj).split())


def in_order(obj: Any, *needles: str) -> None:
    """Each needle occurs in ``obj``'s source, after the previous one."""
    text, at = collapsed_source(obj), 0
    for needle in needles:
        found = text.find(needle, at)
        require(found >= 0, f"{needle!r} not found{' after the previous step' if at else ''} in {obj.__qualname__}")
        at = found + len(needle)


def rank_guarded(func: Any, event: str) -> bool:
    """Whether ``func`` runs callback ``event`` only inside an ``if`` on ``RANK`` (e.g. ``if RANK in {-1, 0}``)."""
    tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(func)))
    guarded: list[bool] = []

    def visit(node: ast.AST, under_rank: bool) -> None:
        if isinstance(node, ast.Call) and ast.unparse(node).endswith(f"run_callbacks({event!r})"):
            guarded.append(under_rank)
        for child in ast.iter_child_nodes(node):
            rank_if = isinstance(node, ast.If) and "RANK" in ast.unparse(node.test) and child in node.body
            visit(child, under_rank or rank_if)

    visit(tree, False)
    require(guarded, f"{func.__qualname__} does not run {event!r}")
    return all(guarded)


def base_trainer() -> Any:
    from ultralytics.engine.trainer import BaseTrainer

    return BaseTrainer
