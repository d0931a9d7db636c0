"""A full super-weight study of one model (Yu et al. 2024): Table 1, the scale sweep, the stop-word
shift and the activation profile, with evaluation results cached so reruns are cheap.

Everything here applies ablations through `ablate.ablated` (bit-exact undo): a study leaves the
model exactly as it was given.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..edit import ablate
from .. import distributed
from ..model.adapters import adapter_for, decoder_layers, down_proj_tensor, layer_experts
from ..coords import SHARED_EXPERT, SuperWeight
from ..errors import UsageError
from ..measure.configurations import Configuration, SummaryTable, run_configurations
from ..files import atomic_directory
from ..measure.generate import Generation
from ..find.hooks import LayerStats, capture_layer_stats
from ..model.placement import execution_device
from .plots import pyplot, save_figure
from ..measure.tasks import load_task, resolve_task_names, wikitext_detokenize

DEFAULT_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)

# The paper zeroes ~7000 other large down-projection weights of Llama-7B (Table 1, "other outliers").
PAPER_OUTLIER_COUNT = 7000
PAPER_DOWN_PROJ_ELEMENTS = 32 * 4096 * 11008  # Llama-7B: 32 layers x [4096 x 11008]

STOP_WORDS_FILE = "stop_words.txt"  # in configs/: one word per line, '#' starts a comment
STOP_WORD_DOCUMENTS = 4  # wikitext test documents the stop-word shift reads (fewer with --limit)
STOP_WORD_TOKENS = 512  # their first tokens (fewer with --max-length)

# A study on a CPU without --limit reads fewer documents, so that the default model's whole study
# (10 configurations x 8 tasks) ends within 15 minutes on a 2-core CPU (docs/benchmarks.md,
# "`sw study` budget"). On an accelerator, or with --limit, every task reads what it is told.
ALL_DOCUMENTS = "all"  # --limit all: every document, on a CPU too
CPU_LIMIT = 40  # documents of each zero-shot task
CPU_WIKITEXT_LIMIT = 2  # wikitext documents: its 8192-token rolling windows dominate a CPU's time

REPORT_FILE = "REPORT.md"
JSON_FILE = "report.json"
SWEEP_PLOT = "scale_sweep.png"
PROFILE_PLOT = "activation_profile.png"
STOP_WORDS_PLOT = "stop_words.png"


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


def scale_sweep_configurations(super_weights: Sequence[SuperWeight], factors: Sequence[float]) -> list[Configuration]:
    """One configuration per factor s: the super weights multiplied by s.

    s = 1 is the original model: it touches nothing (no weights), so it costs no ablation.
    """
    if not super_weights:
        raise UsageError("the scale sweep needs at least one super weight")
    weights = tuple(super_weights)
    configurations = []
    for s in factors:
        if s == 1:
            configurations.append(Configuration("scale x1 (original)", (), "scale", 1.0))
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
                         seed: int = 0) -> list[Configuration]:
    """The rows of the paper's Table 1: original, super weights zeroed, the other largest outliers
    zeroed (super weights excluded), super weights zeroed with the super activation restored, and
    as many random weights zeroed."""
    if not super_weights:
        raise UsageError("a study needs at least one super weight (run `sw detect` or give --coords)")
    top = default_outlier_count(model) if top is None else top
    weights = tuple(super_weights)
    outliers = ablate.outlier_control(model, weights, top=top)
    random_weights = ablate.random_control(model, weights, seed=seed)
    return [
        Configuration("original"),
        Configuration("super weights zeroed", weights),
        Configuration(f"other {len(outliers)} outliers zeroed", tuple(outliers), control="outliers", control_top=top),
        Configuration("zeroed + activation restored", weights, restore_activation=True),
        Configuration("random control zeroed", tuple(random_weights), control="random", control_seed=seed),
    ]


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
    del effect["name"]
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
        from ..files import atomic_write_text

        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._path(key), json.dumps(value, indent=1, default=str) + "\n")


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


# ----------------------------------------------------------------------------- stop-word shift


@dataclass
class StopWordShift:
    """How zeroing the super weights moves next-token probability (paper Sec. 3.3, Fig. 5)."""

    stop_mass_original: float
    stop_mass_ablated: float
    total_mass_original: float  # sum of the mean distribution (~1: a sanity check)
    total_mass_ablated: float
    num_positions: int
    num_stop_tokens: int
    grows: list[dict[str, Any]] = field(default_factory=list)  # {token, text, original, ablated}
    shrinks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def load_stop_words(path: str | Path | None = None) -> list[str]:
    """The stop-word list: `path`, or configs/stop_words.txt."""
    from ..model.source import configs_dir

    path = Path(path) if path else configs_dir() / STOP_WORDS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UsageError(f"cannot read the stop-word list {path}: {e.strerror}; give a readable file") from None
    words = [line.split("#", 1)[0].strip() for line in lines]
    words = [w for w in words if w]
    if not words:
        raise UsageError(f"the stop-word list {path} is empty; put one word per line")
    return words


def stop_word_ids(tokenizer, stop_words: Sequence[str], vocab_size: int) -> list[int]:
    """Token ids whose decoded text, stripped and lower-cased, is a stop word."""
    wanted = {w.strip().lower() for w in stop_words if w.strip()}
    n = min(vocab_size, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    return [i for i, text in enumerate(texts) if text.strip().lower() in wanted]


def _mean_next_token_probs(model, batches: list[torch.Tensor], chunk: int = 128,
                           on_text: Callable[[], None] | None = None) -> tuple[torch.Tensor, int]:
    """Mean next-token distribution over all positions, as a [vocab] float64 vector."""
    total: torch.Tensor | None = None
    positions = 0
    with torch.inference_mode():
        for ids in batches:
            logits = model(input_ids=ids, use_cache=False).logits[0]  # [seq, vocab]
            if total is None:
                total = torch.zeros(logits.shape[-1], dtype=torch.float64)
            for start in range(0, logits.shape[0], chunk):
                part = logits[start:start + chunk].to(torch.float64).softmax(-1)
                total += part.sum(0).cpu()
            positions += logits.shape[0]
            del logits
            if on_text:
                on_text()
    if total is None:
        raise UsageError("the stop-word analysis needs at least one non-empty text")
    return total / positions, positions


def stop_word_shift(model, tokenizer, texts: Sequence[str], super_weights: Sequence[SuperWeight],
                    stop_words: Sequence[str] | None = None, *, max_tokens: int = STOP_WORD_TOKENS,
                    top_k: int = 10, progress: Callable[[int, int], None] | None = None) -> StopWordShift:
    """Compare the mean next-token distribution of the original and the super-weight-zeroed model.

    `progress(done, total)` is called after each forward pass (two per text)."""
    device = execution_device(model.get_input_embeddings())
    batches = []
    for text in texts:
        ids = list(tokenizer(text).input_ids)[:max_tokens]
        if ids:
            batches.append(torch.tensor([ids], device=device))
    passes = {"done": 0, "total": 2 * len(batches)}

    def on_text() -> None:
        passes["done"] += 1
        if progress:
            progress(passes["done"], passes["total"])

    if progress:
        progress(0, passes["total"])
    original, positions = _mean_next_token_probs(model, batches, on_text=on_text)
    with ablate.ablated(model, list(super_weights)):
        ablated_probs, _ = _mean_next_token_probs(model, batches, on_text=on_text)
    stop_words = load_stop_words() if stop_words is None else stop_words
    stop_ids = torch.tensor(stop_word_ids(tokenizer, stop_words, original.numel()), dtype=torch.long)
    diff = ablated_probs - original
    k = min(top_k, diff.numel())

    def describe(ids: torch.Tensor) -> list[dict[str, Any]]:
        return [{"token": int(i), "text": tokenizer.decode([int(i)]), "original": float(original[i]),
                 "ablated": float(ablated_probs[i])} for i in ids]

    return StopWordShift(
        stop_mass_original=float(original[stop_ids].sum()), stop_mass_ablated=float(ablated_probs[stop_ids].sum()),
        total_mass_original=float(original.sum()), total_mass_ablated=float(ablated_probs.sum()),
        num_positions=positions, num_stop_tokens=int(stop_ids.numel()),
        grows=describe(diff.topk(k).indices), shrinks=describe((-diff).topk(k).indices),
    )


def cached_stop_word_shift(cache: EvaluationCache, model_key: str, model, tokenizer,
                           super_weights: Sequence[SuperWeight], stop_words: Sequence[str], *,
                           data_dir: str | None = None, limit: int | None = None, max_length: int | None = None,
                           progress: Callable[[int, int], None] | None = None) -> tuple[StopWordShift, bool]:
    """`stop_word_shift` over the first wikitext test documents, bounded like the evaluations
    (`limit` documents at most, `max_length` tokens of each at most) and cached like them: the
    result and whether it came from `cache`."""
    documents = min(STOP_WORD_DOCUMENTS, limit) if limit else STOP_WORD_DOCUMENTS
    tokens = min(STOP_WORD_TOKENS, max_length) if max_length else STOP_WORD_TOKENS
    wikitext = load_task("wikitext", data_dir, documents)
    key = EvaluationCache.key_of([
        "stop_word_shift", model_key, [[w.layer, w.row, w.col, w.expert] for w in super_weights],
        sorted({w.strip().lower() for w in stop_words}), wikitext.sha256, documents, tokens,
    ])
    cached = cache.get(key)
    if cached is not None:
        return StopWordShift(**cached), True
    texts = [wikitext_detokenize(doc["page"]) for doc in wikitext.docs]  # as the evaluation scores them
    shift = stop_word_shift(model, tokenizer, texts, super_weights, stop_words, max_tokens=tokens, progress=progress)
    cache.put(key, shift.to_dict())
    return shift, False


# ----------------------------------------------------------------------------- activation profile


@dataclass
class ActivationProfile:
    """Per-layer max |down_proj input| / |output| before and after zeroing the super weights."""

    before: list[LayerStats]
    after: list[LayerStats]

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [
            {"layer": b.layer, "input_max_before": b.input_max, "input_max_after": a.input_max,
             "output_max_before": b.output_max, "output_max_after": a.output_max}
            for b, a in zip(self.before, self.after)
        ]}


def activation_profile(model, input_ids: torch.Tensor, super_weights: Sequence[SuperWeight]) -> ActivationProfile:
    device = execution_device(model.get_input_embeddings())
    input_ids = input_ids.to(device)

    def measure() -> list[LayerStats]:
        with capture_layer_stats(model) as stats, torch.inference_mode():
            model(input_ids=input_ids, use_cache=False)
        return stats

    before = measure()
    with ablate.ablated(model, list(super_weights)):
        after = measure()
    return ActivationProfile(before, after)


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


# The sweep's metrics: key in `sweep_rows`, label, log scale.
SWEEP_METRICS = (("perplexity", "wikitext word perplexity", True), ("avg_acc", "average accuracy", False))


def sweep_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(columns, rows) of the scale sweep: only the metrics the tasks measured, accuracies to 4
    decimals (as in Table 1), perplexities to 3."""
    present = [(key, label) for key, label, _ in SWEEP_METRICS if any(r.get(key) is not None for r in rows)]

    def cell(key: str, value: Any) -> str:
        if value is None:
            return ""
        return f"{value:.4f}" if key == "avg_acc" else f"{value:.3f}"

    return (["s", *(label if key == "perplexity" else "avg acc" for key, label in present)],
            [[f"{r['factor']:g}", *(cell(key, r.get(key)) for key, _ in present)] for r in rows])


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


# ----------------------------------------------------------------------------- report


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def _stop_word_section(shift: StopWordShift) -> list[str]:
    lines = [
        "## Stop-word shift (super weights zeroed)", "",
        f"Mean next-token probability on {shift.num_stop_tokens} stop-word tokens over {shift.num_positions} "
        f"positions: original {shift.stop_mass_original:.4f}, zeroed {shift.stop_mass_ablated:.4f}.", "",
    ]
    for title, entries in (("Grows most", shift.grows), ("Shrinks most", shift.shrinks)):
        lines += [f"### {title}", "", markdown_table(
            ("token", "text", "original", "zeroed"),
            [(e["token"], repr(e["text"]), e["original"], e["ablated"]) for e in entries]), ""]
    return lines


def _generations_section(generations: Sequence[Generation]) -> list[str]:
    lines = ["## Generations", ""]
    for prompt in dict.fromkeys(g.prompt for g in generations):
        chosen = [g for g in generations if g.prompt == prompt]
        lines += [f"Greedy continuation of {prompt!r} (at most {max(len(g.token_ids) for g in chosen)} tokens):", "",
                  markdown_table(("configuration", "continuation"), [(g.configuration, repr(g.text)) for g in chosen]),
                  ""]
    return lines


def write_report(out_dir: str | Path, *, force: bool = False, super_weights: Sequence[SuperWeight] = (),
                 table: SummaryTable | None = None,
                 sweep_rows: list[dict[str, Any]] | None = None, stop_words: StopWordShift | None = None,
                 profile: ActivationProfile | None = None, meta: dict[str, Any] | None = None,
                 verification: Any = None, generations: Sequence[Generation] | None = None) -> Path:
    """REPORT.md, report.json and the PNG plots, written atomically to `out_dir` (a non-empty
    `out_dir` is refused unless `force`)."""
    meta = dict(meta or {})
    document: dict[str, Any] = {"meta": meta}
    lines = ["# Super-weight study", ""]
    if meta.get("command"):
        lines += ["Command:", "", "```", str(meta["command"]), "```", ""]
    if meta.get("documents_note"):
        lines += [f"Documents: {meta['documents_note']}"
                  + (f" ({CPU_BUDGET_NOTE})." if meta.get("cpu_budget") else "."), ""]
    with atomic_directory(out_dir, force) as tmp:
        if super_weights:
            labels = verification.labels() if verification is not None else {}
            lines += ["## Super weights", "", "`down_proj.weight[row, col]` of `layer` (see docs/architectures.md); "
                      "effect: `sw detect --verify`'s label (README: How detection decides).", "",
                      markdown_table(("layer", "row", "col", "expert", "weight", "input act.", "output spike", "conc.",
                                      "share", "iter.", "effect"),
                                     [(w.layer, w.row, w.col, w.expert, w.value, w.input_activation,
                                       w.output_spike, w.concentration, w.share, w.iteration,
                                       labels.get(w.key, w.effect)) for w in super_weights]), ""]
            document["super_weights"] = [w.to_dict() for w in super_weights]
        if verification is not None:
            lines += [f"## Measured effect of each weight", "",
                      f"Perplexity on {verification.text_source} ({verification.num_tokens} tokens). "
                      f"Labels: {verification.to_dict()['rule']}.", "",
                      markdown_table(("configuration", "perplexity", "x original"), verification.rows()), ""]
            lines += [f"- prompt {c.prompt!r}: " + ("same coordinates" if c.same else "other coordinates: " + ", ".join(
                str(list(k[:3])) for k in c.coordinates)) for c in verification.prompts] + [""]
            document["verification"] = verification.to_dict()
        if table is not None:
            lines += ["## Table 1: zeroing super weights", "", markdown_table(table.columns, table.rows), ""]
            document["table"] = {"columns": table.columns, "rows": table.rows}
        if generations:
            lines += _generations_section(generations)
            document["generations"] = [g.to_dict() for g in generations]
        if sweep_rows:
            lines += ["## Scaling the super weights", "", markdown_table(*sweep_table(sweep_rows)), "",
                      f"![scale sweep]({SWEEP_PLOT})", ""]
            plot_scale_sweep(sweep_rows, tmp / SWEEP_PLOT)
            document["sweep"] = sweep_rows
        if stop_words is not None:
            lines += _stop_word_section(stop_words) + [f"![stop-word shift]({STOP_WORDS_PLOT})", ""]
            plot_stop_word_shift(stop_words, tmp / STOP_WORDS_PLOT)
            document["stop_words"] = stop_words.to_dict()
        if profile is not None:
            lines += ["## Activation profile", "", f"![activation profile]({PROFILE_PLOT})", ""]
            plot_activation_profile(profile.before, profile.after, tmp / PROFILE_PLOT)
            document["activation_profile"] = profile.to_dict()
        (tmp / REPORT_FILE).write_text("\n".join(lines), encoding="utf-8")
        (tmp / JSON_FILE).write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    return Path(out_dir)
