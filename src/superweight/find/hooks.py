"""Scoped forward hooks on the down projections.

Every hook is registered inside a context manager and removed in `finally`, even when the forward
pass raises. Per layer the result is a handful of scalars (maxima and where they are). A long pass
is reduced layer by layer as it runs, so memory stays flat in sequence length; a short one (the
detection prompt) keeps its small activations and reduces every layer at once after the last, in
a few operations instead of some forty per layer (what the hooks cost on a short prompt, on a CPU
and on a GPU alike).
"""

from __future__ import annotations

from contextlib import contextmanager
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ..model.adapters import SHARED_EXPERT, Adapter, adapter_for, decoder_layers, down_proj_module, down_proj_reader, is_moe_layer
from ..model.integrity import non_finite_error
from ..model.placement import stored_tensor

CARRY_DEPTH = 0.1  # the stream must carry a super activation through the next 10 % of the layers


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


# A pass over at most this many tokens is reduced once, after its last layer. It then holds, per
# dense layer, tokens x (intermediate + 2 x hidden) values: 1.2 MB for a 7B Llama in bfloat16.
DEFER_MAX_TOKENS = 32


def _abs_argmax_layers(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Max |x| of each layer of a [layers, tokens, channels] tensor, and its token and channel.

    Two levels, per-token max and min along channels, then the winning token's row: a flat
    `argmax` runs single-threaded and `x.abs()` would allocate a copy as large as the activations.
    """
    x = x.detach()
    magnitude = torch.maximum(x.amax(dim=-1), -x.amin(dim=-1))
    token = magnitude.argmax(dim=-1)
    layer = torch.arange(x.shape[0], device=x.device)
    rows = x[layer, token]
    channel = rows.abs().argmax(dim=-1)
    return rows[layer, channel].abs(), token, channel


def _abs_argmax(x: torch.Tensor) -> tuple[float, int, int]:
    """Max |x| over a [tokens, channels] tensor and its (token, channel)."""
    value, token, channel = _abs_argmax_layers(x[None])
    return float(value), int(token), int(channel)


def _set_raw_output_evidence(s: LayerStats, raw_output: float, energy: float, contribution: float) -> None:
    """How one-hot the raw down_proj output is at the spike token (`energy`: the sum of its squares
    there), and how much of it one weight makes."""
    s.raw_output = raw_output
    s.concentration = raw_output**2 / energy if energy > 0 else 0.0
    s.share = contribution / raw_output if raw_output else 0.0


def _first_sequence(t: torch.Tensor) -> torch.Tensor:
    """[batch, seq, dim] or [seq, dim] -> [seq, dim] of the first sequence (detection uses one)."""
    return t[0] if t.dim() == 3 else t


def _hidden_states_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class _DenseProbe:
    """Hooks of one dense layer: down_proj (input, raw output) and, if any, its post norm.

    They only keep the tensors; `_locate_layers` reduces them, as soon as the residual write is
    seen or, when the capture defers (a short prompt), for every layer at once after the last.
    """

    def __init__(self, stats: LayerStats, weight: Callable[[], torch.Tensor] | None,
                 output_is_residual_write: bool = True, residual_scale: float = 1.0):
        self.stats = stats
        self.output_is_residual_write = output_is_residual_write
        self.residual_scale = residual_scale  # what the residual add multiplies the raw output by
        # Looked up when the spike is located, not when the hook is registered: a streamed layer's
        # weights are only materialised while it runs (see stream.py).
        self.weight = weight  # -> [out, in] view
        self.defer = False  # set for each pass by the capture
        self.down_input: torch.Tensor | None = None  # held only until the spike is located
        self.down_output: torch.Tensor | None = None
        self.write: torch.Tensor | None = None  # what the layer adds to the residual stream
        self.residual_in: torch.Tensor | None = None

    def on_down_proj(self, module, args, output):
        x, y = _first_sequence(args[0]), _first_sequence(output)
        if self.defer:  # read after the pass, and the model may change them in place (Falcon adds to y)
            x, y = x.clone(), y.clone()
        self.down_input, self.down_output = x, y
        if self.output_is_residual_write:  # no norm in between
            self.write = y
            if not self.defer:
                _locate_layers([self])

    def on_residual_write(self, module, args, output):
        write = _first_sequence(output)
        self.write = write.clone() if self.defer else write
        if not self.defer:
            _locate_layers([self])

    def release(self) -> None:
        self.down_input = self.down_output = self.write = self.residual_in = None


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0][None] if len(tensors) == 1 else torch.stack(tensors)


def _locate_layers(probes: list[_DenseProbe]) -> None:
    """Fill the stats of dense layers whose down-projection tensors and residual writes are held:
    the maxima, the spike, the weight that writes it and the evidence the rule reads.

    Layers are reduced together where their tensors stack (same shapes, device and dtype): a
    handful of operations and one copy to the host for all of them, instead of some forty small
    ones per layer, which is what the hooks cost on a short prompt.
    """
    groups: dict[tuple, list[_DenseProbe]] = {}
    for p in probes:
        key = tuple(None if t is None else (t.shape, t.device, t.dtype)
                    for t in (p.down_input, p.down_output, p.write, p.residual_in))
        groups.setdefault((*key, p.output_is_residual_write), []).append(p)
    for group in groups.values():
        _locate_group(group)
        for p in group:
            p.release()


def _locate_group(group: list[_DenseProbe]) -> None:
    x = _stacked([p.down_input for p in group])  # [layers, tokens, intermediate]
    y = _stacked([p.down_output for p in group])  # [layers, tokens, hidden]
    layer = torch.arange(len(group), device=y.device)
    input_max, input_token, input_channel = _abs_argmax_layers(x)
    output_max, output_token, output_channel = _abs_argmax_layers(y)
    if group[0].output_is_residual_write:
        write, token, row = y, output_token, output_channel
    else:
        write = _stacked([p.write for p in group])
        _, token, row = _abs_argmax_layers(write)
    rows = row.tolist()
    x_t = x[layer, token]
    weight_rows = [p.weight()[r] for p, r in zip(group, rows)]
    weight_row = _stacked([w.to(x.device) for w in weight_rows])
    contribution = (x_t.to(weight_row.dtype) * weight_row).float()
    # The largest push in the spike's own direction (the raw output's sign, which a post-norm gain
    # may flip): a large weight working against the spike is not what writes it.
    total = contribution.sum(dim=-1, keepdim=True)
    col = torch.where(total == 0, contribution.abs(), contribution * total.sign()).argmax(dim=-1)
    raw = y[layer, token].float()
    residual_in = (_stacked([p.residual_in for p in group])[layer, token, row] if group[0].residual_in is not None
                   else torch.zeros_like(col, dtype=torch.float32))
    floats = torch.stack([v.float() for v in (
        input_max, output_max, write[layer, token, row], x_t[layer, col], weight_row[layer, col],
        contribution[layer, col], raw[layer, row], raw.pow(2).sum(dim=-1), residual_in)]).T.tolist()
    ints = torch.stack([input_token, input_channel, output_token, output_channel, token, col]).T.tolist()
    for p, r, (in_max, out_max, spike, col_input, col_weight, contributed, raw_output, energy, before), \
            (in_token, in_channel, out_token, out_channel, t, c) in zip(group, rows, floats, ints):
        s = p.stats
        s.input_max, s.input_token, s.input_channel = in_max, in_token, in_channel
        s.output_max, s.output_token, s.output_channel = out_max, out_token, out_channel
        s.spike_token, s.row, s.col = t, r, c
        s.spike = spike * p.residual_scale
        s.col_input, s.col_weight = col_input, col_weight
        _set_raw_output_evidence(s, raw_output, energy, contributed)
        s.residual_before = before


class _ExpertsProbe(_DenseProbe):
    """Hooks of one mixture-of-experts block: its fused experts, its shared expert if it has one,
    and its output (the sum the layer adds to the residual stream, or that its post norm reads).

    The fused experts module never exposes an expert's down-projection input, so the probe
    recomputes it for the experts routed at the spike token only (top-k small vectors); the shared
    expert's input is seen by a hook on its down projection (an nn.Linear).
    """

    def __init__(self, stats: LayerStats, experts: nn.Module, adapter: Adapter,
                 shared_down_proj: nn.Module | None = None):
        super().__init__(stats, weight=None, output_is_residual_write=False)
        self.experts = experts
        self.adapter = adapter
        self.shared_down_proj = shared_down_proj
        self.routed_args: tuple | None = None  # held only until the spike is located
        self.routed_output: torch.Tensor | None = None
        self.shared_input: torch.Tensor | None = None
        self.shared_output: torch.Tensor | None = None
        self.block_output: torch.Tensor | None = None

    def on_experts(self, module, args, output):
        self.routed_args, self.routed_output = args, output

    def on_shared_down_proj(self, module, args, output):
        self.shared_input, self.shared_output = _first_sequence(args[0]), _first_sequence(output)

    def on_block_output(self, module, args, output):
        y = _first_sequence(output[0] if isinstance(output, tuple) else output)
        s = self.stats
        s.output_max, s.output_token, s.output_channel = _abs_argmax(y)
        self.block_output = y
        if self.adapter.post_norm is None:  # the block's output is the residual write
            self._locate(y, s.output_token, s.output_channel)

    def on_residual_write(self, module, args, output):  # the post norm's output
        write = _first_sequence(output)
        _, token, row = _abs_argmax(write)
        self._locate(write, token, row)

    def _expert_input(self, hidden: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert `expert`'s down-projection input for the vector(s) `hidden` it was given."""
        module = self.experts
        # Offloaded experts are back on the meta device once their forward returns: read the store.
        gate_up = stored_tensor(module, "gate_up_proj", writable=False)[expert]
        hidden = hidden.to(gate_up.device, gate_up.dtype)
        gate_up_out = hidden @ gate_up if self.adapter.transposed else nn.functional.linear(hidden, gate_up)
        if getattr(module, "gate_up_proj_bias", None) is not None:
            gate_up_out = gate_up_out + stored_tensor(module, "gate_up_proj_bias", writable=False)[expert]
        if hasattr(module, "_apply_gate"):  # transformers' experts interface: the family's own gating
            return module._apply_gate(gate_up_out)
        gate, up = gate_up_out.chunk(2, dim=-1)
        return module.act_fn(gate) * up

    def _routed_candidates(self, token: int) -> list[tuple[int | str, torch.Tensor, torch.Tensor]]:
        """(expert, its down-projection input at `token`, the scale its output gets) per expert
        that ran at `token`."""
        args = self.routed_args
        if self.adapter.experts_call == "scaled_input":
            # Every expert's input, stacked [expert, token, hidden]; an expert not routed there got zeros.
            n_experts = self.experts.gate_up_proj.shape[0]
            stacked = args[0].reshape(n_experts, -1, args[0].shape[-1])
            return [(e, self._expert_input(stacked[e, token], e), torch.ones(()))
                    for e in range(n_experts) if bool(stacked[e, token].any())]
        hidden, top_k_index, top_k_weights = args[:3]
        return [(expert, self._expert_input(hidden[token], expert), top_k_weights[token, slot])
                for slot, expert in enumerate(top_k_index[token].tolist())]

    def _locate(self, write: torch.Tensor, token: int, row: int) -> None:
        s = self.stats
        s.spike_token, s.row = token, row
        s.spike = float(write[token, row])
        down_proj = stored_tensor(self.experts, "down_proj", writable=False)
        candidates = []  # (expert, input x at token, scale, weight row W[row, :])
        for expert, x_e, scale in self._routed_candidates(token):
            matrix = down_proj[expert].T if self.adapter.transposed else down_proj[expert]
            candidates.append((expert, x_e, scale, matrix[row]))
        if self.shared_input is not None:
            x_s = self.shared_input[token]
            shared_weight = stored_tensor(self.shared_down_proj, "weight", writable=False)
            candidates.append((SHARED_EXPERT, x_s, self._shared_scale(token), shared_weight[row]))
        contributions = [(scale.to(w.device).float() * x.to(w.device, w.dtype).float() * w.float())
                         for _, x, scale, w in candidates]
        # The largest push in the spike's own direction (as in the dense probe).
        direction = torch.sign(torch.tensor(sum(float(c.sum()) for c in contributions)))
        best = None
        for (expert, x, _, w), c in zip(candidates, contributions):
            scored = c * direction if direction else c.abs()
            col = int(scored.argmax())
            input_max = float(x.abs().max())
            if input_max > s.input_max:
                s.input_max, s.input_token, s.input_channel = input_max, token, int(x.abs().argmax())
            if best is None or scored[col] > best[0]:
                best = (scored[col], expert, col, float(x[col]), float(w[col]))
        if best is not None:
            _, s.expert, s.col, s.col_input, s.col_weight = best
            if self.block_output is not None:
                raw = self.block_output[token].float()
                _set_raw_output_evidence(s, float(raw[row]), float(raw.pow(2).sum()),
                                         float(best[0]) * (float(direction) or 1.0))
        if self.residual_in is not None:
            s.residual_before = float(self.residual_in[token, row])
        self.residual_in = self.routed_args = self.routed_output = None
        self.shared_input = self.shared_output = self.block_output = None

    def _shared_scale(self, token: int) -> torch.Tensor:
        """What the block multiplies the shared expert's output by at `token` (Qwen's sigmoid gate;
        1 elsewhere), read off the block's output: (block - routed) = scale x shared."""
        routed = self.routed_output.reshape(-1, self.routed_output.shape[-1])
        if self.adapter.experts_call == "scaled_input":  # one output per (expert, token): their sum
            routed = routed.reshape(-1, self.shared_output.shape[0], routed.shape[-1]).sum(0)
        shared = self.shared_output[token].float()
        gated = self.block_output[token].float() - routed[token].float()
        norm = float(shared @ shared)
        return torch.tensor(float(gated @ shared) / norm if norm > 0 else 1.0)


def carry_window(num_layers: int, depth: float = CARRY_DEPTH) -> int:
    """Through how many later layers the stream must carry a spike (detect.SpikeRule, rule 5)."""
    return max(1, math.ceil(depth * num_layers))


@contextmanager
def capture_layer_stats(model: nn.Module, adapter: Adapter | None = None, carry_layers: int | None = None,
                        defer: bool = True,
                        weights: Callable[[], Iterable[tuple[str, torch.Tensor]]] | None = None,
                        ) -> Iterator[list[LayerStats]]:
    """Within the block, every forward pass fills one `LayerStats` per decoder layer.

    `carried` holds the residual stream at a layer's spike leaving each of the next `carry_layers`
    layers (default `carry_window`): what the detection rule reads, and no more.

    A pass over at most DEFER_MAX_TOKENS tokens keeps its dense layers' small activations and
    reduces them all after the last layer (`defer`; layer streaming, whose weights are gone by then,
    turns it off); a longer one reduces each layer as it runs, so that memory stays flat in length.

    A pass whose stream leaves the last layer holding NaN or inf raises `integrity.non_finite_error`,
    which blames the first of `weights()` (name, tensor) holding one (default: the model's
    parameters in memory; layer streaming reads the checkpoint's), else the dtype.
    """
    adapter = adapter or adapter_for(model)
    weights = weights or model.named_parameters
    layers = decoder_layers(model, adapter)
    stats = [LayerStats(layer=i) for i in range(len(layers))]
    window = carry_layers or carry_window(len(layers))
    scale = float(getattr(model.config, adapter.residual_scale)) if adapter.residual_scale else 1.0
    handles = []

    def record_leaving(first: int, leaving: list[torch.Tensor]) -> None:
        """The residual stream leaving layers first, first + 1, ... (each the next layer's input),
        read at the spike of each such layer and of the `window` layers before it: whether the
        stream carries each on. One copy to the host per device, however many layers (a copy per
        layer would wait on the device once per layer)."""
        reads = []  # (layer, the stats watched there, the stream at their spikes)
        for i, hidden in enumerate(leaving, first):
            watched = [s for s in stats[max(0, i - window): i + 1] if s.spike_token >= 0]
            if watched:
                reads.append((i, watched, hidden[[s.spike_token for s in watched], [s.row for s in watched]]))
        on_host = {}
        for device in {values.device for *_, values in reads}:
            here = [values for *_, values in reads if values.device == device]
            on_host[device] = iter((here[0] if len(here) == 1 else torch.cat(here)).float().tolist())
        for i, watched, values in reads:  # in layer order: `carried` is appended to
            for s in watched:
                value = next(on_host[values.device])
                if s.layer == i:
                    s.residual_after = value
                else:
                    s.carried.append(value)

    dense: list[_DenseProbe] = []
    streams: list[torch.Tensor] = []  # a deferred pass: the stream entering each layer, then leaving the last
    deferring = False  # this pass's dense layers are reduced after its last layer

    def on_layer_input(i: int, probe: "_DenseProbe"):
        def hook(module, args, kwargs):
            nonlocal deferring
            hidden = _first_sequence(_hidden_states_arg(args, kwargs))
            if i == 0:
                deferring = bool(dense) and defer and hidden.shape[0] <= DEFER_MAX_TOKENS
                for p in dense:
                    p.defer = deferring
                streams.clear()
            if deferring:
                hidden = hidden.clone()  # read after the pass, and some families scale the stream in place
                streams.append(hidden)
            elif i > 0:
                record_leaving(i - 1, [hidden])
            probe.residual_in = hidden
        return hook

    def on_last_layer_output(module, args, output):
        hidden = _first_sequence(output[0] if isinstance(output, tuple) else output)
        # One reduction per pass: a NaN anywhere before (a corrupt attention weight, an overflow)
        # reaches this stream; the reads below wait on the device here anyway.
        if not bool(torch.isfinite(hidden).all()):
            raise non_finite_error(weights(), hidden.dtype,
                                   f"the residual stream leaving decoder layer {len(layers) - 1}")
        if not deferring:
            record_leaving(len(layers) - 1, [hidden])
            return
        _locate_layers(dense)
        record_leaving(0, [*streams[1:], hidden])
        streams.clear()

    try:
        for i, layer in enumerate(layers):
            if is_moe_layer(model, i, adapter):
                experts = layer.get_submodule(adapter.down_proj)
                shared = layer.get_submodule(adapter.shared_expert) if adapter.shared_expert else None
                probe: _DenseProbe = _ExpertsProbe(stats[i], experts, adapter, shared)
                handles.append(experts.register_forward_hook(probe.on_experts))
                if shared is not None:
                    handles.append(shared.register_forward_hook(probe.on_shared_down_proj))
                block = layer.get_submodule(adapter.down_proj.rpartition(".")[0])
                handles.append(block.register_forward_hook(probe.on_block_output))
            else:
                # only read: a disk-offloaded matrix must not stay in memory (placement.py)
                probe = _DenseProbe(stats[i], down_proj_reader(model, i, adapter=adapter, writable=False),
                                    output_is_residual_write=adapter.post_norm is None, residual_scale=scale)
                dense.append(probe)
                handles.append(down_proj_module(model, i, adapter).register_forward_hook(probe.on_down_proj))
            handles.append(layer.register_forward_pre_hook(on_layer_input(i, probe), with_kwargs=True))
            if i == len(layers) - 1:
                handles.append(layer.register_forward_hook(on_last_layer_output))
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
