"""Figures: matplotlib on a headless backend, written atomically."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

from ..errors import UsageError
from ..files import atomic_write_bytes
from ..find.detect import Detection
from ..measure.configurations import headline_columns


def pyplot():
    """matplotlib's pyplot on the Agg backend: plots work on headless machines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write `fig` atomically, in the format its suffix names (PNG by default), and close it."""
    plt = pyplot()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".").lower() or "png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def plot_activations(detection: Detection, path: str | Path, title: str = "") -> Path:
    """Per-layer max |down_proj input| and |output| (log scale), candidate layers marked.

    Like the paper's Figure 3: the super weight's layer stands out by orders of magnitude.
    """
    plt = pyplot()
    stats = detection.iterations[0]
    layers = [s.layer for s in stats]
    candidates = set(detection.candidate_layers[0]) if detection.candidate_layers else set()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)
    panels = (("max |down_proj input|", [s.input_max for s in stats]),
              ("max |down_proj output|", [s.output_max for s in stats]))
    for ax, (label, values) in zip(axes, panels):
        ax.plot(layers, values, marker="o", ms=3, lw=1.2, color="#3366aa")
        for layer in sorted(candidates):
            ax.plot([layer], [values[layer]], marker="*", ms=14, color="#cc3311", zorder=3)
            ax.annotate(f"layer {layer}", (layer, values[layer]), textcoords="offset points", xytext=(6, -4),
                        fontsize=8, color="#cc3311")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", ls=":", lw=0.5)
    fig.suptitle(title or "Down-projection activations (first iteration; * = super-weight layer)", fontsize=11)
    return save_figure(fig, path)


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Each task's headline metric against block size (log2 x axis; perplexities on a log y axis),
    naive vs super-weight aware, one panel per metric, PNG (or any format matplotlib knows from
    the suffix), written atomically."""
    points = sorted((r for r in rows if r.get("block_size") is not None), key=lambda r: r["block_size"])
    if not points:
        raise UsageError("nothing to plot: the sweep has no rows; run weight_quantization_sweep first")
    plt = pyplot()
    sizes = [r["block_size"] for r in points]
    panels = headline_columns(points[0]["naive"])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (task, metric) in zip(axes[0], panels):
        for key, label, color, marker in (("naive", "naive RTN", "#cc3311", "o"),
                                          ("aware", "super-weight aware", "#3366aa", "s")):
            ax.plot(sizes, [r[key][task].get(metric, math.nan) for r in points], marker=marker, ms=4, lw=1.4,
                    color=color, label=label)
        if points[0].get("baseline") is not None:
            ax.axhline(points[0]["baseline"][task][metric], color="#555555", ls="--", lw=1, label="unquantized")
        ax.set_xscale("log", base=2)
        if "perplexity" in metric:
            ax.set_yscale("log")
        ax.set_xlabel("block size (weights)")
        ax.set_title(f"{task} {metric}", fontsize=10)
        ax.grid(True, which="both", ls=":", lw=0.5)
        ax.legend(fontsize=8)
    bits = points[0].get("bits")
    fig.suptitle(title or f"INT{bits} round-to-nearest vs block size", fontsize=11)
    return save_figure(fig, path)
