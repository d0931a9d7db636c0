"""Whether coordinates name weights of a model: THE one place they are checked.

* `check_coords_before_load`: against the model's config (a weightless model) or a GGUF's header,
  before any weight is read, so a wrong file fails in a second, not after a load.
* `validate_coords`: against a model; it returns the coordinates as `CheckedCoords`, which
  `apply`, the controls and the restoration take without checking them again, so a command checks
  its coordinates once.
* `check_recorded_values`: the values `sw detect` recorded are the values this model holds (the
  file was not made for another model).
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Iterable, Sequence

from torch import nn

from ..coords import SHARED_EXPERT, SuperWeight
from ..errors import CoordinatesError
from ..model.adapters import DownProjections, adapter_for, decoder_layers, down_proj_matrix, layer_experts, num_experts
from ..model.gguf import gguf_dense_shape
from ..model.hub import hub_options, read_config
from ..model.load import weightless_model
from ..model.source import ModelSource

ANOTHER_MODEL = "were the coordinates made for another model?"  # a --coord as much as a file
RECORDED_VALUE_RTOL = 0.01  # a recorded value vs the model's: bfloat16 rounds by up to 2**-8 relative


class CheckedCoords(tuple):
    """Coordinates `validate_coords` found to name weights of one model (held weakly): given back
    for that model they are not checked again; for any other model they are."""

    def __new__(cls, model: nn.Module, weights: Iterable[SuperWeight]) -> "CheckedCoords":
        checked = super().__new__(cls, weights)
        checked._model = weakref.ref(model)
        return checked

    def checked_for(self, model: nn.Module) -> bool:
        return self._model() is model


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def unique_coords(weights: Sequence[SuperWeight]) -> list[SuperWeight]:
    """Drop repeated coordinates (keeping the first): scaling one weight twice is never meant."""
    seen: set[tuple] = set()
    unique = []
    for w in weights:
        if w.key not in seen:
            seen.add(w.key)
            unique.append(w)
    return unique


def validate_coords(model: nn.Module, weights: Sequence[SuperWeight]) -> CheckedCoords:
    """Raise `CoordinatesError` unless every coordinate names a weight of this model.

    Checks layer, expert (present exactly when the layer has experts, and in range, or "shared" where
    the layer has a shared expert),
    row and col against the down projection's shape. Nothing is touched. The coordinates come back
    as `CheckedCoords`; given back for the same model, they are returned at once.
    """
    if isinstance(weights, CheckedCoords) and weights.checked_for(model):
        return weights
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
                    f"{where}: {name} must be a non-negative integer, got {value!r}; {ANOTHER_MODEL}"
                )
        if w.layer >= n_layers:
            raise CoordinatesError(
                f"{where}: layer {w.layer} is out of range; this model has {n_layers} decoder layers "
                f"(valid 0..{n_layers - 1}); {ANOTHER_MODEL}"
            )
        experts = layer_experts(model, w.layer, adapter)
        if experts == [None] and w.expert is not None:
            raise CoordinatesError(
                f"{where}: names expert {w.expert}, but "
                + ("this model has no experts" if n_experts is None else f"layer {w.layer} is a dense layer")
                + f"; {ANOTHER_MODEL}"
            )
        if experts != [None]:
            if w.expert is None:
                shared = f" or LAYER,ROW,COL,{SHARED_EXPERT}" if SHARED_EXPERT in experts else ""
                raise CoordinatesError(
                    f"{where}: names no expert, but this is a mixture-of-experts model with {n_experts} experts "
                    f"(write LAYER,ROW,COL,EXPERT{shared}); {ANOTHER_MODEL}"
                )
            if w.expert == SHARED_EXPERT and SHARED_EXPERT not in experts:
                raise CoordinatesError(f"{where}: names the shared expert, but this model has none; {ANOTHER_MODEL}")
            if w.expert != SHARED_EXPERT and (not _is_index(w.expert) or not 0 <= w.expert < n_experts):
                raise CoordinatesError(
                    f"{where}: expert {w.expert} is out of range; this model has {n_experts} experts per layer "
                    f"(valid 0..{n_experts - 1}); {ANOTHER_MODEL}"
                )
        key = (w.layer, w.expert)
        if key not in shapes:
            shapes[key] = tuple(down_proj_matrix(model, w.layer, w.expert, adapter, writable=False).shape)
        out_features, in_features = shapes[key]
        if w.row >= out_features:
            raise CoordinatesError(
                f"{where}: row {w.row} is out of range; layer {w.layer}'s down projection has {out_features} "
                f"output (hidden) channels (valid rows 0..{out_features - 1}); {ANOTHER_MODEL}"
            )
        if w.col >= in_features:
            raise CoordinatesError(
                f"{where}: col {w.col} is out of range; layer {w.layer}'s down projection has {in_features} "
                f"input (intermediate) channels (valid cols 0..{in_features - 1}); {ANOTHER_MODEL}"
            )
    return CheckedCoords(model, weights)


def config_before_load(source: ModelSource, trust_remote_code: bool = False) -> Any | None:
    """The config of a hub model or local directory, read before its weights (what checks that
    need only the config run on); None for a GGUF (its config comes out of the dequantisation) or
    a config that cannot be read here (the load reports it)."""
    if source.kind not in ("hub", "local"):
        return None
    try:
        return read_config(source, source.location, hub_options(source, trust_remote_code, lambda message: None))
    except Exception:  # noqa: BLE001 - any failure here is the load's to report
        return None


def check_coords_before_load(source: ModelSource, weights: Sequence[SuperWeight], *,
                             trust_remote_code: bool = False, config: Any | None = None) -> bool:
    """Out-of-range coordinates fail before the weights are read: `validate_coords` on a
    weightless (meta-device) model built from the config of a local directory or hub model; for a
    dense GGUF, layer/row/col against the sizes in its header (its config only comes out of the
    dequantisation). A config that cannot be read is left to the load, which reports it.

    `config`: the one `config_before_load` read already for another check (read here otherwise).
    Returns whether every coordinate was checked against the model's shapes (then the loaded model
    need not check them again: `checked_coords(..., ranges_checked=True)`)."""
    if not weights:
        return True
    if source.kind == "gguf":
        shape = gguf_dense_shape(source.location)
        if shape is not None:
            _check_dense_ranges(weights, *shape)
        return False  # the header's sizes, not the dequantised model's own shapes: check those after the load
    config = config if config is not None else config_before_load(source, trust_remote_code)
    if config is None:
        return False
    try:
        skeleton = weightless_model(config, trust_remote_code)
    except Exception:  # noqa: BLE001 - any failure here is the load's to report
        return False
    validate_coords(skeleton, weights)
    return True


def _check_dense_ranges(weights: Sequence[SuperWeight], n_layers: int, hidden: int, intermediate: int) -> None:
    """validate_coords' range checks for a dense model known only by its sizes."""
    for w in weights:
        where = f"coordinate {w.label()}"
        for name, value, size, what in (("layer", w.layer, n_layers, "decoder layers"),
                                        ("row", w.row, hidden, "output (hidden) channels"),
                                        ("col", w.col, intermediate, "input (intermediate) channels")):
            if value >= size:
                raise CoordinatesError(f"{where}: {name} {value} is out of range; this model has {size} {what} "
                                       f"(valid 0..{size - 1}); {ANOTHER_MODEL}")
        if w.expert is not None:
            raise CoordinatesError(f"{where}: names expert {w.expert}, but this model has no experts; {ANOTHER_MODEL}")


def holds_recorded(current: float, recorded: float) -> bool:
    """Whether a weight holds the value a file recorded for it, within what rounding to the model's
    dtype moves it (a file written in float32, a model loaded in half precision)."""
    return math.isclose(current, recorded, rel_tol=RECORDED_VALUE_RTOL, abs_tol=1e-6)


def check_recorded_values(model: nn.Module, weights: Sequence[SuperWeight]) -> None:
    """Raise `CoordinatesError` when a weight's value recorded by `sw detect` is not the value this
    model holds there: the file was made for another model (or this one is already ablated).

    In-range coordinates of another model would otherwise be applied without a word.
    """
    matrices = DownProjections(model)
    for w in weights:
        if w.value is None:
            continue
        current = float(matrices(w)[w.row, w.col])
        if not holds_recorded(current, w.value):
            raise CoordinatesError(
                f"coordinate {w.label()}: the file records the weight as {w.value:.6g}, but this model holds "
                f"{current:.6g} there; {ANOTHER_MODEL} (or is this model already ablated?) Run `sw detect` on it"
            )


def checked_coords(model: nn.Module, weights: Sequence[SuperWeight], *, ranges_checked: bool = False) -> CheckedCoords:
    """The one check of a command's coordinates on its loaded model: in range (unless
    `check_coords_before_load` checked them already: `ranges_checked`) and holding the values
    `sw detect` recorded. Give the result to `apply`, the controls, the restoration."""
    checked = CheckedCoords(model, weights) if ranges_checked else validate_coords(model, weights)
    check_recorded_values(model, checked)
    return checked
