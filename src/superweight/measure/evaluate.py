"""One engine for every task: `evaluate` scores a model on the built-in tasks exactly as
lm-evaluation-harness (HF backend) would, and returns lm-eval's results layout.

The stages, each in its own module: the task table and its documents (`tasks`), the documents'
texts tokenised and cut into requests (`requests`), the requests scored on the model (`scoring`),
and the scores turned into each task's metrics (`metrics`); `limits` checks how much is evaluated.
"""

from __future__ import annotations

import platform
from typing import Any, Callable

import torch

from .. import distributed
from ..errors import UsageError
from ..versions import package_version
from .limits import check_limits, check_max_length
from .metrics import task_metrics
from .requests import Encoder, build_requests
from .scoring import Scorer
from .tasks import load_task, resolve_task_names

Progress = Callable[[str, int, int], None]


def evaluate(
    model,
    tokenizer,
    tasks: list[str] | str,
    *,
    data_dir: str | None = None,
    limit: int | None = None,
    batch_size: int | str = "auto",
    max_length: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Score `model` on lm-eval tasks; returns lm-eval's results layout plus data checksums.

    `limit` keeps the first N documents of each task; `batch_size` is the number of sequences per
    forward pass or "auto" (a token budget, halved on accelerator out-of-memory); `max_length`
    overrides the model's context length used for truncation and rolling windows.
    """
    names = resolve_task_names(tasks)
    check_limits(limit, max_length)
    if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size <= 0):
        raise UsageError(f"batch size must be a positive integer or 'auto', got {batch_size!r}")
    length = check_max_length(model, tokenizer, max_length)
    loaded = [load_task(name, data_dir, limit) for name in names]  # fail on missing data before any scoring
    encoder = Encoder(tokenizer)
    # Every task's requests before any scoring: a --max-length too short for one task fails at once.
    requests = [build_requests(task_data, encoder, length) for task_data in loaded]
    scorer = Scorer(model, batch_size)
    was_training = model.training
    model.eval()
    out: dict[str, Any] = {"results": {}, "n_samples": {}, "data_sha256": {}}
    try:
        for name, task_data, built in zip(names, loaded, requests):
            scored = scorer.score(built.requests, built.groups, _task_progress(progress, name, len(built.requests)))
            doc_scores = [[scored[i] for i in ids] for ids in built.doc_requests]
            # Rank 0 computes the metrics (every rank holds all scores); the others receive them.
            out["results"][name] = distributed.on_main(
                lambda: task_metrics(task_data.task.metrics, built.prompts, doc_scores, seed))
            out["n_samples"][name] = {"original": task_data.n_total, "effective": len(task_data.docs)}
            out["data_sha256"].update(task_data.sha256)
    finally:
        model.train(was_training)
    out["config"] = {
        "model": getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None),
        "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(scorer.device),
        "ranks": distributed.current().world_size,
        "batch_size": batch_size,
        "max_length": length,
        "limit": limit,
        "seed": seed,
        "prefix_token_id": encoder.prefix_token_id,
        "shared_prefix": scorer.packs_prefixes,
        "versions": {"torch": torch.__version__, "transformers": package_version("transformers"),
                     "python": platform.python_version()},
    }
    return out


def _task_progress(progress: Progress | None, name: str, total: int) -> Callable[[int], None]:
    """`progress(name, done, total)` now at 0, then as the scorer reports each batch's requests."""
    done = 0
    if progress:
        progress(name, 0, total)

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(name, done, total)

    return advance
