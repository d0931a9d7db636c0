"""Round-to-nearest quantization of the down projections' input, naive and super-activation aware
(Yu et al. 2024, Sec. 4.1).

Fake (simulated) quantization, as for the weights (`edit.quantize`): the input is quantized and
dequantized in a forward pre-hook, in the model's own dtype; the hooks are removed on exit.

Per-sequence asymmetric min-max round-to-nearest of the down projections' *input* (8 bits by
default as in the paper's W8A8): one scale per sequence of the batch (per row of [batch, tokens,
channels]), its range taken over that sequence's tokens, padding left out (`model.padding`): the
paper's per-tensor scale, taken for each sequence as if it ran alone. One scale for the whole
padded batch, as before, made a document's score depend on the documents batched with it and on
the padding (docs/benchmarks.md).
Super-activation aware: in the super weights' layers, the super activation is held out: the
entries of the super weights' input channel `col` whose magnitude is at least `SPIKE_FRACTION`
(0.5) x the largest |x[..., col]| of their sequence are replaced by the median of their sequence,
the sequence is quantized, and those entries are put back at their exact original values.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..coords import SuperWeight
from ..errors import UsageError
from ..model.adapters import Adapter, adapter_for, decoder_layers, down_proj_module
from ..model.padding import per_sequence_hooks, token_positions
from .quantize import check_bits, checked_super_weights, round_to_nearest

DEFAULT_ACTIVATION_BITS = 8
SPIKE_FRACTION = 0.5  # |x[..., col]| >= this x the sequence's largest counts as the super activation


def _per_sequence(x: torch.Tensor, tokens: torch.Tensor | None, padding_value: float,
                  reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`reduce` (over the last dimension) of each sequence's entries of `x` [..., positions,
    channels] (a [positions, channels] tensor is one sequence, a 1-D one too), the entries at
    padding (False in `tokens`, [..., positions]) set to `padding_value`, which `reduce` must pass
    over; shaped to broadcast against x."""
    if tokens is not None:
        x = torch.where(tokens[..., None].expand(x.shape), x, torch.tensor(padding_value, device=x.device))
    if x.dim() < 2:
        return reduce(x)
    return reduce(x.reshape(*x.shape[:-2], -1))[..., None, None]


def fake_quantize_per_sequence(x: torch.Tensor, bits: int = DEFAULT_ACTIVATION_BITS,
                               tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Asymmetric min-max RTN of `x` [..., positions, channels] with one scale per sequence, its
    range over the sequence's `tokens` ([..., positions] bool, False at padding; default: all);
    same shape and dtype. Padding is quantized with its sequence's scale (a pad reads nothing back)."""
    bits = check_bits(bits, "activation")
    flat = x.detach().float()
    if flat.numel() == 0:
        return x.detach().clone()
    lo = _per_sequence(flat, tokens, torch.inf, lambda v: v.amin(dim=-1))
    hi = _per_sequence(flat, tokens, -torch.inf, lambda v: v.amax(dim=-1))
    empty = lo > hi  # a sequence of padding only: any range will do
    lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
    return round_to_nearest(flat, lo, hi, bits).to(x.dtype)


def super_activation_mask(x: torch.Tensor, cols: Iterable[int], fraction: float = SPIKE_FRACTION,
                          tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the super activation in a down-projection input `x` [..., positions, channels]:
    the entries of channel `col` (each of `cols`) with |x| >= `fraction` x the largest |x[..., col]|
    of their sequence's `tokens` ([..., positions] bool, False at padding; default: all), so the
    largest itself always counts and padding never does."""
    if x.dim() < 2:
        raise UsageError(f"expected a [..., tokens, channels] activation, got shape {tuple(x.shape)}")
    mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    for col in cols:
        column = x[..., col].detach().abs()  # [..., positions]
        if tokens is not None:
            column = torch.where(tokens, column, torch.zeros_like(column))
        mask[..., col] |= column >= fraction * column.amax(dim=-1, keepdim=True)
    return mask if tokens is None else mask & tokens[..., None]


def fake_quantize_activation_aware(
    x: torch.Tensor, bits: int = DEFAULT_ACTIVATION_BITS, mask: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Replace the `mask`ed entries (the super activation) with their sequence's median, quantize
    per sequence (`fake_quantize_per_sequence`), then put the masked entries back at their exact
    original values.

    The median is torch's (the lower of the two middle values for an even count), over all entries
    of the sequence's `tokens` (default: all positions).
    """
    bits = check_bits(bits, "activation")
    if mask is None or not bool(mask.any()):
        return fake_quantize_per_sequence(x, bits, tokens)
    source = x.detach().float()
    median = _per_sequence(source, tokens, torch.nan, lambda v: v.nanmedian(dim=-1).values)
    held_out = torch.where(mask, median, source)
    out = fake_quantize_per_sequence(held_out, bits, tokens).to(x.dtype)
    return torch.where(mask, x.detach(), out)


@dataclass
class ActivationQuantizationStats:
    """Filled while `quantized_activations` is active: forward calls and held-out entries."""

    calls: int = 0
    held_out: int = 0


def check_activations_supported(model: nn.Module) -> Adapter:
    """The model's adapter row, or `UsageError` where its down projections' input cannot be quantized
    here (fused mixture-of-experts down projections)."""
    return check_adapter_activations(adapter_for(model))


def check_adapter_activations(adapter: Adapter) -> Adapter:
    """`check_activations_supported` on an adapter row (a config's, before its weights load)."""
    if adapter.experts:
        raise UsageError("activation quantization of fused mixture-of-experts down projections is not supported yet; "
                         "drop --activations for this model")
    return adapter


@contextmanager
def quantized_activations(
    model: nn.Module,
    bits: int = DEFAULT_ACTIVATION_BITS,
    super_weights: Sequence[SuperWeight] | None = None,
    *,
    spike_fraction: float = SPIKE_FRACTION,
) -> Iterator[ActivationQuantizationStats]:
    """Within the block, every down projection's input is fake-quantized per sequence at `bits`,
    padding left out of each sequence's range (see `model.padding`). Meanwhile the scorer gives each
    request a row of its own: requests that share a prefix in one row would share one range.

    With `super_weights`, the layers that hold them keep their super activation out of the
    quantization (see `super_activation_mask`, `fake_quantize_activation_aware`); other layers are
    quantized naively. Dense families only. Hooks are removed on exit, also when the block raises.
    """
    bits = check_bits(bits, "activation")
    if isinstance(spike_fraction, bool) or not isinstance(spike_fraction, (int, float)) or not 0 < spike_fraction <= 1:
        raise UsageError(f"the spike fraction must be a number in (0, 1], got {spike_fraction!r}")
    adapter = check_activations_supported(model)
    weights = checked_super_weights(model, super_weights)
    cols: dict[int, list[int]] = {}
    for w in weights:
        if w.col not in cols.setdefault(w.layer, []):
            cols[w.layer].append(w.col)
    stats = ActivationQuantizationStats()

    def make_hook(layer_cols: list[int], tokens_of: Callable) -> Callable:
        def hook(module, args, kwargs):
            if not args or not torch.is_tensor(args[0]):
                return None
            x = args[0]
            tokens = tokens_of(x)
            stats.calls += 1
            if layer_cols:
                mask = super_activation_mask(x, layer_cols, spike_fraction, tokens)
                stats.held_out += int(mask.sum())
                quantized = fake_quantize_activation_aware(x, bits, mask, tokens)
            else:
                quantized = fake_quantize_per_sequence(x, bits, tokens)
            return (quantized, *args[1:]), kwargs

        return hook

    handles = []
    with token_positions(model) as tokens_of, per_sequence_hooks(model):
        try:
            for layer in range(len(decoder_layers(model, adapter))):
                module = down_proj_module(model, layer, adapter)
                handles.append(module.register_forward_pre_hook(make_hook(cols.get(layer, []), tokens_of),
                                                                with_kwargs=True))
            yield stats
        finally:
            for handle in handles:
                handle.remove()
