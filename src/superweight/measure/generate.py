"""What the model says: greedy continuations of prompts under each configuration, side by side.

The paper's Figure 1 in practice: the original model continues "My favourite condiment is"
sensibly, the super weights zeroed make it babble, and writing the super activation back
(`restore.restored_activation`) brings the sentence back. Decoding is plain greedy (argmax), token by
token. With the KV cache (the default, as every serving stack runs) each new token is a forward pass
of one position, so the restoration hook sees the prompt once and then one position at a time; it
must act there too, and `use_cache=False` (the whole sequence every step) gives the same tokens.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..find.detect import encode_prompt
from ..errors import UsageError
from .configurations import Configuration, applied
from ..model.context import model_max_length
from ..model.placement import execution_device

DEFAULT_PROMPT = "My favourite condiment is"  # Yu et al. 2024, Figure 1
DEFAULT_MAX_NEW_TOKENS = 16


@dataclass
class Generation:
    configuration: str
    kind: str  # the configuration's kind (configurations.KINDS), where every command's --json keeps one
    prompt: str
    token_ids: list[int]  # the continuation only, without the prompt
    text: str

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def check_prompts(prompts: Sequence[str] | None) -> list[str]:
    """The prompts to continue (default: the paper's); an empty one is a usage error."""
    prompts = [DEFAULT_PROMPT] if not prompts else list(prompts)
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError("--prompt is empty; give a non-empty prompt (default: \"My favourite condiment is\")")
    return prompts


def check_max_new_tokens(max_new_tokens: int) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be a positive number of tokens, got {max_new_tokens!r}")
    return max_new_tokens


def check_fits(model, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> None:
    """Each prompt and its continuation within the model's context (GPT-2's family has no position
    past it); refused before any configuration is applied, not an IndexError mid-decoding. The last
    new token is never fed back, so a prompt of n tokens needs n + max_new_tokens - 1 positions."""
    context = model_max_length(model, tokenizer)
    for prompt in prompts:
        length = encode_prompt(tokenizer, prompt, max_length=context).shape[-1]
        if length + max_new_tokens - 1 > context:
            raise UsageError(f"the prompt is {length} tokens and --max-new-tokens {max_new_tokens}; this model reads "
                             f"at most {context}; give at most {context - length + 1} --max-new-tokens or a shorter --prompt")


def _stop_ids(model, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops = set(ids) if isinstance(ids, (list, tuple)) else ({ids} if ids is not None else set())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        stops.add(tokenizer.eos_token_id)
    return stops


def _cache_argument(model) -> str:
    """transformers 5 renamed the forward's `past_key_values` (and the output's) to `cache`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def greedy_continuation(model, tokenizer, prompt: str, max_new_tokens: int, *, use_cache: bool = True) -> list[int]:
    """Up to `max_new_tokens` argmax tokens after `prompt` (fewer when an end-of-sequence token comes).

    With `use_cache` the prompt is run once and every later step feeds only the newest token with
    the cached keys and values; without it the whole sequence is run again at every step.
    """
    device = execution_device(model.get_input_embeddings())
    ids = encode_prompt(tokenizer, prompt).to(device)
    stops = _stop_ids(model, tokenizer)
    cache_name = _cache_argument(model)
    new: list[int] = []
    past = None
    with torch.inference_mode():
        step_input = ids
        for _ in range(max_new_tokens):
            if use_cache:
                out = model(input_ids=step_input, use_cache=True, **({cache_name: past} if past is not None else {}))
                past = out[cache_name]
            else:
                out = model(input_ids=ids, use_cache=False)
            token = int(out.logits[0, -1].argmax())
            new.append(token)
            if token in stops:
                break
            step_input = torch.tensor([[token]], device=device)
            ids = torch.cat([ids, step_input], dim=-1)
    return new


def generate(model, tokenizer, configurations: Sequence[Configuration], prompts: Sequence[str] | None = None, *,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, use_cache: bool = True) -> list[Generation]:
    """Greedy continuations of every prompt under every configuration (prompt-major order).

    Each configuration is applied in place and undone bit-exactly (`experiments.applied`), so the
    model is as it was given afterwards, also when generation fails.
    """
    prompts = check_prompts(prompts)
    check_max_new_tokens(max_new_tokens)
    check_fits(model, tokenizer, prompts, max_new_tokens)
    continuations: list[list[list[int]]] = []  # per configuration, per prompt
    for configuration in configurations:
        with applied(model, configuration):
            continuations.append([greedy_continuation(model, tokenizer, prompt, max_new_tokens, use_cache=use_cache)
                                  for prompt in prompts])
    return [Generation(c.name, c.kind, prompt, ids[i], tokenizer.decode(ids[i], skip_special_tokens=True))
            for i, prompt in enumerate(prompts) for c, ids in zip(configurations, continuations)]
