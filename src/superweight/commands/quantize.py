"""`sw quantize`: INT-N round-to-nearest with and without the super weights held out, per block
size (and per activation width), and the aware model saved if asked."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..brief_repr import BriefRepr
from ..versions import __version__
from ..coords import DEFAULT_SELECTION, check_selection, requested
from ..distributed import main_proceeds
from ..edit import quantize as rtn
from ..edit.quantize_activations import check_activations_supported, check_adapter_activations
from ..edit.save import describe_recorded_ablation, recorded_ablation
from ..measure.quantized import activation_quantization_compare, comparison_runs, weight_quantization_sweep
from ..report.plots import plot_sweep
from ..errors import UsageError
from ..files import atomic_directory, output_file
from ..measure.configurations import SummaryTable, summary_table
from ..model.adapters import adapter_for_config
from ..model.load import LoadedModel
from ..model.options import LoadOptions
from ..model.quiet import quiet_transformers
from ..measure.limits import check_limits
from .prepare import Coords, Model, batch_size_option, check_outputs, detected, model_source, ready_model, tasks_with_data
from .reporter import Reporter

DEFAULT_ACTIVATION_BITS = 8  # --activations without --activation-bits (None marks "not given": refused alone)


@dataclass(repr=False)
class QuantizationResult(BriefRepr):
    """Naive vs super-weight-aware round-to-nearest, per block size (and per activation width)."""

    document: dict[str, Any]  # the `sw quantize --json` document
    rows: list[dict[str, Any]]  # one per block size: baseline, naive and aware results
    activation_rows: list[dict[str, Any]]  # with activations=True: one per bit width
    spec: str
    bits: int
    z: float | str  # the clipping threshold, or "auto"

    def to_dict(self) -> dict[str, Any]:
        return self.document

    def weight_table(self) -> SummaryTable:
        return summary_table(comparison_runs(self.rows, lambda r: f"block {r['block_size']}"))

    def activation_table(self) -> SummaryTable:
        return summary_table(comparison_runs(self.activation_rows, lambda r: f"{r['bits']}-bit"))


def _save_quantized(loaded: LoadedModel, out: Path, force: bool, settings: dict[str, Any]) -> None:
    """The fake-quantized (dequantized values) model as safetensors, written atomically."""
    with atomic_directory(out, force=force) as tmp, quiet_transformers():
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / "superweight_quantization.json").write_text(json.dumps(
            {"source": loaded.source.spec, "location": loaded.source.location, **settings,
             "tool": f"superweight {__version__}"}, indent=2) + "\n")


def _block_sizes(block_size: Optional[list[int | str]]) -> Optional[list[int]]:
    if not block_size:
        return None
    texts = [str(size) for size in block_size]
    bad = next((text for text in texts if not text.strip().lstrip("-").isdigit()), None)
    if bad is not None:
        raise UsageError(f"--block-size must be a positive integer, got '{bad}'")
    sizes = [int(text) for text in texts]
    rtn.check_block_sizes(sizes)
    return sizes


def quantize_model(model: Model = None, *, coords: Coords = None, coord: Optional[list[str]] = None, select: str = DEFAULT_SELECTION,
                   bits: int = 4, block_size: Optional[list[int | str]] = None, z: float | str = "9",
                   activations: bool = False, activation_bits: Optional[int] = None, task: list[str] | str = ("wikitext",),
                   data_dir: Optional[str] = None, limit: Optional[int] = None, max_length: Optional[int] = None,
                   batch_size: int | str = "auto", plot: Optional[Path] = None, out: Optional[Path] = None, force: bool = False,
                   options: Optional[LoadOptions] = None,
                   reporter: Optional[Reporter] = None) -> Optional[QuantizationResult]:
    """`sw quantize`: evaluate INT`bits` RTN with and without the super weights held out, per block
    size; `plot` draws the sweep, `out` saves the aware model (one block size). A model given in
    memory is restored to its own weights after each quantization."""
    reporter = reporter or Reporter()
    check_selection(select)
    plot = output_file(plot)
    out = Path(out) if out is not None else None
    sizes = _block_sizes(block_size)
    rtn.check_bits(bits)
    if activation_bits is not None and not activations:
        raise UsageError(f"--activation-bits {activation_bits} sets the width of --activations' comparison, which "
                         "is not asked for; add --activations, or drop --activation-bits")
    activation_bits = rtn.check_bits(DEFAULT_ACTIVATION_BITS if activation_bits is None else activation_bits,
                                     "activation")
    z_value = rtn.parse_z(str(z))
    check_limits(limit, max_length)
    batch = batch_size_option(batch_size)
    names = tasks_with_data(list(task) if not isinstance(task, str) else task, data_dir)
    if out is not None and (not sizes or len(sizes) != 1):
        raise UsageError("--out saves one quantized model: give exactly one --block-size with it")
    source = model_source(model, options)
    check_outputs(source, plot=plot, directory=out, force=force, coords=coords)
    weights = requested(coords, coord, select, say=reporter.note)
    # --activations on a MoE model is refused before the load (minutes for a large one) where the config tells
    loaded, weights = ready_model(reporter, model, options, source, weights, coords, config_check=(
        (lambda config: check_adapter_activations(adapter_for_config(config)[0])) if activations else None))
    if activations:  # before the detection and the weight sweep, not after them
        check_activations_supported(loaded.model)
    ablation = recorded_ablation(source)  # a folder `sw ablate` wrote is quantized as written: say so
    if ablation:
        reporter.note(f"{source.spec} is {describe_recorded_ablation(ablation)}; it is quantized as written, so "
                      "'unquantized' is this folder, not the original model")
    grid = sizes or rtn.default_block_sizes(loaded.model)
    evaluation = dict(data_dir=data_dir, limit=limit, max_length=max_length, batch_size=batch)
    with reporter.bars() as bar:
        if not weights:
            weights = detected(reporter, loaded, bar, select)
        rows = weight_quantization_sweep(loaded.model, loaded.tokenizer, weights, grid, bits=bits, z=z_value,
                                             tasks=names, baseline=True, progress=bar, **evaluation)
        activation_rows = (activation_quantization_compare(loaded.model, loaded.tokenizer, weights,
                                                               bits=activation_bits, tasks=names, progress=bar,
                                                               **evaluation)
                           if activations else [])
    if not main_proceeds():  # every rank got here: rank 0 writes and prints
        return None
    if plot:
        plot_sweep(rows, plot, title=f"{source.spec}: INT{bits} round-to-nearest")
    if out is not None:
        with rtn.quantized_weights(loaded.model, bits=bits, block_size=grid[0], super_weights=weights,
                                   z=z_value) as record:
            _save_quantized(loaded, out, force, {"bits": bits, "block_size": grid[0], "z": z_value,
                                                 **({"chosen_z": record.to_dict()["chosen_z"]}
                                                    if z_value == rtn.AUTO_Z else {}),
                                                 "super_weights": [w.to_dict() for w in weights]})

    def without_baseline(row: dict[str, Any]) -> dict[str, Any]:  # the unquantized results appear once, at the top
        return {k: v for k, v in row.items() if k != "baseline"}

    document = {"model": {"spec": source.spec, "location": source.location, "superweight_ablation": ablation},
                "bits": bits, "z": z_value,
                "super_weights": [w.to_dict() for w in weights],
                "unquantized": rows[0].get("baseline") if rows else None,
                "weights": [without_baseline(r) for r in rows],
                "activations": [without_baseline(r) for r in activation_rows],
                "tool": f"superweight {__version__}"}
    return QuantizationResult(document=document, rows=rows, activation_rows=activation_rows, spec=source.spec,
                              bits=bits, z=z_value)
