"""`sw quantize --quantizer llama.cpp|llm-compressor|quanto|bitsandbytes`: a real quantizer run on
the user's model naive and with `sw export`'s names kept in high precision, both measured.

Why a `sw quantize` mode (not `sw export --measure` or a script): `sw quantize` already loads the
model, detects or reads the super weights, compares naive against super-weight-aware quantization
on the evaluation tasks and prints that table (`--json` too); `sw export` loads no weights. The
default `--quantizer rtn` is the paper's round-to-nearest, unchanged.

Everything is checked (quantizer installed, scheme known, coordinates, data) before the model is
converted or quantized; the quantizer's files live in a temporary folder removed afterwards, so a
refused run writes nothing.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..brief_repr import BriefRepr
from ..distributed import main_alone
from ..versions import __version__


@dataclass(repr=False)
class RealQuantizationResult(BriefRepr):
    document: dict  # the `sw quantize --quantizer ... --json` document
    task: str

    def to_dict(self) -> dict:
        return self.document

    def table(self) -> tuple[list[str], list[list[str]]]:
        from ..measure.real_quantized import table

        return table(self.document, self.task)


def _float_folder(source, work: Path, load_options: dict, say) -> Path:
    """A local safetensors folder as it is; anything else (hub id, GGUF) loaded and saved float32."""
    location = Path(source.location)
    if source.kind == "local" and location.is_dir() and any(location.glob("*.safetensors")):
        return location
    import torch

    from ..model.load import load_model

    loaded = load_model(source.spec, dtype="float32", device="cpu", **load_options)
    folder = work / "float32"
    loaded.model.to(torch.float32).save_pretrained(folder, safe_serialization=True)
    loaded.tokenizer.save_pretrained(folder)
    say(f"saved {source.spec} as float32 safetensors for the quantizer")
    return folder


# `sw quantize`'s options that belong to one kind of quantizer: given with the other they would do nothing.
RTN_ONLY = ("--bits", "--block-size", "--z", "--activations", "--activation-bits", "--plot", "--out", "--force")
REAL_ONLY = ("--scheme", "--quantizer-path")


def check_quantizer_options(quantizer: str, given: Sequence[str]) -> None:
    """Refuse an option of `given` (the flags the user typed) that `quantizer` would ignore."""
    from ..edit.real_quantizers import QUANTIZERS
    from ..errors import UsageError

    if quantizer not in QUANTIZERS:
        return  # quantize_with names the quantizers
    if quantizer == "rtn":
        wrong = next((flag for flag in given if flag in REAL_ONLY), None)
        if wrong:
            raise UsageError(f"{wrong} only applies to a real quantizer (--quantizer llama.cpp, llm-compressor, quanto "
                             f"or bitsandbytes), not to the default --quantizer rtn; add --quantizer NAME, or drop {wrong}")
        return
    wrong = next((flag for flag in given if flag in RTN_ONLY), None)
    if wrong:
        raise UsageError(f"{wrong} only applies to --quantizer rtn (round-to-nearest), not to --quantizer {quantizer} "
                         f"(its settings are --scheme); drop {wrong}")


# Under a launcher rank 0 alone runs it, as one process: the quantizer's files are in a temporary
# folder of its own, where no other rank (maybe on another node) could read them to share the
# scoring, and the quantizer itself is one program run once; the other ranks get None.
@main_alone
def quantize_with(model: Optional[str] = None, *, quantizer: str, scheme: Optional[str] = None,
                  quantizer_path: Optional[str] = None, coords: Optional[Path] = None,
                  coord: Optional[list[str]] = None, select: str = "super", task: list[str] | str = ("wikitext",),
                  data_dir: Optional[str] = None, limit: Optional[int] = None, max_length: Optional[int] = None,
                  batch_size: int | str = "auto", options=None, reporter=None) -> Optional[RealQuantizationResult]:
    """`sw quantize --quantizer Q`: the real quantizer Q run naive and with the super weights'
    matrices kept in high precision, compared (edit/real_quantizers.py, measure/real_quantized.py)."""
    from ..coords import requested
    from ..edit import real_quantizers as rq
    from ..edit.validate import check_coords_before_load
    from ..errors import UsageError
    from ..measure import real_quantized
    from ..measure.tasks import load_task, resolve_task_names
    from ..model.source import resolve
    from ..coords import check_selection
    from ..measure.limits import check_limits
    from ..model.options import LoadOptions
    from .prepare import batch_size_option
    from .reporter import Reporter

    reporter = reporter or Reporter()
    check_selection(select)
    options = options or LoadOptions()
    placement = {"--dtype": options.dtype != "auto", "--device": options.device != "auto",
                 "--device-map": options.device_map is not None, "--max-memory": options.max_memory is not None}
    if any(placement.values()):
        raise UsageError(f"{next(flag for flag, given in placement.items() if given)} does not apply to a real "
                         "quantizer: it quantizes the float32 checkpoint itself and is measured on the CPU; drop it")
    batch = batch_size_option(batch_size)
    if quantizer == "llama.cpp" and batch != "auto":
        raise UsageError("--batch-size does not apply to --quantizer llama.cpp: llama-perplexity scores its files; "
                         "drop --batch-size")
    revision, gguf_file, cache_dir = options.revision, options.gguf_file, options.cache_dir
    trust_remote_code = options.trust_remote_code
    settings = rq.parse_scheme(quantizer, scheme)
    tools = rq.find_tools(quantizer, quantizer_path)
    check_limits(limit, max_length)
    names = resolve_task_names(list(task) if not isinstance(task, str) else task)
    for name in names:
        load_task(name, data_dir, limit=1)
    load_options = dict(revision=revision, gguf_file=gguf_file, cache_dir=cache_dir,
                        trust_remote_code=trust_remote_code)
    source = resolve(model, revision=revision, gguf_file=gguf_file, cache_dir=cache_dir)
    weights = requested(coords, coord, select, say=reporter.note)
    check_coords_before_load(source, weights, trust_remote_code=trust_remote_code)
    with tempfile.TemporaryDirectory(prefix="sw-quantize-") as tmp:
        work = Path(tmp)
        with reporter.status(f"preparing {source.spec}") as update:
            if not weights:  # detected and narrowed by --select as every command does
                from ..model.load import load_model
                from .prepare import detected

                weights = detected(reporter, load_model(source.spec, dtype="float32", device="cpu", **load_options),
                                   select=select)
            if not weights:
                raise UsageError(f"no super weights found in {source.spec}: nothing to keep; pass --coords")
            folder = _float_folder(source, work, load_options, reporter.say)
            document = real_quantized.compare(folder, weights, tools, settings, tasks=names, work=work,
                                              data_dir=data_dir, limit=limit, max_length=max_length,
                                              batch_size=batch, progress=update)
    document = {"model": {"spec": source.spec, "location": source.location},
                "super_weights": [w.to_dict() for w in weights], **document, "tasks": names, "limit": limit,
                "max_length": max_length, "tool": f"superweight {__version__}"}
    return RealQuantizationResult(document=document, task=names[0])
