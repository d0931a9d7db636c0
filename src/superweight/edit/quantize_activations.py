"""Round-to-nearest quantization of the down projections' input, naive and super-activation aware
(Yu et al. 2024, Sec. 4.1).

Fake (simulated) quantization, as for the weights (`edit.quantize`): the input is quantized and
dequantized in a forward pre-hook, in the model's own dtype; the hooks are removed on exit.

Per-tensor asymmetric min-max round-to-nearest of the down projections' *input* (one scale for the
whole [batch, tokens, channels] tensor, 8 bits by default as in the paper's W8A8).
Super-activation aware: in the super weights' layers, the super activation is held out: the
entries of the super weights' input channel `col` whose magnitude is at least `SPIKE_FRACTION`
(0.5) x the largest |x[..., col]| of their sequence are replaced by the median of the whole tensor,
the tensor is quantized, and those entries are put back at their exact original values.
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
from .quantize import check_bits, checked_super_weights, round_to_nearest

DEFAULT_ACTIVATION_BITS = 8
SPIKE_FRACTION = 0.5  # |x[..., col]| >= this x the sequence's largest counts as the super activation


def fake_quantize_per_tensor(x: torch.Tensor, bits: int = DEFAULT_ACTIVATION_BITS) -> torch.Tensor:
    """Asymmetric min-max RTN of the whole tensor with one scale; same shape and dtype."""
    bits = check_bits(bits, "activation")
    flat = x.detach().float()
    if flat.numel() == 0:
        return x.detach().clone()
    return round_to_nearest(flat, flat.min(), flat.max(), bits).to(x.dtype)


def super_activation_mask(x: torch.Tensor, cols: Iterable[int], fraction: float = SPIKE_FRACTION) -> torch.Tensor:
    """Boolean mask of the super activation in a down-projection input `x` [..., tokens, channels]:
    the entries of channel `col` (each of `cols`) with |x| >= `fraction` x the largest |x[..., col]|
    of their sequence (so the largest itself always counts)."""
    if x.dim() < 2:
        raise UsageError(f"expected a [..., tokens, channels] activation, got shape {tuple(x.shape)}")
    mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    for col in cols:
        column = x[..., col].detach().abs()  # [..., tokens]
        mask[..., col] |= column >= fraction * column.amax(dim=-1, keepdim=True)
    return mask


def fake_quantize_activation_aware(
    x: torch.Tensor, bits: int = DEFAULT_ACTIVATION_BITS, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Replace the `mask`ed entries (the super activation) with the tensor's median, quantize per
    tensor, then put the masked entries back at their exact original values.

    The median is torch's (the lower of the two middle values for an even count), over all entries.
    """
    bits = check_bits(bits, "activation")
    if mask is None or not bool(mask.any()):
        return fake_quantize_per_tensor(x, bits)
    source = x.detach()
    held_out = torch.where(mask, source.float().median(), source.float())
    out = fake_quantize_per_tensor(held_out, bits).to(x.dtype)
    return torch.where(mask, source, out)


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
    """Within the block, every down projection's input is fake-quantized per tensor at `bits`.

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

    def make_hook(layer_cols: list[int]) -> Callable:
        def hook(module, args, kwargs):
            if not args or not torch.is_tensor(args[0]):
                return None
            x = args[0]
            stats.calls += 1
            if layer_cols:
                mask = super_activation_mask(x, layer_cols, spike_fraction)
                stats.held_out += int(mask.sum())
                quantized = fake_quantize_activation_aware(x, bits, mask)
            else:
                quantized = fake_quantize_per_tensor(x, bits)
            return (quantized, *args[1:]), kwargs

        return hook

    handles = []
    try:
        for layer in range(len(decoder_layers(model, adapter))):
            module = down_proj_module(model, layer, adapter)
            handles.append(module.register_forward_pre_hook(make_hook(cols.get(layer, [])), with_kwargs=True))
        yield stats
    finally:
        for handle in handles:
            handle.remove()
