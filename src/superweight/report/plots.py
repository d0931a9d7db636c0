"""Figures: matplotlib on a headless backend, written atomically."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

from ..coords import SuperWeight
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


def plot_format(path: str | Path) -> str:
    """The format a plot is written in: the one its suffix names, PNG without one."""
    return Path(path).suffix.lstrip(".").lower() or "png"


def check_plot_format(path: str | Path) -> None:
    """A --plot whose format matplotlib cannot write fails here, before the work, not after it."""
    from matplotlib.backend_bases import FigureCanvasBase

    supported = FigureCanvasBase.get_supported_filetypes()
    if plot_format(path) not in supported:
        raise UsageError(f"--plot {path}: matplotlib cannot write .{plot_format(path)} files; give a name ending "
                         f"in .png (or {', '.join('.' + name for name in sorted(supported) if name != 'png')})")


def save_figure(fig, path: str | Path, layout: bool = True) -> Path:
    """Write `fig` atomically, in the format its suffix names (PNG by default), and close it
    (laid out tightly unless `layout` is False: the caller did it)."""
    plt = pyplot()
    if layout:
        fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=plot_format(path), dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def tick_label(value: float) -> str:
    """A tick a person reads: 0.5, 120, 20000, 1e+08 (never 10^2 alone, never 13912820)."""
    return f"{value:g}" if 1e-3 <= abs(value) < 1e5 or value == 0 else f"{value:.0e}".replace("e+0", "e+").replace("e-0", "e-")


def readable_log_axis(ax, which: str = "y") -> None:
    """Labelled ticks over the whole range of a log axis (matplotlib labels only powers of ten, so
    a range inside one decade, 100 to 160, gets no label at all): 1-2-5 steps over up to three
    decades, every digit inside one, one tick per decade (or fewer) beyond."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    low, high = ax.get_ylim() if which == "y" else ax.get_xlim()
    decades = math.log10(high / low) if low > 0 and high > low else 12.0
    subs = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0) if decades < 1 else (1.0, 2.0, 5.0) if decades <= 3 else (1.0,)
    axis = ax.yaxis if which == "y" else ax.xaxis
    axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=10))
    axis.set_major_formatter(FuncFormatter(lambda value, _: tick_label(value)))
    axis.set_minor_formatter(NullFormatter())


# How each measured role is drawn (SuperWeight.role, from `sw detect --verify`); a weight without a
# measured role is a "candidate". README promises the found layers starred: candidates and super
# weights (super or joint) are stars, told apart by colour; inert weights, not super, are crosses.
# Markers are always filled, and the legend shows each exactly as drawn.
ROLE_STYLE = {
    "super": dict(marker="*", ms=16, color="#cc3311", label="super (zeroing it alone breaks the model)"),
    "joint": dict(marker="*", ms=12, color="#ee7733", label="joint (matters only together with others)"),
    "inert": dict(marker="X", ms=8, color="#777777", label="inert (zeroing it changes little)"),
    "candidate": dict(marker="*", ms=14, color="#009988", label="candidate (role not measured: --verify)"),
}


def _marker(role: str) -> dict[str, object]:
    """The keyword arguments that draw `role`'s marker (and its legend entry), without its label."""
    style = {key: value for key, value in ROLE_STYLE[role].items() if key != "label"}
    return dict(style, mfc=style["color"], mec="#222222", mew=0.6, ls="none")


def weight_role(weight: SuperWeight) -> str:
    role = getattr(weight, "role", None)
    return role if role in ROLE_STYLE else "candidate"


def plot_activations(detection: Detection, path: str | Path, title: str = "",
                     weights: Sequence[SuperWeight] | None = None) -> Path:
    """Per-layer max |down_proj input| and |output| (log scale), each found weight (`weights`, by
    default the detection's) marked at its layer by its measured role.

    Like the paper's Figure 3: the super weight's layer stands out by orders of magnitude.
    """
    plt = pyplot()
    stats = detection.iterations[0]
    layers = [s.layer for s in stats]
    weights = list(detection.super_weights if weights is None else weights)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    panels = (("max |down_proj input| over the prompt", "max |input activation| (hidden-state units)",
               [s.input_max for s in stats]),
              ("max |down_proj output| over the prompt", "max |output activation| (hidden-state units)",
               [s.output_max for s in stats]))
    shown: set[str] = set()
    for ax, (title_text, ylabel, values) in zip(axes, panels):
        ax.plot(layers, [max(v, 1e-12) for v in values], marker="o", ms=3, lw=1.2, color="#3366aa",
                label="all layers")
        by_layer: dict[int, list[SuperWeight]] = {}
        for weight in weights:
            by_layer.setdefault(weight.layer, []).append(weight)
        for layer, here in sorted(by_layer.items()):
            if layer not in layers:
                continue
            value = max(values[layers.index(layer)], 1e-12)
            # Weights of one layer share a point: one marker, the weightiest role's (drawn one over
            # another, an inert cross hid the super weight's star); the label names each one's role.
            role = max((weight_role(w) for w in here), key=lambda role: ROLE_STYLE[role]["ms"])
            ax.plot([layer], [value], zorder=3, **_marker(role))
            shown.add(role)
            ax.annotate("\n".join(f"{w.row},{w.col} {weight_role(w)}" for w in here), (layer, value),
                        textcoords="offset points", xytext=(8, -10), fontsize=7, color="#333333")
        ax.set_yscale("log")
        readable_log_axis(ax)
        ax.set_xlabel("decoder layer (index)")
        ax.set_ylabel(ylabel)
        ax.set_title(title_text, fontsize=10)
        ax.grid(True, which="both", ls=":", lw=0.5)
    fig.suptitle(title or "Down-projection activations (first detection iteration); found weights by measured role",
                 fontsize=11)
    roles = [role for role in ROLE_STYLE if role in shown]  # legend in the table's order, below the panels
    if roles:
        from matplotlib.lines import Line2D

        fig.legend([Line2D([], [], **_marker(role)) for role in roles], [ROLE_STYLE[role]["label"] for role in roles],
                   loc="lower center", ncol=len(roles), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
    return save_figure(fig, path, layout=not roles)


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
        ax.set_xticks(sizes, [f"{size:,}" for size in sizes], rotation=45 if len(sizes) > 5 else 0, fontsize=8)
        ax.xaxis.set_minor_locator(plt.NullLocator())
        if "perplexity" in metric:
            ax.set_yscale("log")
            readable_log_axis(ax)
        ax.set_xlabel("block size (weights per quantization block, log scale)")
        ax.set_ylabel(metric_axis_label(task, metric))
        ax.set_title(f"{task} {metric}", fontsize=10)
        ax.grid(True, which="both", ls=":", lw=0.5)
        ax.legend(fontsize=8)
    bits = points[0].get("bits")
    fig.suptitle(title or f"INT{bits} round-to-nearest vs block size", fontsize=11)
    return save_figure(fig, path)


def metric_axis_label(task: str, metric: str) -> str:
    """A y-axis label: the quantity, and its unit (or what its number is, for a unitless one)."""
    if "perplexity" in metric:
        unit = "word" if metric.startswith("word") else "byte" if metric.startswith("byte") else "token"
        return f"perplexity per {unit} (log scale)"
    if metric.startswith("acc"):
        return f"{task} {metric} (fraction correct)"
    if metric == "bits_per_byte":
        return f"{task} bits per byte"
    return f"{task} {metric}"


def plot_activation_profile(before: list[LayerStats], after: list[LayerStats], path: str | Path,
                            zeroed: str = "super weights") -> Path:
    """`zeroed` names what was zeroed ("super weight [11, 507, 1229]", "3 super weights")."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)
    layers = [s.layer for s in before]
    for ax, attribute, label in ((axes[0], "input_max", "max |down_proj input|"),
                                 (axes[1], "output_max", "max |down_proj output|")):
        ax.plot(layers, [max(getattr(s, attribute), 1e-12) for s in before], marker="o", ms=3, lw=1.2,
                color="#3366aa", label="original")
        ax.plot(layers, [max(getattr(s, attribute), 1e-12) for s in after], marker="x", ms=4, lw=1.2,
                color="#cc3311", label=f"{zeroed} zeroed")
        ax.set_yscale("log")
        readable_log_axis(ax)
        ax.set_xlabel("decoder layer (index)")
        ax.set_ylabel(f"{label.replace('down_proj ', '')} (hidden-state units)")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", ls=":", lw=0.5)
        ax.legend(fontsize=8)
    fig.suptitle(f"Down-projection activations before and after zeroing the {zeroed}", fontsize=11)
    return save_figure(fig, path)


def plot_scale_sweep(rows: list[dict[str, Any]], path: str | Path, scaled: str = "super weights") -> Path:
    """Perplexity (log y) and average accuracy against the scaling factor s of `scaled`; s = 1 marked."""
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
            readable_log_axis(ax)
        ax.axvline(1.0, color="#cc3311", ls="--", lw=1, label="s = 1 (original)")
        ax.set_xlabel("super-weight scaling factor s (x original value)")
        ax.set_ylabel(metric_axis_label("wikitext", "word_perplexity") if key == "perplexity"
                      else "average accuracy (fraction correct)")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", ls=":", lw=0.5)
        ax.legend(fontsize=8)
    fig.suptitle(f"Scaling the {scaled}", fontsize=11)
    return save_figure(fig, path)


def plot_stop_word_shift(shift: StopWordShift, path: str | Path, zeroed: str = "super weights") -> Path:
    """Stop-word probability mass before/after, and the tokens that gain and lose most; `zeroed`
    names what was zeroed ("super weight [11, 507, 1229]", "3 super weights")."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [1, 2.4]})
    axes[0].bar(["original", "zeroed"], [shift.stop_mass_original, shift.stop_mass_ablated],
                color=["#3366aa", "#cc3311"])
    axes[0].set_title("next-token mass on stop words", fontsize=10)
    axes[0].set_ylabel("probability mass (0 to 1)")
    axes[0].grid(True, axis="y", ls=":", lw=0.5)
    entries = shift.grows + shift.shrinks[::-1]
    changes = [e["ablated"] - e["original"] for e in entries]
    labels = [repr(e["text"]) for e in entries]
    axes[1].barh(range(len(entries)), changes, color=["#cc3311" if c > 0 else "#3366aa" for c in changes])
    # monospace: a token of one punctuation mark ('.', ',') stays readable beside its quotes
    axes[1].set_yticks(range(len(entries)), labels, fontsize=8, fontfamily="monospace")
    axes[1].invert_yaxis()
    axes[1].axvline(0, color="black", lw=0.8)
    axes[1].set_title("largest changes in mean next-token probability (zeroed - original)", fontsize=10)
    axes[1].set_xlabel("change in mean next-token probability (zeroed - original)")
    axes[1].set_ylabel("token")
    axes[1].grid(True, axis="x", ls=":", lw=0.5)
    fig.suptitle(f"Next-token probability with the {zeroed} zeroed (stop words and largest changes)", fontsize=11)
    return save_figure(fig, path)
