"""Scoped forward hooks on the down projections.

Every hook is registered inside a context manager and removed in `finally`, even when the forward
pass raises. Hooks reduce on the fly: per layer they keep a handful of scalars (maxima and where
they are), never whole activations, so memory stays flat in sequence length and model size.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from .arch import Adapter, adapter_for, decoder_layers, down_proj_matrix
from .placement import stored_tensor


@dataclass
class LayerStats:
    """Running reductions of one decoder layer's down projection for one forward pass.

    `spike_*` describe the largest value the MLP writes into the residual stream (after the
    post-feed-forward norm where the family has one); `col`/`expert` name the input channel whose
    product with the weight contributes most to that value at that token. The evidence fields
    (`concentration`, `share`, `residual_after`, `carried`) are what detect.SpikeRule decides on.
    """

    layer: int
    input_max: float = 0.0  # max |down_proj input| over tokens and channels
    input_token: int = -1
    input_channel: int = -1
    output_max: float = 0.0  # max |raw down_proj output|
    output_token: int = -1
    output_channel: int = -1
    spike: float = 0.0  # signed residual write at (spike_token, row)
    spike_token: int = -1
    row: int = -1
    col: int = -1
    expert: int | None = None
    col_input: float = 0.0  # down_proj input at (spike_token, col)
    col_weight: float = 0.0  # weight[row, col]
    residual_before: float = 0.0  # residual stream at (spike_token, row) entering the layer
    raw_output: float = 0.0  # raw down_proj output at (spike_token, row), before any post norm
    concentration: float = 0.0  # raw_output**2 / sum of the squared raw outputs at spike_token
    share: float = 0.0  # x[spike_token, col] * weight[row, col] / raw_output: one weight's part of it
    residual_after: float = 0.0  # residual stream at (spike_token, row) leaving the layer
    carried: list[float] = field(default_factory=list)  # ... and leaving each later layer


def _abs_argmax(x: torch.Tensor) -> tuple[float, int, int]:
    """Max |x| over a [tokens, channels] tensor and its (token, channel).

    Two levels — per-token max and min along channels, then the winning token's row — because a
    flat `argmax` runs single-threaded and `x.abs()` would allocate a copy as large as the
    activation: the hooks must stay cheap and their memory flat in sequence length.
    """
    x = x.detach()
    magnitude = torch.maximum(x.amax(dim=-1), -x.amin(dim=-1))
    token = int(magnitude.argmax())
    channel = int(x[token].abs().argmax())
    return abs(float(x[token, channel])), token, channel


def _set_raw_output_evidence(s: LayerStats, raw_output_t: torch.Tensor, contribution: float) -> None:
    """How one-hot the raw down_proj output is at the spike token, and how much of it one weight makes."""
    raw_output_t = raw_output_t.float()
    s.raw_output = float(raw_output_t[s.row])
    energy = float(raw_output_t.pow(2).sum())
    s.concentration = s.raw_output**2 / energy if energy > 0 else 0.0
    s.share = contribution / s.raw_output if s.raw_output else 0.0


def _first_sequence(t: torch.Tensor) -> torch.Tensor:
    """[batch, seq, dim] or [seq, dim] -> [seq, dim] of the first sequence (detection uses one)."""
    return t[0] if t.dim() == 3 else t


def _hidden_states_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class _DenseProbe:
    """Hooks of one dense layer: down_proj (input, raw output) and, if any, its post norm."""

    def __init__(self, stats: LayerStats, weight: Callable[[], torch.Tensor] | None,
                 output_is_residual_write: bool = True):
        self.stats = stats
        self.output_is_residual_write = output_is_residual_write
        # Looked up when the spike is located, not when the hook is registered: a streamed layer's
        # weights are only materialised while it runs (see stream.py).
        self.weight = weight  # -> [out, in] view
        self.down_input: torch.Tensor | None = None  # held only until the residual write is seen
        self.down_output: torch.Tensor | None = None
        self.residual_in: torch.Tensor | None = None

    def on_layer_input(self, module, args, kwargs):
        self.residual_in = _first_sequence(_hidden_states_arg(args, kwargs))

    def on_down_proj(self, module, args, output):
        x = _first_sequence(args[0])
        y = _first_sequence(output)
        s = self.stats
        s.input_max, s.input_token, s.input_channel = _abs_argmax(x)
        s.output_max, s.output_token, s.output_channel = _abs_argmax(y)
        self.down_input, self.down_output = x, y
        if self.output_is_residual_write:  # no norm in between: the spike is already located
            self._locate(y, s.output_token, s.output_channel)

    def on_residual_write(self, module, args, output):
        write = _first_sequence(output)
        _, token, row = _abs_argmax(write)
        self._locate(write, token, row)

    def _locate(self, write: torch.Tensor, token: int, row: int) -> None:
        s = self.stats
        s.spike_token, s.row = token, row
        s.spike = float(write[s.spike_token, s.row])
        x_t = self.down_input[s.spike_token]
        weight = self.weight()
        contribution = (x_t.to(weight.device, weight.dtype) * weight[s.row]).float()
        # The largest push in the spike's own direction (the raw output's sign, which a post-norm
        # gain may flip): a large weight working against the spike is not what writes it.
        direction = torch.sign(contribution.sum())
        s.col = int((contribution * direction).argmax() if direction else contribution.abs().argmax())
        s.col_input = float(x_t[s.col])
        s.col_weight = float(weight[s.row, s.col])
        _set_raw_output_evidence(s, self.down_output[s.spike_token], float(contribution[s.col]))
        if self.residual_in is not None:
            s.residual_before = float(self.residual_in[s.spike_token, s.row])
        self.down_input = self.down_output = None
        self.residual_in = None


class _ExpertsProbe(_DenseProbe):
    """Hooks of one fused mixture-of-experts block.

    The fused experts module never exposes an expert's down-projection input, so the hook
    recomputes it for the experts routed at the spike token only (top-k small vectors).
    """

    def __init__(self, stats: LayerStats, experts: nn.Module):
        super().__init__(stats, weight=None, output_is_residual_write=False)
        self.experts = experts

    def on_down_proj(self, module, args, output):
        hidden, top_k_index, top_k_weights = args[:3]
        y = _first_sequence(output)
        s = self.stats
        s.output_max, s.output_token, s.output_channel = _abs_argmax(y)
        s.spike_token, s.row = s.output_token, s.output_channel
        s.spike = float(y[s.spike_token, s.row])
        hidden_t = hidden[s.spike_token]
        # Offloaded experts are back on the meta device once their forward returns: read the store.
        gate_up_proj = stored_tensor(module, "gate_up_proj", writable=False)
        down_proj = stored_tensor(module, "down_proj", writable=False)
        hidden_t = hidden_t.to(down_proj.device)
        best = None
        for slot, expert in enumerate(top_k_index[s.spike_token].tolist()):
            gate, up = nn.functional.linear(hidden_t, gate_up_proj[expert]).chunk(2, dim=-1)
            x_e = module.act_fn(gate) * up
            route = top_k_weights[s.spike_token, slot].to(down_proj.device)
            # in the spike's own direction, as for dense layers
            contribution = route * x_e * down_proj[expert][s.row] * (1.0 if s.spike >= 0 else -1.0)
            col = int(contribution.argmax())
            input_max = float(x_e.abs().max())
            if input_max > s.input_max:
                s.input_max, s.input_token = input_max, s.spike_token
                s.input_channel = int(x_e.abs().argmax())
            if best is None or contribution[col] > best[0]:
                best = (contribution[col], expert, col, float(x_e[col]))
        best_contribution, s.expert, s.col, s.col_input = best
        s.col_weight = float(down_proj[s.expert][s.row, s.col])
        _set_raw_output_evidence(s, y[s.spike_token], float(best_contribution) * (1.0 if s.spike >= 0 else -1.0))
        if self.residual_in is not None:
            s.residual_before = float(self.residual_in[s.spike_token, s.row])
        self.residual_in = None


@contextmanager
def capture_layer_stats(model: nn.Module, adapter: Adapter | None = None) -> Iterator[list[LayerStats]]:
    """Within the block, every forward pass fills one `LayerStats` per decoder layer."""
    adapter = adapter or adapter_for(model)
    layers = decoder_layers(model, adapter)
    stats = [LayerStats(layer=i) for i in range(len(layers))]
    handles = []

    def on_layer_output(i: int):
        # The residual stream leaving layer i, read at the spike of layer i and of every earlier
        # layer (one gather per layer): whether the stream carries each spike on.
        def hook(module, args, output):
            hidden = _first_sequence(output[0] if isinstance(output, tuple) else output)
            watched = [s for s in stats[: i + 1] if s.spike_token >= 0]
            if not watched:
                return
            values = hidden[[s.spike_token for s in watched], [s.row for s in watched]].float().tolist()
            for s, value in zip(watched, values):
                if s.layer == i:
                    s.residual_after = value
                else:
                    s.carried.append(value)
        return hook

    try:
        for i, layer in enumerate(layers):
            down_proj = layer.get_submodule(adapter.down_proj)
            if adapter.experts:
                probe: _DenseProbe = _ExpertsProbe(stats[i], down_proj)
            else:
                # only read: a disk-offloaded matrix must not stay in memory (placement.py)
                probe = _DenseProbe(stats[i],
                                    lambda i=i: down_proj_matrix(model, i, adapter=adapter, writable=False).detach(),
                                    output_is_residual_write=adapter.post_norm is None)
            handles.append(layer.register_forward_pre_hook(probe.on_layer_input, with_kwargs=True))
            handles.append(layer.register_forward_hook(on_layer_output(i)))
            handles.append(down_proj.register_forward_hook(probe.on_down_proj))
            if adapter.post_norm:
                writer = layer.get_submodule(adapter.post_norm)
                handles.append(writer.register_forward_hook(probe.on_residual_write))
        yield stats
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def around_layers(layers: nn.ModuleList, before: Callable[[int], None], after: Callable[[int], None]) -> Iterator[None]:
    """Within the block, `before(i)` runs as decoder layer i starts and `after(i)` once it returns
    (layer streaming materialises a layer's weights in one and frees them in the other)."""
    handles = []
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(lambda module, args, i=i: before(i)))
            handles.append(layer.register_forward_hook(lambda module, args, output, i=i: after(i)))
        yield
    finally:
        for handle in handles:
            handle.remove()
