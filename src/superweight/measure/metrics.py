"""Every metric, defined once: what one document contributes, how a task's documents aggregate,
and the standard error reported beside the value (lm-eval's `process_results`, `aggregation` and
`stderr_for_metric`).

A task row in `tasks.TASKS` lists the `Metric`s it reports; `task_metrics` computes exactly those
and nothing else, so a new task is one row there and a new metric one `Metric` here. The
definitions follow lm-eval's, so the numbers equal its numbers:
  acc, acc_norm    mean over documents of "the most likely choice (per character for acc_norm) is
                   the gold one"; stderr = sample std / sqrt(n)
  acc (greedy)     mean of "every continuation token is the argmax prediction" (LAMBADA)
  perplexity       exp(-mean log-likelihood); stderr bootstrapped (lm-eval bootstraps it too)
  word_perplexity, byte_perplexity, bits_per_byte
                   weighted by each document's words or bytes: exp(-sum ll / sum weight) and
                   -sum ll / sum bytes / ln 2; lm-eval reports no stderr for them ("N/A")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:  # types only: the task table imports this module
    from .scoring import Scored
    from .tasks import Prompt

BOOTSTRAP_RESAMPLES = 1000  # perplexity stderr (lm-eval also bootstraps perplexity)
NO_STDERR = "N/A"  # lm-eval's mark for a stderr it does not or cannot compute

DocValue = Callable[["Prompt", Sequence["Scored"]], Any]


@dataclass(frozen=True)
class Metric:
    name: str  # the key in the results, its stderr beside it as `<name>_stderr`
    per_doc: DocValue  # one document's prompt and scored requests -> its value
    aggregate: Callable[[list], float]  # the documents' values -> the task's value
    stderr: Callable[[list, int], float | str]  # the documents' values, seed -> standard error


# ----------------------------------------------------------------------------- per document


def _choice_logprobs(scores: Sequence[Scored]) -> np.ndarray:
    return np.array([s.logprob for s in scores])


def _is_gold(choice_scores: np.ndarray, gold: int) -> float:
    """1.0 when the highest-scoring choice is the gold one (ties go to the first, as np.argmax);
    NaN when a score is NaN: an overflowing pass picks nothing (np.argmax would pick the NaN)."""
    if np.isnan(choice_scores).any():
        return math.nan
    return float(np.argmax(choice_scores) == gold)


def most_likely_is_gold(prompt: Prompt, scores: Sequence[Scored]) -> float:
    return _is_gold(_choice_logprobs(scores), prompt.gold)


def most_likely_per_character_is_gold(prompt: Prompt, scores: Sequence[Scored]) -> float:
    lengths = np.array([float(len(choice)) for choice in prompt.choices])
    return _is_gold(_choice_logprobs(scores) / lengths, prompt.gold)


def greedy_match(prompt: Prompt, scores: Sequence[Scored]) -> float:
    return math.nan if math.isnan(scores[0].logprob) else float(scores[0].greedy)  # as `_is_gold`


def loglikelihood(prompt: Prompt, scores: Sequence[Scored]) -> float:
    return scores[0].logprob


def _document_loglikelihood(scores: Sequence[Scored]) -> float:
    return sum(s.logprob for s in scores)  # a rolling document: the sum over its windows


def loglikelihood_and_words(prompt: Prompt, scores: Sequence[Scored]) -> tuple[float, int]:
    return _document_loglikelihood(scores), prompt.words


def loglikelihood_and_bytes(prompt: Prompt, scores: Sequence[Scored]) -> tuple[float, int]:
    return _document_loglikelihood(scores), prompt.bytes


# ----------------------------------------------------------------------------- aggregation


def mean(values: list[float]) -> float:
    return float(np.asarray(values, dtype=float).mean())


def perplexity(logprobs: list[float]) -> float:
    return float(np.exp(-np.asarray(logprobs).mean()))


def _weighted_mean(pairs: list[tuple[float, int]]) -> float:
    return sum(ll for ll, _ in pairs) / sum(weight for _, weight in pairs)


def weighted_perplexity(pairs: list[tuple[float, int]]) -> float:
    return math.exp(-_weighted_mean(pairs))


def bits_per_byte(pairs: list[tuple[float, int]]) -> float:
    return -_weighted_mean(pairs) / math.log(2)


# ----------------------------------------------------------------------------- standard errors


def mean_stderr(values: list[float], seed: int) -> float | str:
    arr = np.asarray(values, dtype=float)
    return float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else NO_STDERR


def perplexity_stderr(logprobs: list[float], seed: int) -> float | str:
    """Bootstrap stderr of exp(-mean log-likelihood), seeded for reproducibility."""
    if len(logprobs) < 2:
        return NO_STDERR
    values = np.asarray(logprobs)
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(values), size=(BOOTSTRAP_RESAMPLES, len(values)))
    return float(np.exp(-values[samples].mean(axis=1)).std(ddof=1))


def no_stderr(values: list, seed: int) -> str:
    return NO_STDERR


# ----------------------------------------------------------------------------- the table

ACC = Metric("acc", most_likely_is_gold, mean, mean_stderr)
ACC_NORM = Metric("acc_norm", most_likely_per_character_is_gold, mean, mean_stderr)
GREEDY_ACC = Metric("acc", greedy_match, mean, mean_stderr)
PERPLEXITY = Metric("perplexity", loglikelihood, perplexity, perplexity_stderr)
WORD_PERPLEXITY = Metric("word_perplexity", loglikelihood_and_words, weighted_perplexity, no_stderr)
BYTE_PERPLEXITY = Metric("byte_perplexity", loglikelihood_and_bytes, weighted_perplexity, no_stderr)
BITS_PER_BYTE = Metric("bits_per_byte", loglikelihood_and_bytes, bits_per_byte, no_stderr)


def task_metrics(metrics: Sequence[Metric], prompts: Sequence[Prompt], doc_scores: Sequence[Sequence[Scored]],
                 seed: int = 0) -> dict[str, Any]:
    """Each metric's value over the documents (`doc_scores[d]`: document d's scored requests, in
    its prompt's order), its stderr beside it, as lm-eval lays out a task's results."""
    results: dict[str, Any] = {}
    for metric in metrics:
        values = [metric.per_doc(prompt, scores) for prompt, scores in zip(prompts, doc_scores)]
        results[metric.name] = plain(metric.aggregate(values))
        results[metric.name + "_stderr"] = plain(metric.stderr(values, seed))
    return results


def plain(value: Any) -> Any:
    """A metric as results hold it, JSON-safe: a Python number (numpy scalars unwrapped), NaN or
    inf as the text "nan", "inf", "-inf" (JSON has none: Python would write a bare NaN that other
    parsers reject), lm-eval's "N/A" as itself."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
