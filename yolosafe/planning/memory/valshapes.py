"""The validation set's image shapes: how large Ultralytics' ``rect=True`` validation batches get.

Ultralytics validates with ``rect=True``: images sorted by aspect ratio, each batch letterboxed to one shape,
``ceil(shape × imgsz / stride + 0.5) × stride`` with the shape ``[max h/w, 1]`` for a batch of landscape images,
``[1, 1 / min h/w]`` for a batch of portrait images and ``[1, 1]`` for a batch that holds both. The largest batch
over any batch size is therefore the square ``ceil(imgsz / stride + 0.5) × stride`` (10 % more pixels than imgsz² at
640) as soon as the set mixes landscape and portrait images, and smaller when it does not. The images are the ones
Ultralytics lists for the validation split (the input check asks it); their sizes are read from the files' headers
(no decoding) and cached in the cache directory under a fingerprint of the images' names, sizes and mtimes.
"""

from __future__ import annotations

import math
from pathlib import Path

from yolosafe.planning.memory import filestamps

CACHE = "valshapes"
STRIDE = 32  # the largest stride of the detection models: Ultralytics' gs
PAD = 0.5  # the validation dataset's pad


def side(fraction: float, imgsz: int) -> int:
    """One side of a rect batch, in pixels, for a shape fraction of imgsz."""
    return math.ceil(fraction * imgsz / STRIDE + PAD) * STRIDE


def square_area(imgsz: int) -> float:
    """A mixed set's largest validation batch area over imgsz²: the padded square."""
    return (side(1.0, imgsz) / imgsz) ** 2


def largest_area(ratios: list[float], imgsz: int) -> float:
    """The largest rect batch area over imgsz², over any batch size, for images of these h/w ratios."""
    if not ratios:
        return square_area(imgsz)
    low, high = min(ratios), max(ratios)
    if high < 1:
        return side(high, imgsz) * side(1.0, imgsz) / imgsz**2
    if low > 1:
        return side(1.0, imgsz) * side(1 / low, imgsz) / imgsz**2
    return square_area(imgsz)


def _ratios(listing: filestamps.Listing) -> list[float]:
    from PIL import Image  # header only: PIL reads the size without decoding

    ratios = []
    for path, _, _ in listing:
        try:
            with Image.open(path) as image:
                width, height = image.size
            ratios.append(round(height / width, 4))
        except (OSError, ValueError, ZeroDivisionError):
            continue
    return ratios


def image_ratios(image_files: list[str], cache_dir: Path | None = None) -> list[float]:
    """The distinct h/w ratios of these images (the validation split, as Ultralytics lists it); [] when unknown.
    Cached under a fingerprint of the files' names, sizes and mtimes."""
    stamps = filestamps.listing(image_files, missing_as_empty=False)
    return filestamps.cached(CACHE, stamps, lambda found: sorted(set(_ratios(found))), cache_dir) if stamps else []
