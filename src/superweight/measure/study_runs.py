"""What a super-weight study evaluates (Yu et al. 2024): Table 1's configurations, the scale
sweep, how many documents each task reads (the CPU budget), and the evaluation cache that makes
a rerun cheap.

Every configuration is applied through `ablate.ablated` (bit-exact undo): a study leaves the
model exactly as it was given.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from .. import distributed
from ..coords import SHARED_EXPERT, SuperWeight
from ..edit import ablate
from ..edit.ablate import ablated_name, control_name
from ..errors import UsageError
from ..files import atomic_write_text
from ..model.adapters import adapter_for, decoder_layers, down_proj_tensor, layer_experts
from .configurations import Configuration, run_configurations
from .tasks import resolve_task_names

DEFAULT_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)

# The paper zeroes ~7000 other large down-projection weights of Llama-7B (Table 1, "other outliers").
PAPER_OUTLIER_COUNT = 7000
PAPER_DOWN_PROJ_ELEMENTS = 32 * 4096 * 11008  # Llama-7B: 32 layers x [4096 x 11008]

# A study on a CPU without --limit reads fewer documents, so that the default model's whole study
# (10 configurations x 8 tasks) ends within 15 minutes on a 2-core CPU (docs/benchmarks.md,
# "`sw study` budget"). On an accelerator, or with --limit, every task reads what it is told.
ALL_DOCUMENTS = "all"  # --limit all: every document, on a CPU too
CPU_LIMIT = 40  # documents of each zero-shot task
CPU_WIKITEXT_LIMIT = 2  # wikitext documents: its 8192-token rolling windows dominate a CPU's time


# ----------------------------------------------------------------------------- configurations


def parse_grid(text: str | None) -> list[float]:
    """"0,0.5,1" -> [0.0, 0.5, 1.0] (sorted, repeats dropped); None -> the default grid 0..3 step 0.5."""
    if text is None:
        return list(DEFAULT_GRID)
    factors = []
    for item in text.split(","):
        try:
            value = float(item.strip())
        except ValueError:
            raise UsageError(f"--grid must be comma-separated numbers like 0,0.5,1,2; '{item.strip()}' is not a number") from None
        if not math.isfinite(value):
            raise UsageError(f"--grid values must be finite numbers, got '{item.strip()}'")
        factors.append(value)
    return sorted(set(factors))


def scale_sweep_configurations(super_weights: Sequence[SuperWeight], factors: Sequence[float],
                               unchanged: str = "original") -> list[Configuration]:
    """One configuration per factor s: the super weights multiplied by s.

    s = 1 is the model as given (`unchanged` names it, as Table 1's first row): it touches nothing
    (no weights), so it costs no ablation.
    """
    if not super_weights:
        raise UsageError("the scale sweep needs at least one super weight")
    weights = tuple(super_weights)
    configurations = []
    for s in factors:
        if s == 1:
            configurations.append(Configuration(f"scale x1 ({unchanged})", (), "scale", 1.0))
        else:
            configurations.append(Configuration(f"scale x{s:g}", weights, "scale", float(s)))
    return configurations


def down_proj_elements(model: nn.Module) -> int:
    adapter = adapter_for(model)
    # The modules' own parameters (all experts of a fused block in one): their shapes hold on the
    # meta device too, so an offloaded model has nothing read from disk for a count.
    tensors = {}  # by id: a layer's fused experts are one parameter
    for layer in range(len(decoder_layers(model, adapter))):
        for expert in (None, SHARED_EXPERT) if SHARED_EXPERT in layer_experts(model, layer, adapter) else (None,):
            tensor = getattr(*down_proj_tensor(model, layer, expert, adapter))
            tensors[id(tensor)] = tensor.numel()
    return sum(tensors.values())


def default_outlier_count(model: nn.Module) -> int:
    """The paper's ~7000 outliers of Llama-7B, scaled by this model's down-projection size (>= 1)."""
    return max(1, round(PAPER_OUTLIER_COUNT * down_proj_elements(model) / PAPER_DOWN_PROJ_ELEMENTS))


def study_configurations(model: nn.Module, super_weights: Sequence[SuperWeight], *, top: int | None = None,
                         seed: int = 0, unchanged: str = "original") -> list[Configuration]:
    """The rows of the paper's Table 1, each named by what it zeroed: original (`unchanged`), the
    super weights zeroed, the other largest outliers zeroed (super weights excluded), the super
    weights zeroed with the super activation restored, and as many random weights zeroed."""
    if not super_weights:
        raise UsageError("a study needs at least one super weight (run `sw detect` or give --coords)")
    top = default_outlier_count(model) if top is None else top
    weights = tuple(super_weights)
    outliers = ablate.outlier_control(model, weights, top=top)
    random_weights = ablate.random_control(model, weights, seed=seed)
    return [
        Configuration(unchanged),
        Configuration(ablated_name(weights), weights),
        Configuration(control_name(outliers, "outliers"), tuple(outliers), control="outliers", control_top=top),
        Configuration(ablated_name(weights, restore_activation=True), weights, restore_activation=True),
        Configuration(control_name(random_weights, "random"), tuple(random_weights), control="random",
                      control_seed=seed),
    ]


# ----------------------------------------------------------------------------- limits


def parse_limit(limit: int | str | None) -> int | str | None:
    """`--limit`: a number of documents (checked later), "all", or None (the device decides)."""
    if limit is None or limit == ALL_DOCUMENTS or isinstance(limit, int) and not isinstance(limit, bool):
        return limit
    text = str(limit).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    raise UsageError(f"--limit must be a number of documents or {ALL_DOCUMENTS}, got '{limit}'")


def task_limits(tasks: Sequence[str], limit: int | str | None, on_cpu: bool) -> dict[str, int | None]:
    """Documents each task reads (None: all): `limit` for every task ("all": every document);
    without one, every document on an accelerator, and on a CPU `CPU_LIMIT` per zero-shot task and
    `CPU_WIKITEXT_LIMIT` of wikitext."""
    if limit == ALL_DOCUMENTS or (limit is None and not on_cpu):
        return {task: None for task in tasks}
    if limit is None:
        return {task: CPU_WIKITEXT_LIMIT if task == "wikitext" else CPU_LIMIT for task in tasks}
    return {task: limit for task in tasks}


CPU_BUDGET_NOTE = (f"the CPU budget of a study without --limit; --limit {ALL_DOCUMENTS} reads every document, "
                   "--limit N the first N of each task")


def documents_note(limits: dict[str, int | None]) -> str:
    """How many documents the tasks read, in words ("" when every task reads every document)."""
    def first(n: int | None) -> str:
        return "every document" if n is None else "the first document" if n == 1 else f"the first {n} documents"

    counts = sorted(set(limits.values()), key=lambda n: (n is None, n))
    if counts == [None]:
        return ""
    if len(counts) == 1:
        return f"{first(counts[0])} of each task"
    return "; ".join(f"{first(n)} of " + ", ".join(task for task, m in limits.items() if m == n) for n in counts)


# ----------------------------------------------------------------------------- evaluation cache


def _task_slice(result: dict[str, Any], task: str) -> dict[str, Any]:
    return {
        "results": result["results"][task],
        "n_samples": result.get("n_samples", {}).get(task),
        "data_sha256": {k: v for k, v in result.get("data_sha256", {}).items() if k.startswith(f"{task}/")},
        "config": result.get("config"),
    }


def _effect(configuration: Configuration) -> dict[str, Any]:
    """What a configuration does to the model, whatever it is called: the sweep's s = 1 is the
    original model and its s = 0 is Table 1's zeroed row, so each is evaluated once."""
    if not configuration.weights:
        return {"original": True}
    effect = configuration.describe()
    del effect["name"], effect["kind"]
    if effect["mode"] == "scale" and effect["factor"] == 0:
        effect["mode"] = "zero"
    if effect["mode"] == "zero":
        effect["factor"] = None
    return effect


class EvaluationCache:
    """One JSON file per (model, configuration, task, limit, max_length) evaluation result."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    @staticmethod
    def key(model_key: str, configuration: Configuration, task: str, limit: int | None,
            max_length: int | None) -> str:
        return EvaluationCache.key_of([model_key, _effect(configuration), task, limit, max_length])

    @staticmethod
    def key_of(identity: Any) -> str:
        """The key of any JSON-able description of a result (all its inputs)."""
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # missing or unreadable (e.g. truncated): evaluate again

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._path(key), json.dumps(value, indent=1, default=str) + "\n")


def run_cached(cache: EvaluationCache, model_key: str, model, tokenizer, configurations: list[Configuration],
               tasks: list[str] | str, **options) -> dict[str, Any]:
    """Like `run_configurations`, but (configuration, task) pairs found in `cache` are not evaluated.

    `limit` may be a mapping task -> documents (`task_limits`) as well as one number for all."""
    names = resolve_task_names(tasks)
    limit, max_length = options.pop("limit", None), options.get("max_length")
    limits = dict(limit) if isinstance(limit, dict) else {task: limit for task in names}
    runs: dict[str, Any] = {}
    for configuration in configurations:
        keys = {task: cache.key(model_key, configuration, task, limits[task], max_length) for task in names}
        # Rank 0 holds the cache (the others may have no access to its disk) and tells them what it has.
        slices = distributed.on_main(lambda: {task: cache.get(key) for task, key in keys.items()})
        missing = [task for task in names if slices[task] is None]
        for group in dict.fromkeys(limits[task] for task in missing):  # one evaluation per document count
            tasks_of_group = [task for task in missing if limits[task] == group]
            fresh = run_configurations(model, tokenizer, [configuration], tasks_of_group, limit=group,
                                       **options)[configuration.name]
            for task in tasks_of_group:
                slices[task] = _task_slice(fresh, task)
                if distributed.is_main():
                    cache.put(keys[task], slices[task])
        runs[configuration.name] = {
            "results": {task: slices[task]["results"] for task in names},
            "n_samples": {task: slices[task]["n_samples"] for task in names},
            "data_sha256": {k: v for task in names for k, v in slices[task]["data_sha256"].items()},
            "config": slices[names[-1]]["config"],
            "ablation": configuration.describe(),
            "cached_tasks": [task for task in names if task not in missing],
        }
    return runs


def sweep_rows(runs: dict[str, Any], configurations: Sequence[Configuration]) -> list[dict[str, Any]]:
    """Per sweep configuration: factor, wikitext word perplexity (if evaluated), average accuracy."""
    rows = []
    for configuration in configurations:
        results = runs[configuration.name]["results"]
        accuracies = [m["acc"] for m in results.values() if isinstance(m.get("acc"), (int, float))]
        perplexity = results.get("wikitext", {}).get("word_perplexity")
        rows.append({"factor": configuration.factor, "perplexity": perplexity,
                     "avg_acc": sum(accuracies) / len(accuracies) if accuracies else None})
    return rows


# The sweep's metrics: key in `sweep_rows`, label, log scale.
SWEEP_METRICS = (("perplexity", "wikitext word perplexity", True), ("avg_acc", "average accuracy", False))
