"""Super-activation restoration (Yu et al. 2024, Sec. 3.2): with the super weights ablated, write
the original super activation back where it spikes. This shows the super weight matters through
the super activation it creates.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from .ablate import AblationRecord
from .validate import unique_coords, validate_coords
from ..coords import SuperWeight
from ..errors import UsageError
from ..model.adapters import DownProjections, adapter_for, down_proj_module

DEFAULT_RESTORE_FLOOR = 100.0
RESTORE_SPIKE_FRACTION = 0.1


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
    matrices = DownProjections(model)
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
        weights = unique_coords(weights)  # a repeat counts once, as in `apply`
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
