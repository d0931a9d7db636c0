"""Naive vs outlier-aware round-to-nearest, evaluated (Yu et al. 2024, Sec. 4).

`weight_quantization_sweep` compares naive and super-weight-aware weight RTN per block size
(`edit.quantize`), `activation_quantization_compare` naive and super-activation-aware activation
RTN per bit width (`edit.quantize_activations`); both score the model with `evaluate`, and leave it
exactly as it was. `comparison_runs` turns their rows into named runs for `summary_table`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from torch import nn

from ..coords import SuperWeight
from ..edit.quantize import (AUTO_Z, DEFAULT_WEIGHT_BITS, DEFAULT_Z, check_bits, check_block_sizes, check_bits_list,
                             check_z, checked_super_weights, quantized_weights)
from ..edit.quantize_activations import DEFAULT_ACTIVATION_BITS, SPIKE_FRACTION, quantized_activations
from ..errors import UsageError
from .configurations import headline_columns
from .evaluate import evaluate


def _perplexity(out: dict[str, Any]) -> float | None:
    wikitext = out.get("results", {}).get("wikitext")
    return None if wikitext is None else wikitext.get("word_perplexity")


StageProgress = Callable[[str, int, int], None]  # (stage, done, total), e.g. ("naive, block 64: wikitext", 3, 10)


def _stage(progress: StageProgress | None, stage: str) -> Callable[[int, int], None] | None:
    """`progress` bound to one stage."""
    return None if progress is None else (lambda done, total: progress(stage, done, total))


def _run_eval(model, tokenizer, tasks, evaluate_options, progress: StageProgress | None = None,
              stage: str = "") -> dict[str, Any]:
    """`evaluate`, its progress reported per task as the stage '<stage>: <task>'."""
    per_task = None if progress is None else (lambda task, done, total: progress(f"{stage}: {task}", done, total))
    out = evaluate(model, tokenizer, list(tasks), progress=per_task, **evaluate_options)
    return out["results"]


def weight_quantization_sweep(
    model: nn.Module,
    tokenizer,
    super_weights: Sequence[SuperWeight],
    block_sizes: Iterable[int],
    bits: int = DEFAULT_WEIGHT_BITS,
    z: float | str = DEFAULT_Z,
    tasks: Sequence[str] = ("wikitext",),
    *,
    baseline: bool = False,
    progress: StageProgress | None = None,
    **evaluate_options: Any,
) -> list[dict[str, Any]]:
    """Per block size: the model quantized naively and super-weight-aware (clip at `z`, or a
    threshold per matrix with z="auto"; restore the super weights), each evaluated on `tasks` with
    `evaluate(..., **evaluate_options)`. `progress(stage, done, total)` follows each quantization
    and evaluation.

    Rows: {"bits", "block_size", "z", "naive_perplexity", "aware_perplexity" (wikitext word
    perplexity, None without wikitext), "naive", "aware" (the per-task results), and with
    `baseline=True` "baseline_perplexity"/"baseline" (unquantized, evaluated once)}. The model
    is left exactly as it was.
    """
    bits = check_bits(bits)
    sizes = check_block_sizes(block_sizes)
    z = check_z(z)
    if z is None:
        raise UsageError(f"the super-weight-aware scheme needs a z-score clipping threshold; the paper uses {DEFAULT_Z:g}")
    weights = checked_super_weights(model, super_weights)  # before the baseline runs
    reference = _run_eval(model, tokenizer, tasks, evaluate_options, progress, "unquantized") if baseline else None
    rows = []
    for size in sizes:
        z_label = z if z == AUTO_Z else f"{z:g}"
        naive_stage, aware_stage = f"INT{bits} naive, block {size}", f"INT{bits} aware (z={z_label}), block {size}"
        with quantized_weights(model, bits, size, progress=_stage(progress, f"{naive_stage}: quantizing")):
            naive = _run_eval(model, tokenizer, tasks, evaluate_options, progress, naive_stage)
        aware_quantizing = _stage(progress, f"{aware_stage}: quantizing")
        with quantized_weights(model, bits, size, weights, z, aware_quantizing) as record:
            aware = _run_eval(model, tokenizer, tasks, evaluate_options, progress, aware_stage)
        rows.append(_comparison_row(naive, aware, reference, bits=bits, block_size=size, z=z, clipped=record.clipped,
                                    **({"chosen_z": record.chosen_z_counts()} if z == AUTO_Z else {})))
    return rows


def aware_worse_than_naive(row: dict[str, Any]) -> list[str]:
    """The headline metrics ("task metric") on which a comparison row's aware result is worse than
    its naive one: a higher perplexity, a lower accuracy."""
    worse = []
    for task, metric in headline_columns(row["naive"]):
        naive, aware = row["naive"][task].get(metric), row.get("aware", {}).get(task, {}).get(metric)
        if not isinstance(naive, (int, float)) or not isinstance(aware, (int, float)):
            continue
        if aware > naive if "perplexity" in metric else aware < naive:
            worse.append(f"{task} {metric}")
    return worse


def quantization_warnings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per weight-quantization row whose super-weight-aware result is worse than naive
    RTN's (the paper's z = 9 does that on SmolLM2: its large non-super weights carry the massive
    activation), saying what to try instead. Empty when aware is never worse."""
    lines = []
    for row in rows:
        worse = aware_worse_than_naive(row)
        if not worse or "block_size" not in row:
            continue
        first_task, first_metric = worse[0].split(" ", 1)
        naive, aware = row["naive"][first_task][first_metric], row["aware"][first_task][first_metric]
        z = row.get("z")
        z_label = z if z == AUTO_Z or z is None else f"{z:g}"
        fix = ("a higher --z, or --z auto" if z != AUTO_Z
               else "a smaller --block-size; the gap can come from keeping the super weights exact alone")
        lines.append(f"INT{row['bits']} block {row['block_size']}: super-weight aware (z={z_label}) is worse than "
                     f"naive on {', '.join(worse)} ({first_task} {first_metric} {aware:.4g} vs {naive:.4g}); "
                     f"try {fix}")
    return lines


def _comparison_row(naive: dict, aware: dict, reference: dict | None, **settings: Any) -> dict[str, Any]:
    """One row of a naive vs super-weight-aware comparison: the settings, both results and their
    wikitext perplexities, and the unquantized baseline when it was evaluated."""
    row = {**settings, "naive_perplexity": _perplexity({"results": naive}),
           "aware_perplexity": _perplexity({"results": aware}), "naive": naive, "aware": aware}
    row["aware_worse"] = aware_worse_than_naive(row)  # in --json too: scripts need not compare themselves
    if reference is not None:
        row["baseline_perplexity"] = _perplexity({"results": reference})
        row["baseline"] = reference
    return row


def activation_quantization_compare(
    model: nn.Module,
    tokenizer,
    super_weights: Sequence[SuperWeight],
    bits: int | Iterable[int] = DEFAULT_ACTIVATION_BITS,
    tasks: Sequence[str] = ("wikitext",),
    *,
    baseline: bool = False,
    spike_fraction: float = SPIKE_FRACTION,
    progress: StageProgress | None = None,
    **evaluate_options: Any,
) -> list[dict[str, Any]]:
    """Per bit width: down-projection inputs quantized per sequence naively and with the super
    activation held out, each evaluated on `tasks`. Rows like `weight_quantization_sweep`'s, with
    "held_out" (super-activation entries kept in full precision) instead of block size / z."""
    widths = check_bits_list(bits, "activation")
    if not super_weights:
        raise UsageError("super-activation-aware quantization needs the super weights; give at least one LAYER,ROW,COL")
    reference = _run_eval(model, tokenizer, tasks, evaluate_options, progress, "unquantized") if baseline else None
    rows = []
    for width in widths:
        with quantized_activations(model, width):
            naive = _run_eval(model, tokenizer, tasks, evaluate_options, progress, f"A{width} naive")
        with quantized_activations(model, width, super_weights, spike_fraction=spike_fraction) as stats:
            aware = _run_eval(model, tokenizer, tasks, evaluate_options, progress,
                              f"A{width} super activation held out")
        rows.append(_comparison_row(naive, aware, reference, bits=width, held_out=stats.held_out))
    return rows


def comparison_runs(rows: Sequence[dict[str, Any]], setting: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """The rows of a comparison as named runs for `experiments.summary_table`: "unquantized" (when
    evaluated), then "naive, <setting>" and "aware, <setting>" per row, every task's metrics."""
    runs: dict[str, Any] = {}
    if rows and rows[0].get("baseline") is not None:
        runs["unquantized"] = {"results": rows[0]["baseline"]}
    for row in rows:
        runs[f"naive, {setting(row)}"] = {"results": row["naive"]}
        runs[f"aware, {setting(row)}"] = {"results": row["aware"]}
    return runs
