"""Round-to-nearest quantization of weights, naive and super-weight aware (Yu et al. 2024, Sec. 4.2).

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

Paper settings (Yu et al. 2024, arXiv 2411.07191; authors' code github.com/mengxiayu/LLMSuperWeight,
mirrored as cyita/LLMSuperWeight): INT4 weights, block sizes 16,384 / 65,536 / 262,144 / 1,048,576
and whole tensor for 7B models, z-score clipping threshold 9 (README, "Block-wise Weight
Quantization"); W8A8 for activations. The authors' z-score is computed on |w| (threshold
mean|w| + z * std|w|, clamp to +/- threshold); here it is the signed z-score over the tensor
(clamp to mean +/- z * std), which for zero-centred weights is nearly the same.

Activations are quantized in `edit.quantize_activations` (with this module's RTN), and the
naive vs aware comparisons are evaluated in `measure.quantized`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..model.adapters import adapter_for, decoder_layers, down_proj_tensor
from ..coords import SuperWeight
from ..errors import UsageError
from .validate import validate_coords

DEFAULT_WEIGHT_BITS = 4
DEFAULT_Z = 9.0  # the authors' z-score clipping threshold for INT4 (README, clip_4_<block>_z_9)
AUTO_Z = "auto"  # choose the threshold per matrix (see the module docstring)
AUTO_Z_GRID = (3.0, 4.0, 5.0, 6.0, 8.0, 9.0, 12.0, 16.0, 24.0, 32.0, None)  # None: no clipping
PAPER_BLOCK_SIZES = (16_384, 65_536, 262_144, 1_048_576)  # Llama-7B, down_proj 11008 x 4096
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


def check_bits_list(bits: int | Iterable[int], what: str) -> list[int]:
    """One bit width or several, each checked; at least one."""
    values = [bits] if isinstance(bits, int) else list(bits)
    if not values:
        raise UsageError(f"no {what} bit widths given; give at least one, e.g. 8")
    return [check_bits(b, what) for b in values]


def checked_super_weights(model: nn.Module, super_weights: Iterable[SuperWeight] | None) -> list[SuperWeight]:
    """The distinct super weights (a repeat counts once), each checked to name a weight of `model`."""
    unique: dict[tuple, SuperWeight] = {}
    for w in super_weights or ():
        unique.setdefault(w.key, w)
    weights = list(unique.values())
    if weights:
        validate_coords(model, weights)
    return weights


# --------------------------------------------------------------------------------------------
# Tensor-level quantizers


def _levels(bits: int) -> int:
    return (1 << bits) - 1


def round_to_nearest(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
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
        parts.append(round_to_nearest(blocks, lo, hi, bits).reshape(-1))
    if full < n:
        tail = flat[full:]
        parts.append(round_to_nearest(tail, tail.min(), tail.max(), bits))
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
    """One quantized parameter: its name, the parameter, whether its matrices are stored [in, out]
    (GPT-2 Conv1D; gpt-oss and Llama 4 fused experts), and the super weights it holds as
    {expert or None: [(row, col), ...]}."""

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
            **({"chosen_z": self.chosen_z_counts()} if self.z == AUTO_Z else {}),
        }

    def chosen_z_counts(self) -> dict[str, int]:
        """With z="auto": how many matrices got each threshold, in grid order ("none": not clipped)."""
        counts = {("none" if z is None else f"{z:g}"): self.chosen_z.count(z) for z in AUTO_Z_GRID}
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
            for param_name, param in module.named_parameters(recurse=False):
                # Fused experts stored [in, out] (gpt-oss, Llama 4) store gate_up_proj that way too, not
                # only down_proj: blocks must run along each matrix's input as everywhere else.
                transposed = type(module).__name__ == "Conv1D" or (
                    adapter.experts and adapter.transposed and param.dim() == 3 and module_name == adapter.down_proj)
                # gpt-oss keeps its experts' biases as [expert, out] tensors: 2-D, but biases, not matrices.
                is_bias = param_name == "bias" or param_name.endswith("_bias")
                if param.dim() < 2 or is_bias or id(param) in seen:
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
            yield e, flat[e].T if target.transposed else flat[e]


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
    bits = check_bits(bits)
    block_size = check_block_size(block_size)
    z = check_z(z)
    weights = checked_super_weights(model, super_weights)
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
