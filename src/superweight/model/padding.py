"""Which positions of the batch a model is running are padding, for hooks that must leave them out
(activation quantization takes its range over each sequence's own tokens), and whether such hooks
are on, so that whoever lays out the batch gives each request a sequence of its own.

Two sources, the first that applies: what the caller that padded the batch marked for the duration
of the pass (`marked`: the scorer right-pads its rows and gives no attention mask, since causal
attention never looks ahead at the pads), else the 2-D attention mask the pass was given (1 at a
token, 0 at padding, as in Hugging Face). Without either, every position counts as a token.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

_MARKED: "weakref.WeakKeyDictionary[nn.Module, torch.Tensor]" = weakref.WeakKeyDictionary()
_PER_SEQUENCE: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()


@contextmanager
def per_sequence_hooks(model: nn.Module) -> Iterator[None]:
    """Within the block, hooks of `model` compute a statistic over each whole sequence (activation
    quantization's range), so a sequence must hold one request: requests that share a prefix in one
    row would share a statistic that each computes alone (see `sequences_must_stand_alone`)."""
    _PER_SEQUENCE[model] = _PER_SEQUENCE.get(model, 0) + 1
    try:
        yield
    finally:
        _PER_SEQUENCE[model] -= 1
        if not _PER_SEQUENCE[model]:
            del _PER_SEQUENCE[model]


def sequences_must_stand_alone(model: nn.Module) -> bool:
    """Whether `per_sequence_hooks` is on for `model`: then each request runs as its own sequence."""
    return model in _PER_SEQUENCE


@contextmanager
def marked(model: nn.Module, tokens: torch.Tensor) -> Iterator[None]:
    """Within the block, the passes of `model` run on a batch whose tokens are `tokens`
    ([batch, positions] bool, False at padding)."""
    _MARKED[model] = tokens
    try:
        yield
    finally:
        _MARKED.pop(model, None)


@contextmanager
def token_positions(model: nn.Module) -> Iterator[Callable[[torch.Tensor], torch.Tensor | None]]:
    """Within the block, `tokens_of(x)` is the [batch, positions] bool mask (False at padding) of
    the pass that computes `x` ([batch, positions, channels]), on x's device; None where every
    position counts (nothing marked, no 2-D attention mask, or one of another shape than x's)."""
    given: dict[str, torch.Tensor | None] = {"mask": None}

    def on_forward(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        given["mask"] = mask if torch.is_tensor(mask) and mask.dim() == 2 else None

    def tokens_of(x: torch.Tensor) -> torch.Tensor | None:
        mask = _MARKED.get(model)
        if mask is None and given["mask"] is not None:
            mask = given["mask"][:, -x.shape[-2]:] != 0  # with a cache, the mask covers the past too
        if mask is None or x.dim() != 3 or tuple(mask.shape) != tuple(x.shape[:-1]):
            return None
        return mask.to(x.device, torch.bool)

    # The decoder stack: also a pass that skips the output head (the scorer's split head) passes it.
    handle = getattr(model, "base_model", model).register_forward_pre_hook(on_forward, with_kwargs=True)
    try:
        yield tokens_of
    finally:
        handle.remove()
