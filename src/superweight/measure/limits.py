"""How much is evaluated: the documents of each task (`limit`) and the tokens of each request
(`max_length`), checked here once for every caller, and the model's own length when none is given."""

from __future__ import annotations

from ..errors import UsageError

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer says
TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "model_max_length unset"


def check_limits(limit: int | None = None, max_length: int | None = None) -> None:
    """Refuse a `limit` below one document or a `max_length` below two tokens (one input, one
    target). Commands call it before a model loads; `evaluate` calls it for library callers."""
    if limit is not None and limit <= 0:
        raise UsageError(f"--limit must be a positive number of documents, got {limit}")
    if max_length is not None and max_length < 2:
        raise UsageError(f"--max-length must be at least 2 tokens, got {max_length}")


def model_max_length(model, tokenizer) -> int:
    """lm-eval's `resolve_max_length`: config length attributes, then the tokenizer, then 2048."""
    config = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit != TOKENIZER_INFINITY else DEFAULT_MAX_LENGTH
