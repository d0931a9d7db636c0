"""Ablating super weights, the paper's controls, super-activation restoration, and saving.

* `apply` / `undo` / `ablated`: zero or scale named down-projection weights in place and put the
  originals back bit-exactly (the originals are kept as 0-d tensors of the weight's own dtype, so
  bfloat16 / float16 round-trip exactly).
* `random_control`: as many random weights of the same matrices; `outlier_control`: the `top`
  largest-|w| down-projection weights of the whole model, super weights excluded (the paper's
  "other ~7000 outliers"). Both are recorded in the `AblationRecord` (kind, seed, top).
* `restored_activation`: with the super weights zeroed, write the original super activation back
  where it spikes (Yu et al. 2024, Sec. 3.2): this shows the super weight matters through the
  super activation it creates.
* `save_ablated`: write the ablated model (safetensors), its tokenizer and a JSON record of what
  was done, atomically, never inside the model's own directory.
"""

from __future__ import annotations

import json
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..model.adapters import (
    Adapter,
    adapter_for,
    decoder_layers,
    down_proj_matrix,
    down_proj_module,
    down_proj_tensor,
    layer_experts,
    num_experts,
)
from ..coords import SHARED_EXPERT, SuperWeight
from ..errors import CoordinatesError, UsageError
from ..files import atomic_directory, refuse_inside
from ..model.placement import release

MODES = ("zero", "scale")
CONTROLS = ("random", "outliers")
RECORD_FILE = "superweight_ablation.json"
DEFAULT_RESTORE_FLOOR = 100.0
RESTORE_SPIKE_FRACTION = 0.1

_ANOTHER_MODEL = "was the file made for another model?"
RECORDED_VALUE_RTOL = 0.01  # a recorded value vs the model's: bfloat16 rounds by up to 2**-8 relative


# --------------------------------------------------------------------------------------------
# Validation


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_coords(model: nn.Module, weights: Sequence[SuperWeight]) -> None:
    """Raise `CoordinatesError` unless every coordinate names a weight of this model.

    Checks layer, expert (present exactly when the layer has experts, and in range, or "shared" where
    the layer has a shared expert),
    row and col against the down projection's shape. Nothing is touched.
    """
    weights = list(weights)
    if not weights:
        raise CoordinatesError("no super-weight coordinates given; give at least one LAYER,ROW,COL")
    adapter = adapter_for(model)
    n_layers = len(decoder_layers(model, adapter))
    n_experts = num_experts(model, adapter)
    shapes: dict[tuple[int, int | None], tuple[int, int]] = {}
    for w in weights:
        where = f"coordinate {w.label()}"
        for name in ("layer", "row", "col"):
            value = getattr(w, name)
            if not _is_index(value) or value < 0:
                raise CoordinatesError(
                    f"{where}: {name} must be a non-negative integer, got {value!r}; {_ANOTHER_MODEL}"
                )
        if w.layer >= n_layers:
            raise CoordinatesError(
                f"{where}: layer {w.layer} is out of range; this model has {n_layers} decoder layers "
                f"(valid 0..{n_layers - 1}); {_ANOTHER_MODEL}"
            )
        experts = layer_experts(model, w.layer, adapter)
        if experts == [None] and w.expert is not None:
            raise CoordinatesError(
                f"{where}: names expert {w.expert}, but "
                + ("this model has no experts" if n_experts is None else f"layer {w.layer} is a dense layer")
                + f"; {_ANOTHER_MODEL}"
            )
        if experts != [None]:
            if w.expert is None:
                shared = f" or LAYER,ROW,COL,{SHARED_EXPERT}" if SHARED_EXPERT in experts else ""
                raise CoordinatesError(
                    f"{where}: names no expert, but this is a mixture-of-experts model with {n_experts} experts "
                    f"(write LAYER,ROW,COL,EXPERT{shared}); {_ANOTHER_MODEL}"
                )
            if w.expert == SHARED_EXPERT and SHARED_EXPERT not in experts:
                raise CoordinatesError(f"{where}: names the shared expert, but this model has none; {_ANOTHER_MODEL}")
            if w.expert != SHARED_EXPERT and (not _is_index(w.expert) or not 0 <= w.expert < n_experts):
                raise CoordinatesError(
                    f"{where}: expert {w.expert} is out of range; this model has {n_experts} experts per layer "
                    f"(valid 0..{n_experts - 1}); {_ANOTHER_MODEL}"
                )
        key = (w.layer, w.expert)
        if key not in shapes:
            shapes[key] = tuple(down_proj_matrix(model, w.layer, w.expert, adapter, writable=False).shape)
        out_features, in_features = shapes[key]
        if w.row >= out_features:
            raise CoordinatesError(
                f"{where}: row {w.row} is out of range; layer {w.layer}'s down projection has {out_features} "
                f"output (hidden) channels (valid rows 0..{out_features - 1}); {_ANOTHER_MODEL}"
            )
        if w.col >= in_features:
            raise CoordinatesError(
                f"{where}: col {w.col} is out of range; layer {w.layer}'s down projection has {in_features} "
                f"input (intermediate) channels (valid cols 0..{in_features - 1}); {_ANOTHER_MODEL}"
            )


def check_coords_before_load(source: Any, weights: Sequence[SuperWeight], *, trust_remote_code: bool = False) -> None:
    """Out-of-range coordinates fail before the weights are read: `validate_coords` on a
    weightless (meta-device) model built from the config of a local directory or hub model; for a
    dense GGUF, layer/row/col against the sizes in its header (its config only comes out of the
    dequantisation). A config that cannot be read is left to the load, which reports it."""
    if not weights:
        return
    if source.kind == "gguf":
        from ..model.load import gguf_dense_shape

        shape = gguf_dense_shape(source.location)
        if shape is not None:
            _check_dense_ranges(weights, *shape)
        return
    from transformers import AutoConfig

    from ..model.load import _hub_access, weightless_model

    try:
        config = AutoConfig.from_pretrained(source.location, revision=source.revision, cache_dir=source.cache_dir,
                                            trust_remote_code=trust_remote_code,
                                            **_hub_access(source, source.cache_dir, lambda message: None))
        skeleton = weightless_model(config, trust_remote_code)
    except Exception:  # noqa: BLE001 - any failure here is the load's to report
        return
    validate_coords(skeleton, weights)


def _check_dense_ranges(weights: Sequence[SuperWeight], n_layers: int, hidden: int, intermediate: int) -> None:
    """validate_coords' range checks for a dense model known only by its sizes."""
    for w in weights:
        where = f"coordinate {w.label()}"
        for name, value, size, what in (("layer", w.layer, n_layers, "decoder layers"),
                                        ("row", w.row, hidden, "output (hidden) channels"),
                                        ("col", w.col, intermediate, "input (intermediate) channels")):
            if value >= size:
                raise CoordinatesError(f"{where}: {name} {value} is out of range; this model has {size} {what} "
                                       f"(valid 0..{size - 1}); {_ANOTHER_MODEL}")
        if w.expert is not None:
            raise CoordinatesError(f"{where}: names expert {w.expert}, but this model has no experts; {_ANOTHER_MODEL}")


def check_recorded_values(model: nn.Module, weights: Sequence[SuperWeight]) -> None:
    """Raise `CoordinatesError` when a weight's value recorded by `sw detect` is not the value this
    model holds there: the file was made for another model (or this one is already ablated).

    In-range coordinates of another model would otherwise be applied without a word. The
    tolerance covers a file written in float32 and a model loaded in half precision.
    """
    matrices = _Matrices(model)
    for w in weights:
        if w.value is None:
            continue
        current = float(matrices(w)[w.row, w.col])
        if not math.isclose(current, w.value, rel_tol=RECORDED_VALUE_RTOL, abs_tol=1e-6):
            raise CoordinatesError(
                f"coordinate {w.label()}: the file records the weight as {w.value:.6g}, but this model holds "
                f"{current:.6g} there; {_ANOTHER_MODEL} (or is this model already ablated?) Run `sw detect` on it"
            )


def _unique(weights: Sequence[SuperWeight]) -> list[SuperWeight]:
    """Drop repeated coordinates (keeping the first): scaling one weight twice is never meant."""
    seen: set[tuple] = set()
    unique = []
    for w in weights:
        if w.key not in seen:
            seen.add(w.key)
            unique.append(w)
    return unique


class _Matrices:
    """Cache of [out, in] views of the down projections, keyed by (layer, expert).

    Only `writable` views may be written (an offloaded matrix is otherwise a copy, see placement.py).
    """

    def __init__(self, model: nn.Module, writable: bool = False):
        self.model = model
        self.adapter = adapter_for(model)
        self.writable = writable
        self._cache: dict[tuple[int, int | None], torch.Tensor] = {}

    def __call__(self, w: SuperWeight) -> torch.Tensor:
        key = (w.layer, w.expert)
        if key not in self._cache:
            # detached: a view of the same storage, so writes reach the weight without autograd
            self._cache[key] = down_proj_matrix(self.model, w.layer, w.expert, self.adapter,
                                                writable=self.writable).detach()
        return self._cache[key]


# --------------------------------------------------------------------------------------------
# Apply / undo


@dataclass
class AblationRecord:
    """What `apply` did: enough to undo it bit-exactly and to describe it in a JSON file.

    `original` / `new` are 0-d tensors in the weight's own dtype and device (exact); `to_dict`
    gives them as floats.
    """

    weights: list[SuperWeight]
    mode: str
    factor: float
    original: list[torch.Tensor]
    new: list[torch.Tensor]
    control: str | None = None  # None (the named weights), "random" or "outliers"
    seed: int | None = None  # random control
    top: int | None = None  # outlier control
    reference: list[SuperWeight] | None = None  # the super weights a control was drawn against
    notes: list[str] = field(default_factory=list)

    @property
    def original_values(self) -> list[float]:
        return [float(t) for t in self.original]

    @property
    def new_values(self) -> list[float]:
        return [float(t) for t in self.new]

    def to_dict(self) -> dict[str, Any]:
        control = None
        if self.control is not None:
            control = {"kind": self.control, "seed": self.seed, "top": self.top}
            if self.reference is not None:
                control["super_weights"] = [w.to_dict() for w in self.reference]
        return {
            "coordinates": [{k: v for k, v in w.to_dict().items() if k in ("layer", "row", "col", "expert")}
                            for w in self.weights],
            "mode": self.mode,
            "factor": self.factor,
            "original_values": self.original_values,
            "new_values": self.new_values,
            "dtype": str(self.original[0].dtype).removeprefix("torch.") if self.original else None,
            "control": control,
            "notes": list(self.notes),
        }


def _check_mode(mode: str, factor: float | None) -> float:
    if mode not in MODES:
        raise UsageError(f"unknown ablation mode '{mode}'; use one of {', '.join(MODES)}")
    if mode == "zero":
        if factor is not None and factor != 0:
            raise UsageError(f"--factor {factor} only applies to --mode scale; zeroing uses factor 0")
        return 0.0
    if factor is None:
        raise UsageError("--mode scale needs --factor (a finite number, e.g. 0.5 or 2)")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
        raise UsageError(f"--factor must be a finite number, got {factor!r}")
    return float(factor)


def apply(
    model: nn.Module,
    weights: Sequence[SuperWeight],
    mode: str = "zero",
    factor: float | None = None,
    *,
    control: str | None = None,
    seed: int | None = None,
    top: int | None = None,
    reference: Sequence[SuperWeight] | None = None,
) -> AblationRecord:
    """Zero (`mode="zero"`) or multiply by `factor` (`mode="scale"`) the named weights in place.

    Coordinates are validated before anything is written; repeated coordinates are applied
    once. `control`/`seed`/`top`/`reference` only describe where the weights came from (see
    `random_control`, `outlier_control`) and go into the record. Undo with `undo(model, record)`.
    """
    factor_value = _check_mode(mode, factor)
    if control is not None and control not in CONTROLS:
        raise UsageError(f"unknown control '{control}'; use one of {', '.join(CONTROLS)}")
    weights = _unique(weights)
    validate_coords(model, weights)
    matrices = _Matrices(model, writable=True)
    original: list[torch.Tensor] = []
    new: list[torch.Tensor] = []
    with torch.no_grad():
        for w in weights:
            original.append(matrices(w)[w.row, w.col].detach().clone())
        for w, value in zip(weights, original):
            changed = torch.zeros_like(value) if mode == "zero" else value * factor_value
            matrices(w)[w.row, w.col] = changed
            new.append(changed)
    return AblationRecord(
        weights=weights, mode=mode, factor=factor_value, original=original, new=new,
        control=control, seed=seed, top=top, reference=list(reference) if reference is not None else None,
    )


def undo(model: nn.Module, record: AblationRecord) -> None:
    """Write the original values back, bit-exactly."""
    matrices = _Matrices(model, writable=True)
    with torch.no_grad():
        for w, value in reversed(list(zip(record.weights, record.original))):
            matrices(w)[w.row, w.col] = value
    # A disk-offloaded matrix was held in memory while edited; unchanged again, it can go back.
    adapter = adapter_for(model)
    for layer, expert in dict.fromkeys((w.layer, w.expert) for w in record.weights):
        release(*down_proj_tensor(model, layer, expert, adapter))


@contextmanager
def ablated(
    model: nn.Module,
    weights: Sequence[SuperWeight],
    mode: str = "zero",
    factor: float | None = None,
    **control: Any,
) -> Iterator[AblationRecord]:
    """`apply` on entry, `undo` on exit (also when the block raises or is interrupted)."""
    record = apply(model, weights, mode, factor, **control)
    try:
        yield record
    finally:
        undo(model, record)


# --------------------------------------------------------------------------------------------
# Controls


def random_control(model: nn.Module, weights: Sequence[SuperWeight], seed: int) -> list[SuperWeight]:
    """As many random coordinates as there are (distinct) super weights, one drawn from each super
    weight's own matrix (same layer, same expert), never a super weight and never twice.

    Deterministic for a given `seed` (Python's `random.Random`, platform independent).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"--seed must be an integer, got {seed!r}")
    weights = _unique(weights)
    validate_coords(model, weights)
    matrices = _Matrices(model)
    rng = random.Random(seed)
    taken = {w.key for w in weights}
    drawn: list[SuperWeight] = []
    for w in weights:
        out_features, in_features = matrices(w).shape
        for _ in range(10_000):
            row, col = rng.randrange(out_features), rng.randrange(in_features)
            if (w.layer, row, col, w.expert) not in taken:
                break
        else:
            raise UsageError(f"cannot draw a random weight from layer {w.layer}'s down projection: all are taken")
        taken.add((w.layer, row, col, w.expert))
        drawn.append(SuperWeight(w.layer, row, col, w.expert, value=float(matrices(w)[row, col])))
    return drawn


def _all_matrices(model: nn.Module, adapter: Adapter) -> Iterator[tuple[int, int | str | None, torch.Tensor]]:
    for layer in range(len(decoder_layers(model, adapter))):
        for expert in layer_experts(model, layer, adapter):
            yield layer, expert, down_proj_matrix(model, layer, expert, adapter, writable=False)


# How `outlier_control` stores an expert value in a tensor of indices.
_EXPERT_CODE = {None: -1, SHARED_EXPERT: -2}
_CODE_EXPERT = {code: expert for expert, code in _EXPERT_CODE.items()}


def outlier_control(model: nn.Module, weights: Sequence[SuperWeight], top: int) -> list[SuperWeight]:
    """The `top` largest-|w| down-projection weights over all layers (and experts), the super
    weights excluded, largest first.

    Memory stays at one matrix at a time: a per-matrix top-k (k = `top` plus the super weights in
    that matrix) is merged into a running best of at most `top` entries.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise UsageError(f"the outlier control needs a positive number of weights, got {top!r}")
    weights = _unique(weights)
    validate_coords(model, weights)
    adapter = adapter_for(model)
    best_values = torch.empty(0, dtype=torch.float64)
    best_where = torch.empty((0, 4), dtype=torch.long)  # layer, expert (_EXPERT_CODE), row, col
    with torch.no_grad():
        for layer, expert, matrix in _all_matrices(model, adapter):
            in_features = matrix.shape[1]
            here = [(w.row, w.col) for w in weights if (w.layer, w.expert) == (layer, expert)]
            k = min(top + len(here), matrix.numel())
            values, flat = matrix.detach().abs().reshape(-1).topk(k)
            values, flat = values.to("cpu", torch.float64), flat.cpu()
            rows, cols = flat // in_features, flat % in_features
            keep = torch.ones(k, dtype=torch.bool)
            for row, col in here:
                keep &= ~((rows == row) & (cols == col))
            values, rows, cols = values[keep], rows[keep], cols[keep]
            where = torch.stack(
                [torch.full_like(rows, layer), torch.full_like(rows, _EXPERT_CODE.get(expert, expert)), rows, cols], 1
            )
            best_values = torch.cat([best_values, values])
            best_where = torch.cat([best_where, where])
            if best_values.numel() > top:
                order = best_values.topk(top).indices
                best_values, best_where = best_values[order], best_where[order]
    order = torch.sort(best_values, descending=True, stable=True).indices
    matrices = _Matrices(model)
    result = []
    for layer, expert, row, col in best_where[order].tolist():
        w = SuperWeight(layer, row, col, _CODE_EXPERT.get(expert, expert))
        result.append(SuperWeight(layer, row, col, w.expert, value=float(matrices(w)[row, col])))
    return result


# --------------------------------------------------------------------------------------------
# Super-activation restoration


@dataclass
class _RowRestore:
    row: int
    cols: list[int]
    deltas: list[float]  # w_orig - w_new per col (float64: exact for every float dtype)
    threshold: float


def restore_threshold(weights: Sequence[SuperWeight], floor: float = DEFAULT_RESTORE_FLOOR,
                      post_norm: bool = False) -> float:
    """Where the hook writes the original output back, in raw down-projection units.

    Pre-norm families: max(floor, 0.1 x the largest |output_spike| recorded by the weights of one
    row), or floor. Post-norm families: their `output_spike` is the residual write after the norm,
    in other units, and their raw outputs can be tiny (a Gemma-3 super weight's raw output is
    0.07-1.8; the norm's gain makes it massive), so 0.1 x the largest recorded |raw_output|, or the
    floor where none is recorded.
    """
    if post_norm:
        raws = [abs(w.raw_output) for w in weights if w.raw_output is not None]
        return RESTORE_SPIKE_FRACTION * max(raws) if raws else floor
    spikes = [abs(w.output_spike) for w in weights if w.output_spike is not None]
    return max(floor, RESTORE_SPIKE_FRACTION * max(spikes)) if spikes else floor


@contextmanager
def restored_activation(
    model: nn.Module,
    ablation: AblationRecord | Sequence[SuperWeight],
    original_values: Sequence[float | torch.Tensor] | None = None,
    *,
    floor: float = DEFAULT_RESTORE_FLOOR,
) -> Iterator[None]:
    """Within the block, write the original super activation back while the weights stay ablated.

    Give the `AblationRecord` of `apply` (or the weights and their original values, the model
    being ablated already). Forward hooks on the ablated layers' down projections do, per ablated
    output channel `row` of a layer:

        y_orig[..., row] = y[..., row] + sum over ablated (row, col) of x[..., col] * (w_orig - w_new)

    which is exactly the output the unablated weights would give (y = x @ W^T + b), and write it
    back **only at the positions where it spikes**: |y_orig[..., row]| >= threshold with

        threshold = max(floor, 0.1 x |output_spike|)   when the coordinate records `output_spike`
                    (the largest one, when several ablated weights share the row),
        threshold = floor                              otherwise (floor defaults to 100).

    Elsewhere the ablated output is left untouched. For post-norm families (Gemma 2/3, OLMo-2) the
    raw down-projection output is restored, before the norm, and the threshold comes from the
    recorded `raw_output` (see `restore_threshold`): their `output_spike` is in other units. Dense families only: mixture-of-
    experts models raise `UsageError`. Hooks are removed on exit, also when the block raises.
    """
    adapter = adapter_for(model)
    if adapter.experts:
        raise UsageError("restoring the super activation is not supported for mixture-of-experts models yet")
    if not (isinstance(floor, (int, float)) and not isinstance(floor, bool) and math.isfinite(floor) and floor >= 0):
        raise UsageError(f"the restoration floor must be a non-negative number, got {floor!r}")
    matrices = _Matrices(model)
    if isinstance(ablation, AblationRecord):
        if original_values is not None:
            raise UsageError("give either an AblationRecord or weights with original values, not both")
        weights, originals, news = ablation.weights, ablation.original, ablation.new
    else:
        weights = list(ablation)
        if original_values is None or len(original_values) != len(weights):
            raise UsageError("restoring the super activation needs one original value per weight")
        validate_coords(model, weights)
        original_of: dict[tuple, float | torch.Tensor] = {}
        for w, value in zip(weights, original_values):
            original_of.setdefault(w.key, value)
        weights = _unique(weights)  # a repeat counts once, as in `apply`
        originals = [original_of[w.key] for w in weights]
        news = [matrices(w)[w.row, w.col] for w in weights]
    plan: dict[int, dict[int, _RowRestore]] = {}
    by_row: dict[tuple[int, int], list[SuperWeight]] = {}
    for w, orig, new in zip(weights, originals, news):
        rows = plan.setdefault(w.layer, {})
        entry = rows.setdefault(w.row, _RowRestore(w.row, [], [], floor))
        entry.cols.append(w.col)
        entry.deltas.append(float(orig) - float(new))
        by_row.setdefault((w.layer, w.row), []).append(w)
    for (layer, row), ws in by_row.items():
        plan[layer][row].threshold = restore_threshold(ws, floor, post_norm=adapter.post_norm is not None)

    def make_hook(rows: dict[int, _RowRestore]):
        def hook(module, args, output):
            x = args[0] if args else None
            if x is None or not torch.is_tensor(output):
                return None
            for entry in rows.values():
                ablated_row = output[..., entry.row]
                original = ablated_row.float()
                for col, delta in zip(entry.cols, entry.deltas):
                    if delta:  # x is the input as the caller passed it, before accelerate moved it
                        original = original + x[..., col].to(original.device).float() * delta
                spikes = original.abs() >= entry.threshold
                output[..., entry.row] = torch.where(spikes, original.to(output.dtype), ablated_row)
            return output

        return hook

    handles = []
    try:
        for layer, rows in plan.items():
            module = down_proj_module(model, layer, adapter)
            handles.append(module.register_forward_hook(make_hook(rows)))
        yield
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------
# Saving


def save_ablated(loaded: Any, record: AblationRecord, out_dir: str | Path, force: bool = False) -> Path:
    """Save the ablated model (safetensors), its tokenizer and `superweight_ablation.json` to
    `out_dir`, atomically: an interrupted or failed save leaves nothing there.

    Refuses `out_dir` inside the model's own directory (or the hub cache), and an existing non-empty
    `out_dir` unless `force`. The model must be in the state `record` describes (ablated). A GGUF
    model's leftover quantizer is dropped for the save (its weights are plain floats).
    """
    from .. import __version__

    out_dir = Path(out_dir)
    refuse_inside(out_dir, loaded.source.protected_dirs)
    model = loaded.model
    matrices = _Matrices(model)
    for w, new in zip(record.weights, record.new):
        current = matrices(w)[w.row, w.col]
        if not torch.equal(current.detach().cpu(), new.detach().cpu()):
            raise UsageError(
                f"the model is not ablated as the record says (weight {w.label()} is {float(current)}, "
                f"expected {float(new)}); apply the ablation before saving"
            )
    source = loaded.source
    document = {
        "superweight_version": __version__,
        "source": {
            "spec": source.spec, "kind": source.kind, "location": str(source.location),
            "revision": source.revision,
        },
        **record.to_dict(),
    }
    config = model.config
    quantizer = getattr(model, "hf_quantizer", None)
    had_quant_config = hasattr(config, "quantization_config")
    quant_config = getattr(config, "quantization_config", None)
    was_quantized = getattr(model, "is_quantized", None)
    if quantizer is not None or had_quant_config:
        model.hf_quantizer = None
        if had_quant_config:
            del config.quantization_config
        if was_quantized is not None:
            model.is_quantized = False
    try:
        with atomic_directory(out_dir, force) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            if loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(tmp)
            (tmp / RECORD_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    finally:
        if quantizer is not None or had_quant_config:
            model.hf_quantizer = quantizer
            if had_quant_config:
                config.quantization_config = quant_config
            if was_quantized is not None:
                model.is_quantized = was_quantized
    return out_dir


def recorded_ablation(source: Any) -> dict[str, Any] | None:
    """The `superweight_ablation.json` of a local model directory written by `save_ablated`, or
    None: evaluating such a directory must not pass it off as the original model."""
    if source.kind != "local":
        return None
    path = Path(source.location) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {"unreadable": str(path)}
    return record if isinstance(record, dict) else {"unreadable": str(path)}


def describe_recorded_ablation(record: dict[str, Any]) -> str:
    """One line for tables: "ablated by superweight: 2 super weights zeroed (source smollm2-135m)"."""
    if "unreadable" in record:
        return f"ablated by superweight (its {RECORD_FILE} is unreadable)"
    count = len(record.get("coordinates") or [])
    control = (record.get("control") or {}).get("kind")
    what = f"{count} {control + ' control' if control else 'super'} weight{'' if count == 1 else 's'}"
    factor = record.get("factor")
    how = "zeroed" if record.get("mode") == "zero" else f"scaled x{factor:g}" if isinstance(factor, (int, float)) \
        else "scaled"
    source = (record.get("source") or {}).get("spec")
    return f"ablated by superweight: {what} {how}" + (f" (source {source})" if source else "")
