"""``memory.png``: used memory per GPU over time, each GPU's total, validation shaded, OOMs and each GPU's train and
validation peaks marked. matplotlib is imported inside :func:`plot`: the CLI must start without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from yolosafe.rundir.layout import RunDir
from yolosafe.rundir.records import VAL_PHASES

if TYPE_CHECKING:
    import pandas as pd

PLOT_POINTS = 4000  # per GPU; longer runs are plotted as the maximum of each time bin, so no peak is lost


def _val_intervals(events: list[dict[str, Any]], end_of: dict[int, float]) -> list[tuple[float, float]]:
    """Validation periods, from the first rank's start to the last rank's end; one left open (an OOM) ends with the
    attempt's last sample."""
    starts: dict[tuple[Any, ...], float] = {}
    ends: dict[tuple[Any, ...], float] = {}
    for e in events:
        key = (e["attempt"], e.get("phase"), e.get("epoch"))
        if key[1] in VAL_PHASES and e["event"] == "val_start":
            starts[key] = min(starts.get(key, e["t"]), e["t"])
        elif key[1] in VAL_PHASES and e["event"] == "val_end":
            ends[key] = max(ends.get(key, e["t"]), e["t"])
    return [(start, ends.get(key, end_of.get(key[0], start))) for key, start in starts.items()]


def plot(run: RunDir, samples: pd.DataFrame, summary: dict[str, Any], events: list[dict[str, Any]]) -> Path:
    """``memory.png``: used memory per GPU over time, the total of each GPU, validation shaded, OOMs marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    t0 = samples["t"].min()
    span = samples["t"].max() - t0
    scale, unit = (60.0, "min") if span > 600 else (1.0, "s")
    fig = Figure(figsize=(11, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for gpu, rows in samples.groupby("gpu"):
        if len(rows) > PLOT_POINTS:
            bins = ((rows["t"] - t0) // (span / PLOT_POINTS)).astype(int)
            rows = rows.groupby(bins).agg(t=("t", "first"), used_mib=("used_mib", "max"))
        ax.plot((rows["t"] - t0) / scale, rows["used_mib"] / 1024, lw=1.2, label=f"GPU {gpu}")
    for i, total in enumerate(sorted(samples["total_mib"].dropna().unique())):
        ax.axhline(total / 1024, color="black", ls="--", lw=0.8, label="total memory" if i == 0 else None)
    if summary["warn_at"]:
        top = samples["total_mib"].max() * summary["warn_at"] / 1024
        ax.axhline(top, color="tab:red", ls=":", lw=0.8, label=f"warning at {summary['warn_at']:.0%}")
    end_of = samples.groupby("attempt")["t"].max().to_dict()
    for i, (start, end) in enumerate(_val_intervals(events, end_of)):
        ax.axvspan((start - t0) / scale, (end - t0) / scale, color="tab:orange", alpha=0.15,
                   label="validation" if i == 0 else None)
    for i, event in enumerate(o for o in summary["ooms"] if o.get("t")):
        x = (event["t"] - t0) / scale
        ax.axvline(x, color="red", lw=1.0, label="OOM" if i == 0 else None)
        rows = samples[samples["gpu"] == event["gpu"]] if event["gpu"] is not None else samples.iloc[0:0]
        if not rows.empty:
            nearest = rows.iloc[(rows["t"] - event["t"]).abs().argmin()]
            ax.plot([x], [nearest["used_mib"] / 1024], "x", color="red", ms=12, mew=2.5)
    _mark_peaks(ax, summary, t0, scale)
    ax.set_xlabel(f"time since the first sample ({unit})")
    ax.set_ylabel("GPU memory used (GiB, NVML)")
    ax.set_ylim(bottom=0)
    where = f" of node {run.node}" if run.node else ""
    ax.set_title(f"{run.path.name}: GPU memory per GPU{where}, {len(samples)} samples")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small", ncol=2)
    fig.tight_layout()
    path = run.memory_plot
    fig.savefig(path)
    return path


def _mark_peaks(ax: Any, summary: dict[str, Any], t0: float, scale: float) -> None:
    """Each GPU's own train and validation peak (the table's figures), marked where it happened."""
    for gpu, info in sorted(summary["gpus"].items(), key=lambda item: int(item[0])):
        for names, marker, label in ((("train",), "^", "train peak"), (VAL_PHASES, "v", "val peak")):
            found = [info["phases"][n] for n in names if info["phases"].get(n, {}).get("peak_used_mib") is not None]
            if not found:
                continue
            top = max(found, key=lambda p: p["peak_used_mib"])
            point = ((top["t_of_peak"] - t0) / scale, top["peak_used_mib"] / 1024)
            ax.plot(*point, marker, color="black", ms=6, label=label if gpu == min(summary["gpus"], key=int) else None)
            ax.annotate(f"GPU {gpu}", point, textcoords="offset points", xytext=(4, 4), fontsize="x-small")
