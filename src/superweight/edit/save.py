"""Saving an ablated model: its weights (safetensors), its tokenizer and a JSON record of what was
done, atomically, never inside the model's own directory; and reading that record back, so an
evaluation of the saved model does not pass it off as the original.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .ablate import AblationRecord, ablated_name, control_name, write_back
from .validate import holds_recorded
from ..errors import CoordinatesError, UsageError
from ..files import atomic_directory, refuse_inside
from ..coords import SuperWeight
from ..model.adapters import DownProjections
from ..model.load import LoadedModel
from ..model.quiet import quiet_transformers
from ..model.source import ModelSource
from ..versions import __version__

RECORD_FILE = "superweight_ablation.json"


def save_ablated(loaded: LoadedModel, record: AblationRecord, out_dir: str | Path, force: bool = False) -> Path:
    """Save the ablated model (safetensors), its tokenizer and `superweight_ablation.json` to
    `out_dir`, atomically: an interrupted or failed save leaves nothing there.

    Refuses `out_dir` inside the model's own directory (or the hub cache), and an existing non-empty
    `out_dir` unless `force`. The model must be in the state `record` describes (ablated). A GGUF
    model's leftover quantizer is dropped for the save (its weights are plain floats).
    """
    out_dir = Path(out_dir)
    refuse_inside(out_dir, loaded.source.output_protected_dirs)
    model = loaded.model
    matrices = DownProjections(model)
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
        with atomic_directory(out_dir, force) as tmp, quiet_transformers():
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


def recorded_ablation(source: ModelSource) -> dict[str, Any] | None:
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
    """One line for tables: "ablated by superweight: 5 candidates zeroed (source smollm2-135m)", with
    the name `sw ablate` printed and recorded. An older record keeps no name, nor the weights' roles:
    it is named from its coordinates and control ("2 weights zeroed", "1 random weight zeroed")."""
    if "unreadable" in record:
        return f"ablated by superweight (its {RECORD_FILE} is unreadable)"
    name = record.get("name")
    if not isinstance(name, str) or not name:
        name = _name_of_unnamed(record)
    source = (record.get("source") or {}).get("spec")
    return f"ablated by superweight: {name}" + (f" (source {source})" if source else "")


def recorded_weights(record: dict[str, Any]) -> list[SuperWeight]:
    """The weights `record` (a folder's superweight_ablation.json) says the ablation changed, with
    what it keeps of their detection and verification (`ablate.RECORDED_FIELDS`: iteration, role,
    output_spike, raw_output; a record written before it kept them has none: its weights are named
    as coordinates, "2 weights", and their activation restored above the default floor)."""
    coordinates = [c for c in record.get("coordinates") or [] if isinstance(c, dict)]
    return [SuperWeight(c.get("layer"), c.get("row"), c.get("col"), c.get("expert"),
                        iteration=_typed(c.get("iteration"), int), role=_typed(c.get("role"), str),
                        output_spike=_typed(c.get("output_spike"), float),
                        raw_output=_typed(c.get("raw_output"), float))
            for c in coordinates]


def _typed(value: Any, kind: type) -> Any:
    """`value` if it is a `kind` (a bool is no number; an int is a float, a NaN none), else None: a
    hand-edited record names no role."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is float and not math.isfinite(value)):
        return None
    return value


def _name_of_unnamed(record: dict[str, Any]) -> str:
    weights = recorded_weights(record)
    factor = record.get("factor")
    scaled = record.get("mode") != "zero" and isinstance(factor, (int, float)) and not isinstance(factor, bool)
    mode, factor = ("scale", factor) if scaled else ("zero", None)
    control = (record.get("control") or {}).get("kind")
    return control_name(weights, control, mode, factor) if control else ablated_name(weights, mode, factor)


def recorded_originals(record: dict[str, Any] | None,
                       weights: Sequence[SuperWeight]) -> list[tuple[float, float]] | None:
    """The (original, ablated) values `record` (a folder's superweight_ablation.json) holds for
    every one of `weights`, in their order; None unless it holds all of them (a control's record
    holds none)."""
    if not record or (record.get("control") or {}).get("kind") or not weights:
        return None
    values = {}
    for coordinate, original, new in zip(record.get("coordinates") or [], record.get("original_values") or [],
                                         record.get("new_values") or []):
        key = (coordinate.get("layer"), coordinate.get("row"), coordinate.get("col"), coordinate.get("expert"))
        values[key] = (float(original), float(new))
    found = [values.get(w.key) for w in weights]
    return None if any(v is None for v in found) else found


@contextmanager
def recorded_values_put_back(model: nn.Module, weights: Sequence[SuperWeight],
                             recorded: Sequence[tuple[float, float]]) -> Iterator[None]:
    """Within the block, `model` holds the recorded original values of `weights` (in memory only:
    the folder on disk is never touched), so that a folder written by `sw ablate` can be measured as
    original, zeroed and restored from its own record; on exit (also on an error) the ablated values
    are back, bit-exactly: a model given in memory is left as it was given. A weight that no longer
    holds the value the record says the ablation left is refused: the folder was changed since, and
    the record is not its story."""
    matrices = DownProjections(model, writable=True)
    ablated = [matrices(w)[w.row, w.col].clone() for w in weights]
    for w, value, (_, recorded_ablated) in zip(weights, ablated, recorded):
        if not holds_recorded(float(value), recorded_ablated):
            raise CoordinatesError(
                f"coordinate {w.label()}: {RECORD_FILE} records the weight as {recorded_ablated:.6g} after the "
                f"ablation, but this model holds {float(value):.6g} there: the folder was changed after "
                "`sw ablate`; ablate the original model again"
            )
    try:
        with torch.no_grad():
            for w, (original, _) in zip(weights, recorded):
                matrix = matrices(w)
                matrix[w.row, w.col] = torch.tensor(original, dtype=matrix.dtype)
        yield
    finally:
        write_back(model, weights, ablated)
