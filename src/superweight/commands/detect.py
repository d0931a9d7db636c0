"""`sw detect`: find the super weights; write the coordinates file (and the plot) where asked."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ..brief_repr import BriefRepr
from ..versions import __version__
from ..coords import Coordinates, SuperWeight, write_coords
from ..distributed import main_alone
from ..errors import UsageError
from ..files import output_file
from ..find.detect import DEFAULT_ITERATIONS, DEFAULT_PROMPT, Detection, SpikeRule, detect, encode_prompt
from ..find.stream import Checkpoint, detect_streamed, open_checkpoint
from ..edit.save import describe_recorded_ablation, recorded_ablation
from ..measure.verify import Verification, check_attribution, labelled, read_verify_text, verify as measure_effects
from ..model.adapters import adapter_for_config, resolve_adapter, tensor_templates
from ..model.context import model_max_length
from ..model.load import LoadedModel
from ..model.options import LoadOptions
from ..report.detection import KnownCheck, check_known, detection_document
from ..report.plots import plot_activations
from .prepare import Model, NamedAfterModel, check_outputs, model_source
from .reporter import Reporter


# `sw detect`'s --out when none is given; the library writes a coordinates file only to an `out=` given
DEFAULT_OUT = NamedAfterModel(".superweights.yaml")


@dataclass(repr=False)
class DetectionResult(BriefRepr):
    """What `detect_model` found (and wrote, with `out=`). Give it as `coords=` to the other
    command functions: it stands for the coordinates file it wrote or would have written."""

    shown = ("super_weights",)  # the candidates (labelled, with verify=True), in the repr

    detection: Detection  # super_weights, per-layer stats, iterations
    verification: Optional[Verification]  # with verify=True
    known: Optional[KnownCheck]  # against the paper's published coordinates, for a model it lists
    model: dict  # spec, location, kind, model_type, dtype
    coords_path: Optional[Path]  # None: no out= given, nothing written
    plot: Optional[Path]
    coords_meta: dict  # the coordinates file's other fields (model made for, model_type, tensor, prompt, ...)

    @property
    def super_weights(self) -> list[SuperWeight]:
        return self.detection.super_weights

    @property
    def coordinates(self) -> Coordinates:
        """What `coords=` reads from this result: the file's content, without the file."""
        name = str(self.coords_path) if self.coords_path else f"the detection of {self.model['spec']}"
        return Coordinates(list(self.super_weights), self.coords_meta, name, self.coords_path)

    def to_dict(self) -> dict:
        """The `sw detect --json` document."""
        document = detection_document(self.detection, self.model, self.known)
        document["coordinates_file"] = str(self.coords_path) if self.coords_path else None
        document["verification"] = self.verification.to_dict() if self.verification else None
        return document


def _check_options(text: str, iterations: int, stream: bool, options: LoadOptions, verify: bool,
                   verify_text: Optional[Path], in_memory: bool, attribution: str = "auto") -> None:
    if iterations < 1:
        raise UsageError(f"--iterations must be at least 1, got {iterations}")
    if not text.strip():
        raise UsageError("--prompt is empty; give a non-empty prompt (default: the paper's sentence)")
    if stream and in_memory:
        raise UsageError("stream=True reads a checkpoint one layer at a time; this model is already in memory")
    if stream and (options.device_map or options.max_memory):
        raise UsageError("--stream puts one layer at a time on --device; drop --device-map/--max-memory")
    if verify_text is not None and not verify:
        raise UsageError("--verify-text is the text --verify measures on; add --verify, or drop --verify-text")
    if attribution != "auto" and not verify:
        raise UsageError(f"--attribution {attribution} splits the effect --verify measures; add --verify, "
                         f"or drop --attribution")
    if verify and stream:
        raise UsageError("--verify needs the whole model loaded to measure perplexity; drop --stream "
                         "(or verify later with `sw eval --coords`)")


@main_alone  # under a launcher rank 0 alone runs it, as one process
def detect_model(model: Model = None, *, prompt: Optional[str] = None, iterations: Optional[int] = None,
                 min_spike: Optional[float] = None, min_concentration: Optional[float] = None,
                 min_share: Optional[float] = None, out: Union[Path, NamedAfterModel, None] = None,
                 plot: Optional[Path] = None, stream: bool = False, verify: bool = False,
                 verify_text: Optional[Path] = None, attribution: str = "auto", chat_template: bool = False, force: bool = False,
                 options: Optional[LoadOptions] = None,
                 reporter: Optional[Reporter] = None) -> Optional[DetectionResult]:
    """`sw detect`: find the super weights; write the coordinates file to `out` and the plot to
    `plot`, each only where given (the result stands for the file as `coords=` of the other
    functions). An existing file (which may hold a --verify's roles) is only replaced with `force`."""
    reporter = reporter or Reporter()
    in_memory = isinstance(model, LoadedModel)
    text = DEFAULT_PROMPT if prompt is None else prompt
    n = DEFAULT_ITERATIONS if iterations is None else iterations
    check_attribution(attribution)
    _check_options(text, n, stream, options or LoadOptions(), verify, verify_text, in_memory, attribution)
    verify_source = read_verify_text(verify_text) if verify else None  # a bad file fails before the model loads
    given = {"min_spike": min_spike, "min_concentration": min_concentration, "min_share": min_share}
    rule = SpikeRule(**{name: value for name, value in given.items() if value is not None})
    source = model_source(model, options)
    coords_path = out.path(source) if isinstance(out, NamedAfterModel) else output_file(out)
    plot = output_file(plot)
    check_outputs(source, files=(coords_path,), plot=plot, force=force,
                  inputs={verify_text: "the --verify-text file"})
    load = options or LoadOptions()
    with reporter.status(f"loading {source.spec}") as update:
        loaded: Union[LoadedModel, Checkpoint]
        if in_memory:
            loaded = model
        elif stream:  # no weights loaded here: config and tokenizer only
            loaded = open_checkpoint(model, revision=load.revision, gguf_file=load.gguf_file, dtype=load.dtype,
                                     cache_dir=load.cache_dir, trust_remote_code=load.trust_remote_code,
                                     progress=update, notice=reporter.say)
        else:
            loaded = load.load(model, progress=update, notice=reporter.say)
        update(f"detecting: {n} iteration(s) at most" + (", one layer at a time" if stream else ""))
        context = model_max_length(loaded.config if stream else loaded.model, loaded.tokenizer)
        input_ids = encode_prompt(loaded.tokenizer, text, chat_template=chat_template, max_length=context)
        if stream:
            detection = detect_streamed(loaded, input_ids, device=load.device, iterations=n, rule=rule, prompt=text)
        else:
            detection = detect(loaded.model, input_ids, iterations=n, rule=rule, prompt=text)
        verification = None
        if verify_source:
            prior = recorded_ablation(source)
            verification = measure_effects(loaded.model, loaded.tokenizer, detection.super_weights,
                                           text=verify_source[0], text_source=verify_source[1], rule=rule,
                                           iterations=n, attribution=attribution, chat_template=chat_template,
                                           recorded_ablation=describe_recorded_ablation(prior) if prior else None,
                                           progress=update)
            detection.super_weights = labelled(detection.super_weights, verification)
    if not in_memory:
        reporter.say(f"{'opened' if stream else 'loaded'} {source.spec} ({loaded.dtype}) in "
                     f"{loaded.load_seconds:.1f} s" + (" from the GGUF cache" if loaded.from_cache else ""))
    config = loaded.config if stream else loaded.model.config
    model_info = {"spec": source.spec, "location": source.location, "kind": source.kind,
                  "model_type": config.model_type, "dtype": loaded.dtype}
    known = check_known(detection.super_weights, source.known_key, source.location)
    adapter, note = adapter_for_config(config) if stream else resolve_adapter(loaded.model)
    if note:
        reporter.note(note)
    # A local model (or the .gguf file read, downloaded ones included) by its absolute path: `sw
    # export FILE` (whose MODEL defaults to this) then finds it from any directory; an alias or hub
    # id as typed (identity.py compares those). abspath, not resolve: the hub cache's files are links.
    made_for = source.spec if source.kind == "hub" or source.alias else os.path.abspath(source.location)
    meta = dict(model=made_for, model_type=config.model_type, **tensor_templates(adapter),
                prompt=text, chat_template=chat_template, tool=f"superweight {__version__}")
    if coords_path:
        write_coords(coords_path, detection.super_weights, **meta)
    if plot:
        plot_activations(detection, plot, title=f"{source.spec}: down-projection activations")
    return DetectionResult(detection=detection, verification=verification, known=known, model=model_info,
                           coords_path=coords_path, plot=plot, coords_meta=meta)
