"""How zeroing the super weights moves next-token probability towards stop words (Yu et al.
2024, Sec. 3.3, Fig. 5): the mean next-token distribution over wikitext, before and after.

Zeroing goes through `ablate.ablated` (bit-exact undo); results are cached like the evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..coords import SuperWeight
from ..edit import ablate
from ..errors import UsageError
from ..model.source import configs_dir
from ..model.placement import execution_device
from .study_runs import EvaluationCache
from .tasks import load_task, wikitext_detokenize

STOP_WORDS_FILE = "stop_words.txt"  # in configs/: one word per line, '#' starts a comment
STOP_WORD_DOCUMENTS = 4  # wikitext test documents the stop-word shift reads (fewer with --limit)
STOP_WORD_TOKENS = 512  # their first tokens (fewer with --max-length)


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
    path = Path(path) if path else configs_dir() / STOP_WORDS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UsageError(f"cannot read the stop-word list {path}: {e.strerror}; give a readable file") from None
    except UnicodeDecodeError:
        raise UsageError(f"the stop-word list {path} is not UTF-8 text; give a UTF-8 file, one word per line") from None
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
