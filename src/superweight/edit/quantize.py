"""Round-to-nearest quantization, naive and super-outlier aware (Yu et al. 2024, Sec. 4).

Everything here is *fake* (simulated) quantization: values are quantized and dequantized at once
and stored back in the model's own dtype, so the effect on quality can be measured with the usual
evaluation, and everything is undone exactly afterwards.

Weights (paper Sec. 4.2)
    Asymmetric min-max round-to-nearest on 1-D blocks of `block_size` consecutive elements of the
    flattened [out, in] weight matrix (the last block may be shorter):

        scale = (max - min) / (2^bits - 1),  zero = round(-min / scale)
        q     = clamp(round(w / scale) + zero, 0, 2^bits - 1),   w_hat = (q - zero) * scale

    so |w - w_hat| <= scale / 2 in every block. A constant block (scale 0) is kept as it is.
    Super-weight aware: weights whose z-score over the whole tensor, (w - mean) / std, exceeds `z`
    in magnitude are clipped to mean +/- z * std *before* quantizing (so they no longer stretch
    their block's range), and the super weights are written back at their original values after.
    With `z="auto"` the threshold is chosen per matrix, without data: of `AUTO_Z_GRID` (no
    clipping included), the one whose quantized matrix, super weights restored, has the least
    *largest* absolute error against the original (ties go to the least clipping). So no weight
    of a matrix ends further from its value than the worst weight of naive RTN: a threshold that
    cuts the large weights deep is never chosen. Least *squared* error was the first rule tried
    and was far worse on SmolLM2: it trades the few large weights (this model's channel-507
    outliers, which carry its massive activation) for the many small ones
    (docs/results/smollm2-135m/quantize.md).
    `quantized_weights(model, ...)` applies this to every weight matrix (>= 2-D parameter) of the
    decoder layers, which is what the authors' code quantizes (all decoder `*.weight` except norms;
    embeddings and the LM head untouched); it restores the model bit-identically on exit.

Activations (paper Sec. 4.1)
    Per-tensor asymmetric min-max round-to-nearest of the down projections' *input* (one scale
    for the whole [batch, tokens, channels] tensor, 8 bits by default as in the paper's W8A8).
    Super-activation aware: in the super weights' layers, the super activation is held out: the
    entries of the super weights' input channel `col` whose magnitude is at least
    `SPIKE_FRACTION` (0.5) x the largest |x[..., col]| of their sequence are replaced by the median
    of the whole tensor, the tensor is quantized, and those entries are put back at their exact
    original values.

Drivers: `weight_quantization_sweep` (naive vs super-weight-aware perplexity per block size),
`activation_quantization_compare` (naive vs super-activation-aware per bit width), both through
`superweight.evaluate.evaluate`; `default_block_sizes` scales the paper's block grid to a model;
`plot_sweep` draws perplexity against block size.

Paper settings (Yu et al. 2024, arXiv 2411.07191; authors' code github.com/mengxiayu/LLMSuperWeight,
mirrored as cyita/LLMSuperWeight): INT4 weights, block sizes 16,384 / 65,536 / 262,144 / 1,048,576
and whole tensor for 7B models, z-score clipping threshold 9 (README, "Block-wise Weight
Quantization"); W8A8 for activations. The authors' z-score is computed on |w| (threshold
mean|w| + z * std|w|, clamp to +/- threshold); here it is the signed z-score over the tensor
(clamp to mean +/- z * std), which for zero-centred weights is nearly the same.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..model.adapters import adapter_for, decoder_layers, down_proj_module, down_proj_tensor
from ..coords import SuperWeight
from ..errors import UsageError

DEFAULT_WEIGHT_BITS = 4
DEFAULT_ACTIVATION_BITS = 8
DEFAULT_Z = 9.0  # the authors' z-score clipping threshold for INT4 (README, clip_4_<block>_z_9)
AUTO_Z = "auto"  # choose the threshold per matrix (see the module docstring)
AUTO_Z_GRID = (3.0, 4.0, 5.0, 6.0, 8.0, 9.0, 12.0, 16.0, 24.0, 32.0, None)  # None: no clipping
PAPER_BLOCK_SIZES = (16_384, 65_536, 262_144, 1_048_576)  # Llama-7B, down_proj 11008 x 4096
SPIKE_FRACTION = 0.5  # |x[..., col]| >= this x the sequence's largest counts as the super activation
MIN_BITS, MAX_BITS = 2, 8
SMALLEST_DEFAULT_BLOCK = 64


# --------------------------------------------------------------------------------------------
# Validation


def check_bits(bits: Any, what: str = "weight") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise UsageError(f"{what} bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}; use e.g. 4 or 8")
    return bits


def check_block_size(block_size: Any) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise UsageError(f"block size must be a positive integer number of weights, got {block_size!r}; use e.g. 4096")
    return block_size


def check_z(z: Any) -> float | str | None:
    """A positive finite number, "auto" (chosen per matrix), or None (no clipping)."""
    if z is None or z == AUTO_Z:
        return z
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not math.isfinite(z) or z <= 0:
        raise UsageError(f"the z-score clipping threshold must be a positive number, got {z!r}; the paper uses {DEFAULT_Z:g}, or {AUTO_Z}")
    return float(z)


def parse_z(text: str) -> float | str:
    """`--z`: a number, or "auto"."""
    if text == AUTO_Z:
        return AUTO_Z
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--z must be a positive number or {AUTO_Z}, got '{text}'") from None
    return check_z(value)


def check_block_sizes(block_sizes: Iterable[Any]) -> list[int]:
    sizes = [check_block_size(b) for b in block_sizes]
    if not sizes:
        raise UsageError("no block sizes given; give at least one, e.g. 4096 (or use default_block_sizes(model))")
    return sizes


def _check_bits_list(bits: int | Iterable[int], what: str) -> list[int]:
    values = [bits] if isinstance(bits, int) else list(bits)
    if not values:
        raise UsageError(f"no {what} bit widths given; give at least one, e.g. 8")
    return [check_bits(b, what) for b in values]


# --------------------------------------------------------------------------------------------
# Tensor-level quantizers


def _levels(bits: int) -> int:
    return (1 << bits) - 1


def _rtn(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric RTN of float32 `x` with broadcastable per-group min `lo` / max `hi`."""
    levels = _levels(bits)
    scale = (hi - lo) / levels
    constant = scale == 0
    safe = torch.where(constant, torch.ones_like(scale), scale)
    zero = torch.round(-lo / safe)
    q = torch.clamp(torch.round(x / safe) + zero, 0, levels)
    return torch.where(constant, x, (q - zero) * safe)


def block_scales(tensor: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """The per-block scales (max - min) / (2^bits - 1), float32, one per block (last may be partial)."""
    check_bits(bits)
    check_block_size(block_size)
    flat = tensor.detach().reshape(-1).float()
    return torch.stack([(b.max() - b.min()) / _levels(bits) for b in flat.split(block_size)]) if flat.numel() else flat


def fake_quantize_blockwise(tensor: torch.Tensor, bits: int = DEFAULT_WEIGHT_BITS, block_size: int = 4096) -> torch.Tensor:
    """Quantize and dequantize `tensor` in blocks of `block_size` consecutive elements (row-major).

    Returns a new tensor of the same shape and dtype; the input is not modified. The arithmetic is
    float32; a last block shorter than `block_size` gets its own scale; a constant block is
    returned unchanged.
    """
    bits = check_bits(bits)
    block_size = check_block_size(block_size)
    flat = tensor.detach().reshape(-1).float()
    n = flat.numel()
    if n == 0:
        return tensor.detach().clone()
    full = (n // block_size) * block_size
    parts = []
    if full:
        blocks = flat[:full].view(-1, block_size)
        lo, hi = blocks.amin(1, keepdim=True), blocks.amax(1, keepdim=True)
        parts.append(_rtn(blocks, lo, hi, bits).reshape(-1))
    if full < n:
        tail = flat[full:]
        parts.append(_rtn(tail, tail.min(), tail.max(), bits))
    return torch.cat(parts).view(tensor.shape).to(tensor.dtype)


def zscore_clip(tensor: torch.Tensor, z: float) -> tuple[torch.Tensor, int]:
    """(`tensor` clipped to mean +/- z * std of the whole tensor, number of values clipped).

    float32 result; mean and (unbiased) std are computed over every element, in float64.
    """
    z = check_z(z)
    if not isinstance(z, float):
        raise UsageError(f"zscore_clip needs a numeric z-score threshold; the paper uses {DEFAULT_Z:g}")
    x = tensor.detach().float()
    wide = x.double()
    mean = wide.mean()
    std = wide.std() if x.numel() > 1 else torch.zeros((), dtype=torch.float64)
    lo, hi = float(mean - z * std), float(mean + z * std)
    clipped = int(((x < lo) | (x > hi)).sum())
    return x.clamp(lo, hi), clipped


def _unique(weights: Iterable[SuperWeight]) -> list[SuperWeight]:
    unique: dict[tuple, SuperWeight] = {}
    for w in weights:
        unique.setdefault(w.key, w)
    return list(unique.values())


def _positions(tensor: torch.Tensor, positions: Iterable[Sequence[int]] | None) -> list[tuple[int, ...]]:
    out = []
    for p in positions or ():
        index = tuple(int(i) for i in p)
        if len(index) != tensor.dim() or any(not 0 <= i < s for i, s in zip(index, tensor.shape)):
            raise UsageError(
                f"super-weight position {index} does not fit a tensor of shape {tuple(tensor.shape)}; "
                "was it made for another model?"
            )
        out.append(index)
    return out


def fake_quantize_superweight_aware(
    tensor: torch.Tensor,
    bits: int = DEFAULT_WEIGHT_BITS,
    block_size: int = 4096,
    z: float | None = DEFAULT_Z,
    super_weight_positions: Iterable[Sequence[int]] | None = (),
) -> torch.Tensor:
    """Clip |z-score| > `z` outliers to mean +/- z * std, quantize blockwise, restore the super weights.

    `super_weight_positions` are index tuples into `tensor` (e.g. (row, col) of an [out, in]
    matrix); those elements come back bit-exactly as they were. `z=None` skips the clipping;
    `z="auto"` picks it from `AUTO_Z_GRID` for this tensor (`auto_z`).
    Returns a new tensor of the same shape and dtype.
    """
    bits = check_bits(bits)
    block_size = check_block_size(block_size)
    return _quantize_aware(tensor, bits, block_size, check_z(z), _positions(tensor, super_weight_positions))[0]


def auto_z(tensor: torch.Tensor, bits: int = DEFAULT_WEIGHT_BITS, block_size: int = 4096,
           super_weight_positions: Iterable[Sequence[int]] | None = ()) -> float | None:
    """The threshold of `AUTO_Z_GRID` (None: no clipping) whose super-weight-aware quantization of
    `tensor` has the least largest absolute error against it; a tie goes to the least clipping."""
    bits = check_bits(bits)
    block_size = check_block_size(block_size)
    return _auto_z(tensor, bits, block_size, _positions(tensor, super_weight_positions))


def _auto_z(tensor: torch.Tensor, bits: int, block_size: int, positions: list[tuple[int, ...]]) -> float | None:
    reference = tensor.detach().float()
    best, best_error = None, math.inf
    for z in reversed(AUTO_Z_GRID):  # least clipping first, so it wins a tie
        quantized, _ = _quantize_aware(tensor, bits, block_size, z, positions)
        error = float((quantized.float() - reference).abs().max()) if reference.numel() else 0.0
        if error < best_error:
            best, best_error = z, error
    return best


def _quantize_aware(
    tensor: torch.Tensor, bits: int, block_size: int, z: float | str | None, positions: list[tuple[int, ...]]
) -> tuple[torch.Tensor, int]:
    """(quantized copy, number of values clipped); arguments already checked."""
    source = tensor.detach()
    if z == AUTO_Z:
        z = _auto_z(source, bits, block_size, positions)
    clipped, n_clipped = zscore_clip(source, z) if z is not None else (source, 0)
    out = fake_quantize_blockwise(clipped, bits, block_size).to(tensor.dtype)
    for index in positions:
        out[index] = source[index]
    return out, n_clipped


# --------------------------------------------------------------------------------------------
# Model weights


@dataclass
class _Target:
    """One quantized parameter: its name, the parameter, whether it is stored [in, out] (GPT-2
    Conv1D), and the super weights it holds as {expert or None: [(row, col), ...]}."""

    name: str
    param: nn.Parameter
    transposed: bool
    super_positions: dict[int | None, list[tuple[int, int]]]


@dataclass
class WeightQuantizationRecord:
    """What `quantize_model_weights` did; `originals` (CPU copies) undo it bit-exactly."""

    bits: int
    block_size: int
    z: float | str | None
    super_weights: list[SuperWeight]
    names: list[str]
    originals: list[tuple[nn.Parameter, torch.Tensor]] = field(repr=False, default_factory=list)
    clipped: int = 0  # weights clipped by the z-score rule (super weights included)
    chosen_z: list[float | None] = field(default_factory=list)  # with z="auto": each matrix's threshold
    restored: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "block_size": self.block_size,
            "z": self.z,
            "super_weights": [{k: v for k, v in w.to_dict().items() if k in ("layer", "row", "col", "expert")}
                              for w in self.super_weights],
            "tensors": len(self.names),
            "clipped": self.clipped,
            **({"chosen_z": _z_counts(self.chosen_z)} if self.z == AUTO_Z else {}),
        }


def _z_counts(chosen: list[float | None]) -> dict[str, int]:
    """How many matrices got each threshold, in grid order ("none": not clipped)."""
    counts = {("none" if z is None else f"{z:g}"): chosen.count(z) for z in AUTO_Z_GRID}
    return {label: n for label, n in counts.items() if n}


def weight_targets(model: nn.Module, super_weights: Sequence[SuperWeight] = ()) -> list[_Target]:
    """Every weight matrix of the decoder layers: parameters with >= 2 dimensions (Linear, GPT-2
    Conv1D, fused expert tensors, MoE routers); norms, biases, embeddings and the LM head are left
    alone. Fused expert tensors [expert, out, in] are quantized one expert matrix at a time."""
    adapter = adapter_for(model)
    layers = decoder_layers(model, adapter)
    by_param: dict[int, dict[int | None, list[tuple[int, int]]]] = {}
    for w in super_weights:
        param = getattr(*down_proj_tensor(model, w.layer, w.expert, adapter))
        # A fused experts parameter holds one matrix per expert; a 2-D one (a shared expert's too) one.
        by_param.setdefault(id(param), {}).setdefault(w.expert if param.dim() == 3 else None, []).append((w.row, w.col))
    targets = []
    seen: set[int] = set()
    for i, layer in enumerate(layers):
        for module_name, module in layer.named_modules():
            transposed = type(module).__name__ == "Conv1D"
            for param_name, param in module.named_parameters(recurse=False):
                if param.dim() < 2 or id(param) in seen:
                    continue
                if param.is_meta:  # accelerate offloaded it: rewriting every matrix needs them in memory
                    raise UsageError("sw quantize rewrites every weight matrix, so it needs the whole model in "
                                     "memory: drop --device-map/--max-memory (or give --max-memory enough to "
                                     "hold it without offload)")
                seen.add(id(param))
                name = ".".join(p for p in (adapter.layers, str(i), module_name, param_name) if p)
                targets.append(_Target(name, param, transposed, by_param.get(id(param), {})))
    return targets


def _matrices(target: _Target) -> Iterator[tuple[int | None, torch.Tensor]]:
    """(expert or None, [out, in] view) for each matrix inside the parameter."""
    data = target.param.detach()
    if data.dim() == 2:
        yield None, data.T if target.transposed else data
    else:
        flat = data.reshape(-1, *data.shape[-2:])
        for e in range(flat.shape[0]):
            yield e, flat[e]


def quantize_model_weights(
    model: nn.Module,
    bits: int = DEFAULT_WEIGHT_BITS,
    block_size: int = 4096,
    super_weights: Sequence[SuperWeight] | None = None,
    z: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> WeightQuantizationRecord:
    """Fake-quantize every decoder weight matrix in place; returns the record to `restore_weights`.

    Naive RTN when `super_weights` is None/empty and `z` is None. With `z`, every matrix is first
    clipped at |z-score| > z (z="auto": a threshold per matrix, see `auto_z`); with `super_weights`, those weights are restored to their exact
    original values after quantization (the paper's super-weight-aware scheme uses both: pass
    `z=DEFAULT_Z`). Originals are kept on the CPU so the model can be restored bit-identically.
    `progress(done, total)` is called after each parameter.
    """
    from .validate import validate_coords

    bits = check_bits(bits)
    block_size = check_block_size(block_size)
    z = check_z(z)
    weights = _unique(super_weights or [])
    if weights:
        validate_coords(model, weights)
    targets = weight_targets(model, weights)
    record = WeightQuantizationRecord(bits, block_size, z, weights, [t.name for t in targets])
    try:
        with torch.no_grad():
            for done, target in enumerate(targets, 1):
                record.originals.append((target.param, target.param.detach().to("cpu", copy=True)))
                for expert, matrix in _matrices(target):
                    positions = target.super_positions.get(expert, [])
                    chosen = _auto_z(matrix, bits, block_size, positions) if z == AUTO_Z else z
                    if z == AUTO_Z:
                        record.chosen_z.append(chosen)
                    quantized, clipped = _quantize_aware(matrix, bits, block_size, chosen, positions)
                    matrix.copy_(quantized)
                    record.clipped += clipped
                if progress:
                    progress(done, len(targets))
    except BaseException:
        restore_weights(record)
        raise
    return record


def restore_weights(record: WeightQuantizationRecord) -> None:
    """Put every quantized parameter back bit-exactly (idempotent)."""
    with torch.no_grad():
        for param, original in reversed(record.originals):
            param.copy_(original.to(param.device))
    record.restored = True


@contextmanager
def quantized_weights(
    model: nn.Module,
    bits: int = DEFAULT_WEIGHT_BITS,
    block_size: int = 4096,
    super_weights: Sequence[SuperWeight] | None = None,
    z: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[WeightQuantizationRecord]:
    """`quantize_model_weights` on entry; the exact original weights back on exit (also on errors)."""
    record = quantize_model_weights(model, bits, block_size, super_weights, z, progress)
    try:
        yield record
    finally:
        restore_weights(record)


def default_block_sizes(model: nn.Module, factor: int = 4, smallest: int = SMALLEST_DEFAULT_BLOCK) -> list[int]:
    """A block-size grid scaled to the model: `smallest`, `smallest * factor`, ... up to half the
    largest decoder weight matrix (the paper: 16,384 ... 1,048,576 for ~45M-element matrices).

    For SmolLM2-135M (largest matrix 576 x 1536): 64, 256, 1024, 4096, 16384, 65536, 262144.
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
        raise UsageError(f"the block-size grid factor must be an integer >= 2, got {factor!r}")
    smallest = check_block_size(smallest)
    largest = max((m.numel() for t in weight_targets(model) for _, m in _matrices(t)), default=0)
    sizes = [smallest]
    while sizes[-1] * factor <= largest // 2:
        sizes.append(sizes[-1] * factor)
    return sizes


# --------------------------------------------------------------------------------------------
# Activations


def fake_quantize_per_tensor(x: torch.Tensor, bits: int = DEFAULT_ACTIVATION_BITS) -> torch.Tensor:
    """Asymmetric min-max RTN of the whole tensor with one scale; same shape and dtype."""
    bits = check_bits(bits, "activation")
    flat = x.detach().float()
    if flat.numel() == 0:
        return x.detach().clone()
    return _rtn(flat, flat.min(), flat.max(), bits).to(x.dtype)


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
    from .validate import validate_coords

    bits = check_bits(bits, "activation")
    if isinstance(spike_fraction, bool) or not isinstance(spike_fraction, (int, float)) or not 0 < spike_fraction <= 1:
        raise UsageError(f"the spike fraction must be a number in (0, 1], got {spike_fraction!r}")
    adapter = adapter_for(model)
    if adapter.experts:
        raise UsageError("activation quantization of fused mixture-of-experts down projections is not supported yet")
    weights = _unique(super_weights or [])
    if weights:
        validate_coords(model, weights)
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


# --------------------------------------------------------------------------------------------
# Drivers


def _perplexity(out: dict[str, Any]) -> float | None:
    wikitext = out.get("results", {}).get("wikitext")
    return None if wikitext is None else wikitext.get("word_perplexity")


StageProgress = Callable[[str, int, int], None]  # (stage, done, total), e.g. ("naive, block 64: wikitext", 3, 10)


def _stage(progress: StageProgress | None, stage: str) -> Callable[[int, int], None] | None:
    """`progress` bound to one stage."""
    return None if progress is None else (lambda done, total: progress(stage, done, total))


def _run_eval(model, tokenizer, tasks, evaluate_options, progress: StageProgress | None = None,
              stage: str = "") -> dict[str, Any]:
    """`evaluate`, its progress reported per task as the stage '<stage>: <task>'."""
    from ..measure.evaluate import evaluate

    per_task = None if progress is None else (lambda task, done, total: progress(f"{stage}: {task}", done, total))
    out = evaluate(model, tokenizer, list(tasks), progress=per_task, **evaluate_options)
    return out["results"]


def weight_quantization_sweep(
    model: nn.Module,
    tokenizer,
    super_weights: Sequence[SuperWeight],
    block_sizes: Iterable[int],
    bits: int = DEFAULT_WEIGHT_BITS,
    z: float | str = DEFAULT_Z,
    tasks: Sequence[str] = ("wikitext",),
    *,
    baseline: bool = False,
    progress: StageProgress | None = None,
    **evaluate_options: Any,
) -> list[dict[str, Any]]:
    """Per block size: the model quantized naively and super-weight-aware (clip at `z`, or a
    threshold per matrix with z="auto"; restore the super weights), each evaluated on `tasks` with
    `evaluate(..., **evaluate_options)`. `progress(stage, done, total)` follows each quantization
    and evaluation.

    Rows: {"bits", "block_size", "z", "naive_perplexity", "aware_perplexity" (wikitext word
    perplexity, None without wikitext), "naive", "aware" (the per-task results), and with
    `baseline=True` "baseline_perplexity"/"baseline" (unquantized, evaluated once)}. The model
    is left exactly as it was.
    """
    from .validate import validate_coords

    bits = check_bits(bits)
    sizes = check_block_sizes(block_sizes)
    z = check_z(z)
    if z is None:
        raise UsageError(f"the super-weight-aware scheme needs a z-score clipping threshold; the paper uses {DEFAULT_Z:g}")
    weights = _unique(super_weights or [])
    if weights:
        validate_coords(model, weights)
    reference = _run_eval(model, tokenizer, tasks, evaluate_options, progress, "unquantized") if baseline else None
    rows = []
    for size in sizes:
        z_label = z if z == AUTO_Z else f"{z:g}"
        naive_stage, aware_stage = f"INT{bits} naive, block {size}", f"INT{bits} aware (z={z_label}), block {size}"
        with quantized_weights(model, bits, size, progress=_stage(progress, f"{naive_stage}: quantizing")):
            naive = _run_eval(model, tokenizer, tasks, evaluate_options, progress, naive_stage)
        aware_quantizing = _stage(progress, f"{aware_stage}: quantizing")
        with quantized_weights(model, bits, size, weights, z, aware_quantizing) as record:
            aware = _run_eval(model, tokenizer, tasks, evaluate_options, progress, aware_stage)
        rows.append(_comparison_row(naive, aware, reference, bits=bits, block_size=size, z=z, clipped=record.clipped,
                                    **({"chosen_z": _z_counts(record.chosen_z)} if z == AUTO_Z else {})))
    return rows


def _comparison_row(naive: dict, aware: dict, reference: dict | None, **settings: Any) -> dict[str, Any]:
    """One row of a naive vs super-weight-aware comparison: the settings, both results and their
    wikitext perplexities, and the unquantized baseline when it was evaluated."""
    row = {**settings, "naive_perplexity": _perplexity({"results": naive}),
           "aware_perplexity": _perplexity({"results": aware}), "naive": naive, "aware": aware}
    if reference is not None:
        row["baseline_perplexity"] = _perplexity({"results": reference})
        row["baseline"] = reference
    return row


def activation_quantization_compare(
    model: nn.Module,
    tokenizer,
    super_weights: Sequence[SuperWeight],
    bits: int | Iterable[int] = DEFAULT_ACTIVATION_BITS,
    tasks: Sequence[str] = ("wikitext",),
    *,
    baseline: bool = False,
    spike_fraction: float = SPIKE_FRACTION,
    progress: StageProgress | None = None,
    **evaluate_options: Any,
) -> list[dict[str, Any]]:
    """Per bit width: down-projection inputs quantized per tensor naively and with the super
    activation held out, each evaluated on `tasks`. Rows like `weight_quantization_sweep`'s, with
    "held_out" (super-activation entries kept in full precision) instead of block size / z."""
    widths = _check_bits_list(bits, "activation")
    if not super_weights:
        raise UsageError("super-activation-aware quantization needs the super weights; give at least one LAYER,ROW,COL")
    reference = _run_eval(model, tokenizer, tasks, evaluate_options, progress, "unquantized") if baseline else None
    rows = []
    for width in widths:
        with quantized_activations(model, width):
            naive = _run_eval(model, tokenizer, tasks, evaluate_options, progress, f"A{width} naive")
        with quantized_activations(model, width, super_weights, spike_fraction=spike_fraction) as stats:
            aware = _run_eval(model, tokenizer, tasks, evaluate_options, progress,
                              f"A{width} super activation held out")
        rows.append(_comparison_row(naive, aware, reference, bits=width, held_out=stats.held_out))
    return rows


# --------------------------------------------------------------------------------------------
# Plot


def comparison_runs(rows: Sequence[dict[str, Any]], setting: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """The rows of a comparison as named runs for `experiments.summary_table`: "unquantized" (when
    evaluated), then "naive, <setting>" and "aware, <setting>" per row, every task's metrics."""
    runs: dict[str, Any] = {}
    if rows and rows[0].get("baseline") is not None:
        runs["unquantized"] = {"results": rows[0]["baseline"]}
    for row in rows:
        runs[f"naive, {setting(row)}"] = {"results": row["naive"]}
        runs[f"aware, {setting(row)}"] = {"results": row["aware"]}
    return runs


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Each task's headline metric against block size (log2 x axis; perplexities on a log y axis),
    naive vs super-weight aware, one panel per metric, PNG (or any format matplotlib knows from
    the suffix), written atomically."""
    from ..measure.configurations import headline_columns
    from ..report.plots import pyplot, save_figure

    points = sorted((r for r in rows if r.get("block_size") is not None), key=lambda r: r["block_size"])
    if not points:
        raise UsageError("nothing to plot: the sweep has no rows; run weight_quantization_sweep first")
    plt = pyplot()
    sizes = [r["block_size"] for r in points]
    panels = headline_columns(points[0]["naive"])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (task, metric) in zip(axes[0], panels):
        for key, label, color, marker in (("naive", "naive RTN", "#cc3311", "o"),
                                          ("aware", "super-weight aware", "#3366aa", "s")):
            ax.plot(sizes, [r[key][task].get(metric, math.nan) for r in points], marker=marker, ms=4, lw=1.4,
                    color=color, label=label)
        if points[0].get("baseline") is not None:
            ax.axhline(points[0]["baseline"][task][metric], color="#555555", ls="--", lw=1, label="unquantized")
        ax.set_xscale("log", base=2)
        if "perplexity" in metric:
            ax.set_yscale("log")
        ax.set_xlabel("block size (weights)")
        ax.set_title(f"{task} {metric}", fontsize=10)
        ax.grid(True, which="both", ls=":", lw=0.5)
        ax.legend(fontsize=8)
    bits = points[0].get("bits")
    fig.suptitle(title or f"INT{bits} round-to-nearest vs block size", fontsize=11)
    return save_figure(fig, path)
