"""Figures: matplotlib on a headless backend, written atomically."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

from ..errors import UsageError
from ..files import atomic_write_bytes
from ..find.detect import Detection
from ..find.hooks import LayerStats
from ..measure.configurations import headline_columns
from ..measure.stop_words import StopWordShift
from ..measure.study_runs import SWEEP_METRICS


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


def plot_activation_profile(before: list[LayerStats], after: list[LayerStats], path: str | Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)
    layers = [s.layer for s in before]
    for ax, attribute, label in ((axes[0], "input_max", "max |down_proj input|"),
                                 (axes[1], "output_max", "max |down_proj output|")):
        ax.plot(layers, [max(getattr(s, attribute), 1e-12) for s in before], marker="o", ms=3, lw=1.2,
                color="#3366aa", label="original")
        ax.plot(layers, [max(getattr(s, attribute), 1e-12) for s in after], marker="x", ms=4, lw=1.2,
                color="#cc3311", label="super weights zeroed")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", ls=":", lw=0.5)
        ax.legend(fontsize=8)
    fig.suptitle("Down-projection activations before and after zeroing the super weights", fontsize=11)
    return save_figure(fig, path)


def plot_scale_sweep(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Perplexity (log y) and average accuracy against the scaling factor s; s = 1 marked."""
    plt = pyplot()
    panels = [(key, label, log) for key, label, log in SWEEP_METRICS if any(r.get(key) is not None for r in rows)]
    if not panels:
        raise UsageError("nothing to plot: the sweep has neither perplexity nor accuracy values")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), sharex=True, squeeze=False)
    for ax, (key, label, log) in zip(axes[0], panels):  # a metric no task measured gets no empty panel
        points = [(r["factor"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot(*zip(*points), marker="o", ms=4, lw=1.2, color="#3366aa")
        if log:
            ax.set_yscale("log")
        ax.axvline(1.0, color="#cc3311", ls="--", lw=1, label="s = 1 (original)")
        ax.set_xlabel("super-weight scaling factor s")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", ls=":", lw=0.5)
        ax.legend(fontsize=8)
    fig.suptitle("Scaling the super weights", fontsize=11)
    return save_figure(fig, path)


def plot_stop_word_shift(shift: StopWordShift, path: str | Path) -> Path:
    """Stop-word probability mass before/after, and the tokens that gain and lose most."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 2.4]})
    axes[0].bar(["original", "zeroed"], [shift.stop_mass_original, shift.stop_mass_ablated],
                color=["#3366aa", "#cc3311"])
    axes[0].set_title("next-token mass on stop words", fontsize=10)
    axes[0].grid(True, axis="y", ls=":", lw=0.5)
    entries = shift.grows + shift.shrinks[::-1]
    changes = [e["ablated"] - e["original"] for e in entries]
    labels = [repr(e["text"]) for e in entries]
    axes[1].barh(range(len(entries)), changes, color=["#cc3311" if c > 0 else "#3366aa" for c in changes])
    axes[1].set_yticks(range(len(entries)), labels, fontsize=7)
    axes[1].invert_yaxis()
    axes[1].axvline(0, color="black", lw=0.8)
    axes[1].set_title("largest changes in mean next-token probability (zeroed - original)", fontsize=10)
    axes[1].grid(True, axis="x", ls=":", lw=0.5)
    fig.suptitle("Next-token probability when the super weights are zeroed (stop words and largest changes)", fontsize=11)
    return save_figure(fig, path)
