"""Click parameter types of yolosafe's options."""

from __future__ import annotations

from typing import Any

import click

from yolosafe.planning.memory.planner import AUTO


class BatchOrAuto(click.ParamType):
    """``--batch``: an integer or ``auto``; Ultralytics' ``-1`` and fractions (``0.7``) too
    (:func:`yolosafe.planning.options.yolo_batch` says what they mean)."""

    name = "integer|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | float | str:
        if isinstance(value, (int, float)) or str(value).strip().lower() == AUTO:
            return value if isinstance(value, (int, float)) else AUTO
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is not a number or 'auto'", param, ctx)
