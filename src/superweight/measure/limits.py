"""How much is evaluated: the documents of each task (`limit`) and the tokens of each request
(`max_length`), checked here once for every caller, and the model's own length (model/context.py)
when none is given."""

from __future__ import annotations

from ..errors import UsageError
from ..model.context import model_max_length


def check_limits(limit: int | None = None, max_length: int | None = None) -> None:
    """Refuse a `limit` below one document or a `max_length` below two tokens (one input, one
    target). Commands call it before a model loads; `evaluate` calls it for library callers."""
    if limit is not None and limit <= 0:
        raise UsageError(f"--limit must be a positive number of documents, got {limit}")
    if max_length is not None and max_length < 2:
        raise UsageError(f"--max-length must be at least 2 tokens, got {max_length}")


def check_max_length(model, tokenizer, max_length: int | None) -> int:
    """The tokens per request: `max_length`, or the model's context when none is given; one past
    the context is refused (GPT-2's family has no position there: an IndexError mid-evaluation)."""
    context = model_max_length(model, tokenizer)
    if max_length is not None and max_length > context:
        raise UsageError(f"--max-length {max_length} is more than this model reads ({context} tokens); "
                         f"give --max-length {context} or less, or leave it out")
    return max_length or context
