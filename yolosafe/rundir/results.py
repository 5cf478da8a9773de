"""Ultralytics' ``results.csv`` in a run that resumes: one row per epoch, each epoch exactly once.

Ultralytics appends a row at the end of every epoch and never rewrites the file, so an epoch whose row was written
before a stop, but whose checkpoint was not, would be there twice after a resume. Before a resume trains, the rows
past the checkpoint's epochs are taken out (written beside and renamed: all or nothing).
"""

from __future__ import annotations

from pathlib import Path

from yolosafe.rundir import files
from yolosafe.rundir.files import RESULTS_CSV as RESULTS


def _epoch(row: str) -> int | None:
    head = row.split(",", 1)[0].strip()
    try:
        return int(float(head))
    except ValueError:
        return None


def trim(run_dir: Path, epochs_saved: int) -> int:
    """Keep the header and the rows of epochs 1..``epochs_saved`` (1-based, as the file counts), the first of each;
    returns how many rows were taken out."""
    path = run_dir / RESULTS
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except (OSError, UnicodeDecodeError):
        return 0
    if not lines:
        return 0
    kept, seen = [lines[0]], set()
    for row in lines[1:]:
        epoch = _epoch(row)
        if epoch is None or epoch > epochs_saved or epoch in seen:
            continue
        seen.add(epoch)
        kept.append(row)
    dropped = len(lines) - len(kept)
    if dropped:
        try:
            files.write_text(path, "".join(kept))
        except OSError:
            return 0
    return dropped
