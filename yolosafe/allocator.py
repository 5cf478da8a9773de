"""``PYTORCH_CUDA_ALLOC_CONF``: the caching allocator's settings, validated and merged, for the training process.

They only take effect if they are in the environment before torch initialises CUDA, which is why the supervisor
puts them into the environment of the child it starts rather than into its own. ``expandable_segments:True`` is the
default: it lets the allocator grow segments instead of leaving GiBs "reserved but unallocated" (the fragmentation
in the OOM messages of the post-mortems). A user's own value is kept: their keys win over the default, and
``--alloc-conf`` wins over both. Recent torch reads ``PYTORCH_ALLOC_CONF`` first and the old name as a fallback, so
both are set to the same merged value.

Keys and value rules follow PyTorch's CUDA memory-management notes (``c10/cuda/CUDAAllocatorConfig``). torch itself
reports a bad value only when CUDA starts, deep inside the training process; here it is one line before anything
runs. No torch import: the CLI must start fast.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping

ENV_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
DEFAULTS: dict[str, str] = {"expandable_segments": "True"}


class AllocConfError(ValueError):
    """A malformed or invalid allocator string; ``str()`` is one line naming where it came from."""


def _bool(value: str) -> str:
    if value.lower() not in {"true", "false"}:
        raise ValueError("expected True or False")
    return value.capitalize()


def _int(minimum: int) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not value.isdigit() or int(value) < minimum:
            raise ValueError(f"expected an integer >= {minimum}")
        return str(int(value))

    return check


def _fraction(upper_inclusive: bool) -> Callable[[str], str]:
    def check(value: str) -> str:
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not (0 < number < 1 or (upper_inclusive and number == 1)):
            raise ValueError(f"expected a number in (0, 1{']' if upper_inclusive else ')'}")
        return value

    return check


def _power_of_two(value: str, limit: int | None = None) -> bool:
    return value.isdigit() and int(value) > 0 and int(value) & (int(value) - 1) == 0 and (
        limit is None or int(value) <= limit)


def _threads(value: str) -> str:
    if not _power_of_two(value, 128):
        raise ValueError("expected a power of two <= 128")
    return value


def _roundup(value: str) -> str:
    if _power_of_two(value):
        return value
    if not (value.startswith("[") and value.endswith("]")):
        raise ValueError("expected a power of two or [size:divisions,...,>:divisions]")
    for pair in value[1:-1].split(","):
        size, sep, divisions = (p.strip() for p in pair.partition(":"))
        if not sep or not (size == ">" or _power_of_two(size)) or not _power_of_two(divisions):
            raise ValueError(f"bad interval {pair.strip()!r}: sizes and divisions must be powers of two")
    return value


def _backend(value: str) -> str:
    if value not in {"native", "cudaMallocAsync"}:
        raise ValueError("expected native or cudaMallocAsync")
    return value


RULES: dict[str, Callable[[str], str]] = {
    "backend": _backend,
    "expandable_segments": _bool,
    "max_split_size_mb": _int(21),  # torch rejects <= 20
    "max_non_split_rounding_mb": _int(1),
    "garbage_collection_threshold": _fraction(upper_inclusive=False),
    "roundup_power2_divisions": _roundup,
    "release_lock_on_cudamalloc": _bool,
    "pinned_use_cuda_host_register": _bool,
    "pinned_num_register_threads": _threads,
    "pinned_use_background_threads": _bool,
    "pinned_reserve_segment_size_mb": _int(1),
    "per_process_memory_fraction": _fraction(upper_inclusive=True),
    "graph_capture_record_stream_reuse": _bool,
}


def _items(conf: str, source: str) -> list[str]:
    """Split on commas outside brackets (``roundup_power2_divisions:[256:1,512:2]`` is one item)."""
    items, depth, current = [], 0, ""
    for char in conf:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0:
            raise AllocConfError(f"{source}: unbalanced ']' in {conf!r}")
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise AllocConfError(f"{source}: unbalanced '[' in {conf!r}")
    return [item.strip() for item in [*items, current] if item.strip()]


def parse(conf: str, source: str) -> dict[str, str]:
    """``key:value,key:value`` to an ordered dict of canonical values; raises :class:`AllocConfError`."""
    options: dict[str, str] = {}
    for item in _items(conf, source):
        key, sep, value = (part.strip() for part in item.partition(":"))
        if not sep or not key or not value:
            raise AllocConfError(f"{source}: {item!r} is not key:value (e.g. expandable_segments:True)")
        if key not in RULES:
            close = difflib.get_close_matches(key, RULES, n=1)
            hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(RULES)}"
            raise AllocConfError(f"{source}: unknown allocator option {key!r}; {hint}")
        if key in options:
            raise AllocConfError(f"{source}: {key} is given twice")
        try:
            options[key] = RULES[key](value)
        except ValueError as exc:
            raise AllocConfError(f"{source}: {key}:{value}: {exc}") from None
    return options


def render(options: Mapping[str, str]) -> str:
    return ",".join(f"{key}:{value}" for key, value in options.items())


def merge(env: Mapping[str, str], override: str | None) -> dict[str, str]:
    """Defaults < ``PYTORCH_CUDA_ALLOC_CONF`` < ``PYTORCH_ALLOC_CONF`` < ``--alloc-conf``, key by key."""
    merged = dict(DEFAULTS)
    for source, value in ((name, env.get(name)) for name in ENV_VARS):
        merged.update(parse(value or "", source))
    merged.update(parse(override or "", "--alloc-conf"))
    return merged


def apply(env: Mapping[str, str], override: str | None) -> dict[str, str]:
    """A copy of ``env`` with both variables set to the merged value, so old and new torch agree."""
    value = render(merge(env, override))
    return {**env, **dict.fromkeys(ENV_VARS, value)}
