"""One loaded model, several ablation configurations, evaluated side by side.

A `Configuration` says what to do to the model before evaluating (nothing; zero or scale some
weights; optionally write the super activation back). `run_configurations` applies each one in
place, evaluates, and undoes it exactly, so the model is loaded once, never reloaded.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .. import distributed
from ..edit import ablate, restore
from ..edit.ablate import ablated_name, control_name
from ..coords import SuperWeight
from ..errors import UsageError
from ..model.integrity import corrupt_tensor, non_finite_error
from .evaluate import evaluate
from .harness import HarnessTasks, evaluate_harness

CONTROLS = ("random", "outliers")
# What a configuration does, whatever its row is called (a stable key for reports and scripts):
# the model as given, weights zeroed or scaled, zeroed with the super activation written back, or a
# control ablation of other weights.
KINDS = ("unchanged", "ablated", "restored", "control")
NON_FINITE = ("nan", "inf", "-inf")  # a NaN or inf metric in results (metrics.plain)


@dataclass(frozen=True)
class Configuration:
    name: str
    weights: tuple[SuperWeight, ...] = ()
    mode: str = "zero"
    factor: float | None = None
    restore_activation: bool = False
    control: str | None = None  # how `weights` were chosen when they are a control
    control_seed: int | None = None
    control_top: int | None = None

    @property
    def kind(self) -> str:
        """One of KINDS."""
        if not self.weights:
            return "unchanged"
        if self.control:
            return "control"
        return "restored" if self.restore_activation else "ablated"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "mode": self.mode if self.weights else None, "factor": self.factor,
            "restore_activation": self.restore_activation, "control": self.control,
            "control_seed": self.control_seed, "control_top": self.control_top,
            "num_weights": len(self.weights),
            "weights": [w.to_dict() for w in self.weights] if len(self.weights) <= 64 else "omitted (> 64)",
        }


def parse_factor(text: str | None, mode: str | None) -> tuple[str, float]:
    """(mode, factor) from --mode and --factor. --factor alone implies --mode scale (an option
    that only means something with another must not be accepted and then ignored)."""
    if mode is None:
        mode = "zero" if text is None else "scale"
    if mode not in ("zero", "scale"):
        raise UsageError(f"unknown --mode '{mode}'; use zero or scale")
    if mode == "zero":
        if text is not None:
            raise UsageError(f"--mode zero zeroes the weights, so --factor {text} would be ignored; "
                             "drop --factor, or drop --mode zero to scale")
        return mode, 0.0
    if text is None:
        raise UsageError("--mode scale needs --factor S (a number; 0 zeroes, > 1 amplifies)")
    try:
        factor = float(text)
    except ValueError:
        raise UsageError(f"--factor must be a number, got '{text}'") from None
    if not math.isfinite(factor):
        raise UsageError(f"--factor must be a finite number, got '{text}'")
    return mode, factor


def check_control(control: str | None, top: int | None) -> None:
    """--control and --top, checked before the model loads."""
    if control is not None and control not in CONTROLS:
        raise UsageError(f"unknown --control '{control}'; use {' or '.join(CONTROLS)}")
    if control == "outliers" and top is not None and top <= 0:
        raise UsageError(f"--top must be a positive number of weights, got {top} (or drop it: the default scales "
                         "the paper's ~7000 outliers of Llama-7B to this model)")
    if top is not None and control != "outliers":
        raise UsageError(f"--top {top} counts the weights of --control outliers, which is not given; "
                         "add --control outliers or drop --top")


def outlier_count(model, control: str | None, top: int | None) -> int | None:
    """--top as given, or for --control outliers without it the count `sw study` picks (the
    paper's ~7000 outliers of Llama-7B, scaled by this model's down-projection size)."""
    if control != "outliers" or top is not None:
        return top
    from .study_runs import default_outlier_count  # study_runs imports this module

    return default_outlier_count(model)


def control_weights(model, super_weights: list[SuperWeight], control: str, *, seed: int, top: int | None) -> list[SuperWeight]:
    """The paper's controls: random weights of the same matrices, or the other largest weights
    (`top` of them; None: `outlier_count`'s default)."""
    if control == "random":
        return ablate.random_control(model, super_weights, seed=seed)
    if control == "outliers":
        return ablate.outlier_control(model, super_weights, top=outlier_count(model, control, top))
    raise UsageError(f"unknown --control '{control}'; use {' or '.join(CONTROLS)}")


def single_configuration(model, super_weights: list[SuperWeight], *, mode: str, factor: float | None,
                         restore_activation: bool, control: str | None, seed: int, top: int | None,
                         unchanged: str = "original", on_top_of: str | None = None) -> Configuration:
    """What `sw eval --coords ...` (without --compare) evaluates; `unchanged` names the model as
    loaded (a directory that `sw ablate` wrote is not the original); `on_top_of` names an ablation
    the model already holds, which the row's name then starts with ("<it>, then ...")."""
    if not super_weights:
        return Configuration(unchanged)
    if control and restore_activation:
        raise UsageError("--restore-activation writes back the super weights' activation, which a --control "
                         "ablation leaves alone; drop one of them (--compare evaluates both)")
    prefix = f"{on_top_of}, then " if on_top_of else ""
    if control:
        top = outlier_count(model, control, top)
        chosen = control_weights(model, super_weights, control, seed=seed, top=top)
        return Configuration(prefix + control_name(chosen, control, mode, factor), tuple(chosen), mode, factor,
                             False, control, seed, top)
    return Configuration(prefix + ablated_name(super_weights, mode, factor, restore_activation), tuple(super_weights),
                         mode, factor, restore_activation)


def comparison_configurations(model, super_weights: list[SuperWeight], *, control: str | None, seed: int,
                              top: int | None, unchanged: str = "original") -> list[Configuration]:
    """The paper's Table 1: original (`unchanged`), SW zeroed, SW zeroed + SA restored, and a control,
    each row named by what it zeroed."""
    control = control or "random"
    top = outlier_count(model, control, top)
    chosen = control_weights(model, super_weights, control, seed=seed, top=top)
    weights = tuple(super_weights)
    return [
        Configuration(unchanged),
        Configuration(ablated_name(weights), weights),
        Configuration(ablated_name(weights, restore_activation=True), weights, restore_activation=True),
        Configuration(control_name(chosen, control), tuple(chosen), control=control, control_seed=seed, control_top=top),
    ]


@contextmanager
def applied(model, configuration: Configuration) -> Iterator[None]:
    """The model as `configuration` says within the block; restored bit-exactly on exit (hooks removed)."""
    with ExitStack() as stack:
        if configuration.weights:
            record = stack.enter_context(
                ablate.ablated(model, list(configuration.weights), configuration.mode, configuration.factor))
            if configuration.restore_activation:
                stack.enter_context(restore.restored_activation(model, record))
        yield


def run_configurations(model, tokenizer, configurations: list[Configuration], tasks: list[str], *,
                       on_start: Callable[[Configuration], None] | None = None,
                       harness: HarnessTasks | None = None, **evaluate_options) -> dict[str, Any]:
    """Evaluate each configuration; the model is restored bit-exactly after each one.

    `harness` tasks run through lm-eval's own evaluator on the same configured model, and their
    results join the built-in tasks' (a run's "harness" entry names them and lm-eval's version).
    """
    runs = {}
    for configuration in configurations:
        if on_start:
            on_start(configuration)
        with applied(model, configuration):
            result = evaluate(model, tokenizer, tasks, **evaluate_options) if tasks else {"results": {}, "n_samples": {}}
            if harness:
                _add_harness_results(result, _run_harness(model, tokenizer, harness, evaluate_options))
        if not all(map(math.isfinite, _metric_values(result["results"]))):
            _check_non_finite(model, configuration)
        result["ablation"] = configuration.describe()
        runs[configuration.name] = result
    return runs


def _metric_values(results: dict[str, dict[str, Any]]) -> list[float]:
    return [v for metrics in results.values() for v in map(_number, metrics.values()) if v is not None]


def _check_non_finite(model, configuration: Configuration) -> None:
    """A configuration scored NaN or inf (the model is as given again): refuse a model holding a NaN
    or inf weight, whatever the configuration, and the model as given overflowing; a weight scaled
    up may overflow float16 legitimately, and its row shows nan or inf."""
    tensors = model.named_parameters()
    if configuration.kind == "unchanged":
        raise non_finite_error(tensors, next(model.parameters()).dtype, f"a metric of '{configuration.name}'")
    if corrupt := corrupt_tensor(tensors):
        raise corrupt


HARNESS_OPTIONS = ("limit", "batch_size", "max_length", "seed")  # what lm-eval's run shares with the built-in one


def _run_harness(model, tokenizer, harness: HarnessTasks, evaluate_options: dict[str, Any]) -> dict[str, Any]:
    progress = evaluate_options.get("progress")
    label = f"{', '.join(harness.names)} (lm-eval)"
    if progress:  # lm-eval reports no progress of its own here: one step, started and done
        progress(label, 0, 1)
    options = {k: v for k, v in evaluate_options.items() if k in HARNESS_OPTIONS}
    # lm-eval does not share out a model given to it in memory, and under torchrun it returns its
    # results on LOCAL_RANK 0 alone (None elsewhere): rank 0 runs it, and every rank gets its results.
    out = distributed.on_main(lambda: evaluate_harness(model, tokenizer, harness, **options))
    if progress:
        progress(label, 1, 1)
    return out


def _add_harness_results(result: dict[str, Any], harness_result: dict[str, Any]) -> None:
    for name in harness_result["results"]:
        if name in result["results"]:
            raise UsageError(f"{name} is both a built-in task and an lm-eval task here; run them in two commands")
    result["results"].update(harness_result["results"])
    result["n_samples"].update(harness_result["n_samples"])
    result["harness"] = harness_result["harness"]


@dataclass
class SummaryTable:
    """Configurations by metric, as numbers: `values[i][j]` is configuration `names[i]`'s value of
    metric `columns[j + 1]` and `stderrs[i][j]` its standard error (None where none is computed,
    as lm-eval's "N/A"). `rows` is the display form, `0.6000 ± 0.2449`, as lm-eval's table prints."""

    columns: list[str]  # "configuration", then one per metric
    names: list[str] = field(default_factory=list)
    values: list[list[float | None]] = field(default_factory=list)
    stderrs: list[list[float | None]] = field(default_factory=list)
    kinds: list[str | None] = field(default_factory=list)  # each row's Configuration.kind (None: not known)

    def rows_of(self, kind: str) -> list[list[str]]:
        """The rows (display form) of the configurations of this kind."""
        return [row for row, k in zip(self.rows, self.kinds) if k == kind]

    def row_of(self, kind: str) -> list[str] | None:
        """The first row of a configuration of this kind, or None."""
        return next(iter(self.rows_of(kind)), None)

    @property
    def metrics(self) -> list[str]:
        return self.columns[1:]

    @property
    def rows(self) -> list[list[str]]:
        """Each configuration's name and its values with their errors, as text."""
        return [[name, *(display(column, value, error) for column, value, error in zip(self.metrics, values, errors))]
                for name, values, errors in zip(self.names, self.values, self.stderrs)]

    def to_dict(self) -> dict[str, Any]:
        """Numbers, not text: {"columns": metrics, "rows": [{"configuration", "kind", "values", "stderrs"}]}
        (null where there is none, or it is NaN or inf)."""
        kinds = self.kinds or [None] * len(self.names)
        return {"columns": self.metrics,
                "rows": [{"configuration": name, "kind": kind, "values": _finite(values),
                          "stderrs": _finite(errors)}
                         for name, kind, values, errors in zip(self.names, kinds, self.values, self.stderrs)]}

    def within_error(self) -> list[tuple[str, list[str]]]:
        """(metric, configurations) where a configuration differs from the first one (the model
        as given) by less than the standard error of the difference: the two cannot be told apart."""
        found = []
        for j, metric in enumerate(self.metrics):
            base, base_error = self.values[0][j], self.stderrs[0][j]
            close = [name for name, values, errors in zip(self.names[1:], self.values[1:], self.stderrs[1:])
                     if None not in (base, base_error, values[j], errors[j])
                     and abs(values[j] - base) < math.hypot(base_error, errors[j])]
            if close:
                found.append((metric, close))
        return found

    def limit_notes(self, reading: str | None) -> list[str]:
        """When only some documents are read (`reading` says which: "--limit 5"; None or "" when
        every document is read): a lead line, then one "- metric: configurations" line per metric
        whose difference from the first configuration is smaller than its standard error."""
        if not reading or not self.names:
            return []
        close = self.within_error()
        if not close:
            return []
        return [f"with {reading}, these differ from {self.names[0]} by less than their standard error:",
                *(f"- {metric}: {', '.join(names)}" for metric, names in close)]


def display(column: str, value: float | None, error: float | None) -> str:
    """A table cell: accuracies to 4 decimals, perplexities to 3, with ± the standard error."""
    if value is None:
        return ""
    metric = column.removesuffix(" (lm-eval)").split(" ")[-1]
    digits = 4 if metric.startswith("acc") else 3
    text = f"{value:.{digits}f}"
    return text if error is None else f"{text} ± {error:.{digits}f}"


def _number(value: Any) -> float | None:
    """A metric or its stderr as a number, NaN or inf included (results hold them as text, see
    `metrics.plain`; the table shows "nan"); lm-eval's "N/A" (anything else) as None."""
    if isinstance(value, str) and value in NON_FINITE:
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _finite(values: list[float | None]) -> list[float | None]:
    return [None if value is None or not math.isfinite(value) else value for value in values]


# The headline metric of each task in tables (lm-eval reports all of them in the JSON).
HEADLINE_METRICS = {
    "wikitext": ("word_perplexity",),
    "lambada_openai": ("acc", "perplexity"),
}


def headline_columns(results: dict[str, dict[str, Any]], harness: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(task, metric) of each task's headline metrics in `results` (task -> metric -> value); for
    lm-eval tasks (`harness`, a run's "harness" entry) every metric lm-eval reports."""
    harness = harness or {}
    harness_tasks = harness.get("tasks", [])
    columns: list[tuple[str, str]] = []
    for task, metrics in results.items():
        if task in harness_tasks:
            columns += [(task, m) for m, v in metrics.items() if "_stderr" not in m and isinstance(v, (int, float))]
        elif task not in harness.get("results", ()):  # a group's subtasks stay in the JSON
            wanted = HEADLINE_METRICS.get(task, ("acc", "acc_norm"))
            columns += [(task, m) for m in wanted if m in metrics]
    return columns


def summary_table(runs: dict[str, dict[str, Any]]) -> SummaryTable:
    """Rows = configurations, columns = task metrics (+ average accuracy when there are several),
    each value with its standard error (the average's: that of a mean of independent tasks)."""
    first = next(iter(runs.values()))
    harness = first.get("harness", {})
    harness_tasks = harness.get("tasks", [])
    columns = headline_columns(first["results"], harness)
    # The average is the paper's: over the built-in tasks, whatever lm-eval tasks sit beside them.
    accuracy_columns = [(t, m) for t, m in columns if m == "acc" and t not in harness_tasks]
    table = SummaryTable(["configuration", *(f"{t} {m}" + (" (lm-eval)" if t in harness_tasks else "")
                                             for t, m in columns)])
    if len(accuracy_columns) > 1:
        table.columns.append("avg acc")
    for name, result in runs.items():
        metrics = result["results"]
        values = [_number(metrics[t][m]) for t, m in columns]
        errors = [_number(metrics[t].get(f"{m}_stderr")) for t, m in columns]
        if len(accuracy_columns) > 1:
            accuracies = [_number(metrics[t][m]) for t, m in accuracy_columns]
            spread = [_number(metrics[t].get(f"{m}_stderr")) for t, m in accuracy_columns]
            values.append(sum(accuracies) / len(accuracies) if None not in accuracies else None)
            errors.append(math.sqrt(sum(e * e for e in spread)) / len(spread) if None not in spread else None)
        table.names.append(name)
        table.kinds.append(result.get("ablation", {}).get("kind"))
        table.values.append(values)
        table.stderrs.append(errors)
    return table
