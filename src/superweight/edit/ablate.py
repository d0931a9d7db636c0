"""Ablating super weights, and the paper's controls.

* `apply` / `undo` / `ablated`: zero or scale named down-projection weights in place and put the
  originals back bit-exactly (the originals are kept as 0-d tensors of the weight's own dtype, so
  bfloat16 / float16 round-trip exactly).
* `random_control`: as many random weights of the same matrices; `outlier_control`: the `top`
  largest-|w| down-projection weights of the whole model, super weights excluded (the paper's
  "other ~7000 outliers"). Both are recorded in the `AblationRecord` (kind, seed, top).
* `ablated_name` / `control_name`: what an ablation is called, the one name that `sw ablate`
  prints, its record keeps and `sw eval` rows show.

Restoring the super activation is restore.py; saving the ablated model, save.py; checking the
coordinates, validate.py.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .validate import unique_coords, validate_coords
from ..coords import SHARED_EXPERT, SuperWeight, weights_named
from ..errors import UsageError
from ..model.adapters import (
    Adapter,
    DownProjections,
    adapter_for,
    decoder_layers,
    down_proj_matrix,
    down_proj_tensor,
    layer_experts,
)
from ..model.placement import release

MODES = ("zero", "scale")
CONTROLS = ("random", "outliers")
# What a record keeps of each weight: where it is, and (where known) what detection and verification
# said of it, so that a command acting on the record's weights does what it does with the coordinates
# the folder was ablated with: rows named as `sw ablate` named them ("super weight [11, 507, 1229]
# zeroed", "5 candidates zeroed"; `coords.weights_noun`), and the super activation restored where
# the same spike threshold says (`restore.restore_threshold` reads output_spike and raw_output).
RECORDED_FIELDS = ("layer", "row", "col", "expert", "iteration", "role", "output_spike", "raw_output")


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
    def name(self) -> str:
        """What was done, as `sw ablate` prints it and `sw eval` names its rows: "super weight
        [11, 507, 1229] zeroed", "5 candidates zeroed", "1 random weight zeroed"."""
        if self.control:
            return control_name(self.weights, self.control, self.mode, self.factor)
        return ablated_name(self.weights, self.mode, self.factor)

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
            "name": self.name,
            "coordinates": [{k: v for k, v in w.to_dict().items() if k in RECORDED_FIELDS} for w in self.weights],
            "mode": self.mode,
            "factor": self.factor,
            "original_values": self.original_values,
            "new_values": self.new_values,
            "dtype": str(self.original[0].dtype).removeprefix("torch.") if self.original else None,
            "control": control,
            "notes": list(self.notes),
        }


def ablated_name(weights: Sequence[SuperWeight], mode: str = "zero", factor: float | None = None,
                 restore_activation: bool = False) -> str:
    """A row named by what was done to what: "super weight [11, 507, 1229] zeroed", "3 super weights
    scaled x0.5", "5 candidates zeroed + activation restored"."""
    name = f"{weights_named(list(weights))} {_done(mode, factor)}"
    return name + " + activation restored" if restore_activation else name


def control_name(chosen: Sequence[SuperWeight], control: str, mode: str = "zero", factor: float | None = None) -> str:
    """A control row named by what it zeroed: "other 129 outliers zeroed", "3 random weights zeroed"."""
    if control == "outliers":
        return f"other {len(chosen)} outliers {_done(mode, factor)}"
    return f"{len(chosen)} random weight{'s' if len(chosen) != 1 else ''} {_done(mode, factor)}"


def _done(mode: str, factor: float | None) -> str:
    return "zeroed" if mode == "zero" else f"scaled x{factor:g}"


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
    weights = unique_coords(validate_coords(model, weights))  # checked once: CheckedCoords pass at once
    matrices = DownProjections(model, writable=True)
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
    write_back(model, record.weights, record.original)


def write_back(model: nn.Module, weights: Sequence[SuperWeight], values: Sequence[torch.Tensor]) -> None:
    """Write `values`, read from `weights` before they were changed, back bit-exactly (in reverse
    order, so a repeated coordinate ends with its first value)."""
    matrices = DownProjections(model, writable=True)
    with torch.no_grad():
        for w, value in reversed(list(zip(weights, values))):
            matrices(w)[w.row, w.col] = value
    # A disk-offloaded matrix was held in memory while edited; unchanged again, it can go back.
    adapter = adapter_for(model)
    for layer, expert in dict.fromkeys((w.layer, w.expert) for w in weights):
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
    weights = unique_coords(validate_coords(model, weights))  # checked once: CheckedCoords pass at once
    matrices = DownProjections(model)
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
    weights = unique_coords(validate_coords(model, weights))  # checked once: CheckedCoords pass at once
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
    matrices = DownProjections(model)
    result = []
    for layer, expert, row, col in best_where[order].tolist():
        w = SuperWeight(layer, row, col, _CODE_EXPERT.get(expert, expert))
        result.append(SuperWeight(layer, row, col, w.expert, value=float(matrices(w)[row, col])))
    return result
