"""Figures: matplotlib on a headless backend, written atomically."""

from __future__ import annotations

import io
from pathlib import Path

from ..files import atomic_write_bytes
from ..find.detect import Detection


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
