"""A figure measured over a dataset's files, kept in the cache directory under a fingerprint of the files' names,
sizes and modification times: a COCO-sized set is read once, then answered from its file listing."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from yolosafe.planning import datasets
from yolosafe.rundir.files import write_text

Listing = list[tuple[str, int, int]]  # (path, size, mtime_ns) of every file, sorted


def listing(files: Iterable[str], missing_as_empty: bool) -> Listing:
    """(path, size, mtime_ns) of every file: a missing one as empty (a background image's label file) when
    ``missing_as_empty``, else left out (an image that cannot be read says nothing)."""
    found = []
    for path in files:
        try:
            stat = os.stat(path)
        except OSError:
            if missing_as_empty:
                found.append((str(path), 0, 0))
            continue
        found.append((str(path), stat.st_size, stat.st_mtime_ns))
    return sorted(found)


def cached(kind: str, stamps: Listing, measure: Callable[[Listing], Any], cache_dir: Path | None = None) -> Any:
    """``measure(stamps)``, kept as ``CACHE_DIR/kind/FINGERPRINT.json`` (written beside and renamed) and read back
    while the files' stamps are the same."""
    fingerprint = hashlib.sha256(json.dumps(stamps).encode()).hexdigest()[:24]
    cache = (cache_dir or datasets.cache_dir()) / kind / f"{fingerprint}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    figure = measure(stamps)
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_text(cache, json.dumps(figure))
    return figure
