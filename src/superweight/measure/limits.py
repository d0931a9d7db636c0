"""How much is evaluated: the documents of each task (`limit`) and the tokens of each request
(`max_length`), checked here once for every caller. The model's own length when none is given is
model/context.py's `model_max_length`."""

from __future__ import annotations

from ..errors import UsageError


def check_limits(limit: int | None = None, max_length: int | None = None) -> None:
    """Refuse a `limit` below one document or a `max_length` below two tokens (one input, one
    target). Commands call it before a model loads; `evaluate` calls it for library callers."""
    if limit is not None and limit <= 0:
        raise UsageError(f"--limit must be a positive number of documents, got {limit}")
    if max_length is not None and max_length < 2:
        raise UsageError(f"--max-length must be at least 2 tokens, got {max_length}")
