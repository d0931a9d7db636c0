"""How many tokens a model reads at once: a fact about the model (its config, else its tokenizer),
asked by detection (a prompt longer than that is refused), verification (its text is cut to it) and
evaluation (requests are rolled in windows of it)."""

from __future__ import annotations

from typing import Any

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer says
TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "model_max_length unset"


def model_max_length(model_or_config: Any, tokenizer) -> int:
    """lm-eval's `resolve_max_length`: config length attributes, then the tokenizer, then 2048.

    Takes a model or its config (a streamed checkpoint has only the config)."""
    config = getattr(model_or_config, "config", model_or_config)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit != TOKENIZER_INFINITY else DEFAULT_MAX_LENGTH
