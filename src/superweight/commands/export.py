"""`sw export`: the super weights' matrices under the model's own names, in a quantizer's format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..brief_repr import BriefRepr
from ..coords import DEFAULT_SELECTION, check_selection, coordinates, no_candidates_error, select_weights
from ..distributed import main_alone
from ..edit import export as handoff
from ..edit.export import Export
from ..errors import SuperweightError, UsageError
from ..files import atomic_write_text, output_file
from ..model.load import LoadedModel
from ..model.options import LoadOptions
from .prepare import Coords, Model, check_outputs, model_source
from .reporter import Reporter


@dataclass(repr=False)
class ExportResult(BriefRepr):
    """What a quantizer needs to keep the super weights' matrices in high precision."""

    export: Export  # content, modules, gguf_tensors, usage, checked
    out: Optional[Path]

    @property
    def content(self) -> str:
        return self.export.content

    def to_dict(self) -> dict[str, Any]:
        """The `sw export --json` document."""
        return {**self.export.to_dict(), "out": str(self.out) if self.out else None}


@main_alone  # under a launcher rank 0 alone runs it, as one process
def export_names(coords_file: Coords, *, to: str, model: Model = None, gguf: Optional[Path] = None,
                 ggml_type: str = "f16", out: Optional[Path] = None, select: str = DEFAULT_SELECTION,
                 force: bool = False, options: Optional[LoadOptions] = None,
                 reporter: Optional[Reporter] = None) -> ExportResult | None:
    """`sw export`: the super weights' matrices under this model's own names, in the format of
    llama.cpp, bitsandbytes or llm-compressor, checked against the model's checkpoint (its config:
    no weights are read); written to `out` if given. `coords_file` is a coordinates file, or
    `detect_model`'s result. MODEL defaults to the one the coordinates name; a model in memory
    stands for the checkpoint it was loaded from. Under a launcher rank 0 alone exports (the others
    return None): one writer."""
    reporter = reporter or Reporter()
    out = output_file(out)
    handoff.check_format(to)
    check_selection(select)
    given = coordinates(coords_file)
    weights, meta = given.weights, given.meta
    if not weights:
        raise no_candidates_error(given.name, "keep")
    selection = select_weights(weights, select, given.name)
    reporter.note("keeping the matrices of " + selection.reason + ": "
                  + ", ".join(w.label() for w in selection.weights))
    weights = selection.weights
    if isinstance(model, LoadedModel):
        if model.source.kind == "memory":
            raise UsageError("export checks names against the checkpoint a quantizer reads, and this model was "
                             "not read from one; save it (save_pretrained) and give its directory")
        source = model_source(model, options)
        spec = source.spec if source.kind == "hub" else source.location  # read again from where it came
        load = LoadOptions(revision=source.revision, cache_dir=source.cache_dir)
    else:
        spec = model or (meta.get("model") if isinstance(meta.get("model"), str) else None)
        load = options or LoadOptions()
        try:
            source = load.resolve(spec)
        except SuperweightError as error:
            if model or spec is None:
                raise
            # the model the file names, moved or deleted since `sw detect` wrote it
            raise type(error)(f"the model {given.name} was made for cannot be read: {error}; or give the checkpoint "
                              "to check the names against with --model") from None
    if out is not None:
        check_outputs(source, files=(out,), force=force, coords=given, inputs={gguf: "the GGUF file"})
    with reporter.status(f"checking names against {source.spec}") as update:
        result = handoff.export(weights, to, spec=spec, revision=load.revision, gguf_file=load.gguf_file,
                                cache_dir=load.cache_dir, trust_remote_code=load.trust_remote_code, gguf=gguf,
                                ggml_type=ggml_type, out_name=str(out or "FILE"), hub_id=_hub_id(source),
                                progress=update, coords=given, warn=reporter.warn)
    if out is not None:
        atomic_write_text(out, result.content)
    return ExportResult(export=result, out=out)


def _hub_id(source) -> Optional[str]:
    """The hub id of a registered model (a GGUF alias's full-precision checkpoint), or None."""
    from ..report.known import lookup

    known = lookup(source.known_key, source.location if source.kind == "hub" else None)
    return known.hub[0] if known is not None and known.hub else None
