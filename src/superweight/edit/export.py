"""Hand-off to real quantizers: keep the matrices that hold super weights in high precision.

`export(weights, fmt)` names each super weight's down projection the way the quantizer names it,
checks every name against the model (built on the meta device from its config: no weights are
loaded) and, for llama.cpp, against the GGUF's own tensor list, and renders what the quantizer reads:

* `llama.cpp`: a `llama-quantize --tensor-type-file` file, one `PATTERN=TYPE` per line. llama-quantize
  lower-cases PATTERN and uses it as a regular expression searched in each GGUF tensor name, so
  each pattern is the escaped full name, anchored (`^blk\\.11\\.ffn_down\\.weight$`): `blk.1.ffn_down`
  alone would also hit `blk.1.ffn_down_exps` and dots would match any character.
* `bitsandbytes`: JSON with `llm_int8_skip_modules` (BitsAndBytesConfig) and `modules_to_not_convert`
  (transformers' other quantization configs). Giving either replaces transformers' default skips
  (the output head, tied and last modules), so those defaults, as transformers computes them for this
  model, come first in the list.
* `llm-compressor`: a recipe whose QuantizationModifier `ignore` list (compressed-tensors matches a
  plain entry against the exact module name) holds the output head and the super weights' modules.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml
from torch import nn

from .validate import check_recorded_values, unique_coords, validate_coords
from ..model.adapters import (adapter_for, decoder_layers, down_proj_path, down_proj_tensor, gguf_architecture,
                               tensor_name)
from ..coords import Coordinates, SuperWeight
from ..errors import CoordinatesError, ModelLoadError, UsageError
from ..find.stream import safetensors_files
from ..model.gguf import dequantized_gguf
from ..model.hub import hub_options, read_config
from ..model.identity import coordinates_mismatch
from ..model.load import weightless_model
from ..model.source import ModelSource, resolve
from ..versions import package_version

FORMATS = ("llama.cpp", "bitsandbytes", "llm-compressor")
DEFAULT_GGML_TYPE = "f16"
DEFAULT_SCHEME = "W4A16"  # the recipe's scheme; the user edits it for another


@dataclass
class Export:
    format: str
    model: str
    modules: list[str]  # the super weights' down projections, as transformers names the modules
    gguf_tensors: list[str]  # the same matrices in GGUF (llama.cpp only)
    keep: list[str]  # every name the quantizer is given (defaults included)
    content: str
    usage: str  # the command that consumes `content`
    checked: list[str] = field(default_factory=list)  # what the names were checked against

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise UsageError(f"unknown --to format '{fmt}'; use one of {', '.join(FORMATS)}")
    return fmt


def check_ggml_type(name: str) -> str:
    """A GGML tensor type as llama-quantize spells it (case-insensitive), e.g. f16, bf16, q8_0."""
    from gguf import GGMLQuantizationType

    known = {t.name.lower() for t in GGMLQuantizationType}
    if not isinstance(name, str) or name.lower() not in known:
        raise UsageError(f"unknown GGML type '{name}' for --type; use e.g. f16, bf16, f32 or q8_0")
    return name.lower()


# ----------------------------------------------------------------------------- the model, without weights


@dataclass
class _Skeleton:
    model: nn.Module  # on the meta device, except the down projections read for the value check
    source: ModelSource
    files: dict[str, Path]  # checkpoint tensor -> safetensors file (empty for a hub model: nothing fetched)


def _skeleton(spec: str | None, *, revision: str | None, gguf_file: str | None, cache_dir: str | None,
              trust_remote_code: bool, progress: Callable[[str], None]) -> _Skeleton:
    source = resolve(spec, revision=revision, gguf_file=gguf_file, cache_dir=cache_dir)
    options: dict[str, Any] = {}
    if source.kind == "gguf":  # the dequantised cache that every command reads (written once)
        location, _ = dequantized_gguf(source, "auto", cache_dir, progress, progress)
    else:
        location = Path(source.location) if source.kind == "local" else source.location
        options = hub_options(source, trust_remote_code, progress)  # no ~30 s of retries when the hub is out of reach
    progress(f"reading config of {source.spec}")
    config = read_config(source, location, options)
    model = weightless_model(config, trust_remote_code)
    files: dict[str, Path] = {}
    if isinstance(location, Path):
        try:
            files = safetensors_files(location, source.spec)
        except ModelLoadError:
            if any(location.glob("*.safetensors")):
                raise  # a damaged weight file is an error, never a reason to skip the stored values
            files = {}  # pickles only: the recorded values cannot be read without loading them
    return _Skeleton(model, source, files)


def _read_down_projections(skeleton: _Skeleton, weights: Sequence[SuperWeight]) -> list[SuperWeight]:
    """Put the stored matrices that hold `weights` into the meta model (where the checkpoint is on
    this machine); returns the weights whose matrix was read."""
    from safetensors import safe_open

    model = skeleton.model
    read = []
    for layer, expert in _matrices(weights):
        name = tensor_name(model, layer, expert=expert)
        if name not in skeleton.files:
            continue
        with safe_open(skeleton.files[name], framework="pt") as f:
            tensor = f.get_tensor(name)
        module, attribute = down_proj_tensor(model, layer, expert)
        setattr(module, attribute, nn.Parameter(tensor, requires_grad=False))
        read += [w for w in weights if (w.layer, _tensor_expert(w.expert)) == (layer, _tensor_expert(expert))]
    return read


# ----------------------------------------------------------------------------- names


def _matrices(weights: Sequence[SuperWeight]) -> list[tuple[int, Any]]:
    """(layer, expert) of each tensor that holds `weights`, in layer order: routed experts share one
    (fused) tensor, while a shared expert or a mixture-of-experts model's dense layer has its own."""
    by_tensor = {(w.layer, _tensor_expert(w.expert)): w.expert for w in weights}
    return sorted(((layer, expert) for (layer, _), expert in by_tensor.items()), key=lambda m: (m[0], str(m[1])))


def _tensor_expert(expert: Any) -> Any:
    """What tells a layer's tensors apart: "shared" has its own, routed experts (numbers) share one."""
    return expert if isinstance(expert, str) else None


def module_names(model: nn.Module, weights: Sequence[SuperWeight]) -> list[str]:
    """The modules that hold `weights` (a layer's down projection; its fused experts, or its shared
    expert's down projection), once each, in layer order."""
    adapter = adapter_for(model)
    return [f"{adapter.layers}.{layer}.{down_proj_path(model, layer, expert, adapter)}"
            for layer, expert in _matrices(weights)]


def gguf_tensor_names(model: nn.Module, weights: Sequence[SuperWeight], architecture: str) -> list[str]:
    """The GGUF tensors of those matrices, by gguf-py's name table (the one convert_hf_to_gguf.py uses).

    As llama.cpp's converter does before it looks a name up, "language_model." is dropped: a multimodal
    checkpoint's text model (Gemma 3 and 4, Llama 4, Qwen 3.5) becomes a GGUF of its own, its layers
    numbered as in the checkpoint (the vision tower goes to a separate mmproj file)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next((key for key, value in MODEL_ARCH_NAMES.items() if value == architecture), None)
    if arch is None:
        raise UsageError(f"llama.cpp has no '{architecture}' architecture (gguf-py {_gguf_version()}); "
                         "use --to bitsandbytes or llm-compressor for this model")
    # the decoder layers, not config.num_hidden_layers: a multimodal config keeps that in its text_config
    name_map = get_tensor_name_map(arch, len(decoder_layers(model)))
    names = []
    for layer, expert in _matrices(weights):
        hf_name = tensor_name(model, layer, expert=expert).replace("language_model.", "")
        mapped = name_map.get_name(hf_name, try_suffixes=(".weight",))
        if mapped is None:
            raise UsageError(f"gguf-py has no GGUF name for {hf_name} ({architecture}); use --to bitsandbytes "
                             "or llm-compressor for this model")
        names.append(mapped if mapped.endswith(".weight") else mapped + ".weight")
    return names


def _gguf_version() -> str:
    return package_version("gguf") or "unknown"


def _read_gguf(path: str | Path) -> tuple[str, dict[str, list[int]]]:
    """A GGUF file's architecture and tensor shapes (ggml order), from its header only."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError, struct errors... on a file that is not GGUF
        raise ModelLoadError(
            f"{path} is not a readable GGUF file ({type(e).__name__}); give the GGUF you quantize") from None
    field_ = reader.fields.get("general.architecture")
    architecture = bytes(field_.parts[field_.data[0]]).decode() if field_ else "unknown"
    return architecture, {t.name: [int(n) for n in t.shape] for t in reader.tensors}


def _check_gguf_tensors(model: nn.Module, weights: Sequence[SuperWeight], names: list[str],
                        tensors: dict[str, list[int]], path: str | Path) -> None:
    for (layer, expert), name in zip(_matrices(weights), names):
        if name not in tensors:
            raise CoordinatesError(f"{path} has no tensor {name}; was the GGUF made from another model?")
        expected = list(getattr(*down_proj_tensor(model, layer, expert)).shape)
        if sorted(tensors[name]) != sorted(expected):
            raise CoordinatesError(f"{path}: tensor {name} has shape {tensors[name]} (ggml order), but this model's "
                                   f"matrix is {expected}; was the GGUF made from another model?")


# ----------------------------------------------------------------------------- formats


def _llama_cpp(tensors: list[str], ggml_type: str) -> str:
    return "".join(f"^{re.escape(name)}$={ggml_type}\n" for name in tensors)


def _bitsandbytes(keep: list[str]) -> str:
    return json.dumps({"llm_int8_skip_modules": keep, "modules_to_not_convert": keep}, indent=2) + "\n"


def _llm_compressor(ignore: list[str]) -> str:
    recipe = {"quant_stage": {"quant_modifiers": {"QuantizationModifier": {
        "targets": ["Linear"], "scheme": DEFAULT_SCHEME, "ignore": ignore}}}}
    return yaml.safe_dump(recipe, sort_keys=False)


def consumer_model(source, hub_id: str | None = None) -> str:
    """What a quantizer's `from_pretrained` reads for this model: a hub id or a local folder. A GGUF
    file is not one (transformers will not quantize a model read from GGUF): its model's hub id
    (`hub_id`, the registry's) when known, else the repository or folder it came from and
    `gguf_file=` to dequantize it first."""
    if source.kind in ("hub", "local"):
        return repr(str(Path(source.location).resolve()) if source.kind == "local" else source.location)
    if hub_id:
        return repr(hub_id)
    name = Path(source.location).name
    if source.hub_id:  # downloaded from the hub: the repository, as from_pretrained fetches it
        revision = f", revision={source.revision!r}" if source.revision else ""
        return f"{source.hub_id!r}, gguf_file={name!r}{revision}"
    # abspath, not resolve: a .gguf file may be a link (the hub cache's are), and its name is what counts
    return f"{os.path.dirname(os.path.abspath(source.location))!r}, gguf_file={name!r}"


def _usage(fmt: str, out: str, model: str) -> str:
    """The call that consumes the exported file; `model` is `consumer_model`'s arguments."""
    if fmt == "llama.cpp":
        return f"llama-quantize --tensor-type-file {out} MODEL-F16.gguf MODEL-Q4_K_M.gguf Q4_K_M"
    if fmt == "bitsandbytes":
        return (f"AutoModelForCausalLM.from_pretrained({model}, quantization_config=BitsAndBytesConfig("
                f"load_in_4bit=True, llm_int8_skip_modules=json.load(open('{out}'))['llm_int8_skip_modules']))")
    if "gguf_file=" in model:
        return f"llmcompressor.oneshot(model=AutoModelForCausalLM.from_pretrained({model}), recipe='{out}', ...)"
    return f"llmcompressor.oneshot(model={model}, recipe='{out}', ...)"


def export(
    weights: Sequence[SuperWeight],
    fmt: str,
    *,
    spec: str | None = None,
    revision: str | None = None,
    gguf_file: str | None = None,
    cache_dir: str | None = None,
    trust_remote_code: bool = False,
    gguf: str | Path | None = None,
    ggml_type: str = DEFAULT_GGML_TYPE,
    out_name: str = "FILE",
    hub_id: str | None = None,
    progress: Callable[[str], None] | None = None,
    coords: Coordinates | None = None,
    warn: Callable[[str], None] | None = None,
) -> Export:
    """What `fmt`'s quantizer needs to keep the super weights' matrices of model `spec` in high precision.

    The coordinates are checked against the model (in range; a recorded weight value must match
    where the checkpoint is on this machine). For llama.cpp the GGUF names are checked against
    `gguf` (default: the model itself when it is a GGUF file) or, without a GGUF, come from gguf-py's
    table alone. `coords` are what `weights` were picked from (a file's entries, its other fields,
    its name): every entry is checked, and `warn` is told when it was made for another model.
    """
    from transformers.quantizers.base import get_keys_to_not_convert

    progress = progress or (lambda message: None)
    check_format(fmt)
    if fmt == "llama.cpp":
        ggml_type = check_ggml_type(ggml_type)
    elif ggml_type != DEFAULT_GGML_TYPE:
        raise UsageError("--type sets llama-quantize's tensor type; it only applies to --to llama.cpp")
    if gguf is not None and not Path(gguf).is_file():  # gguf-py's reader would say only FileNotFoundError
        raise UsageError(f"--gguf {gguf}: no such file; give the GGUF file you will quantize")
    weights = list(weights)
    skeleton = _skeleton(spec, revision=revision, gguf_file=gguf_file, cache_dir=cache_dir,
                         trust_remote_code=trust_remote_code, progress=progress)
    model, source = skeleton.model, skeleton.source
    every = unique_coords([*weights, *(coords.weights if coords else ())])
    validate_coords(model, every)
    checked = [f"{source.spec}: modules and matrix shapes (from its config)"]
    read = _read_down_projections(skeleton, [w for w in every if w.value is not None])
    check_recorded_values(model, read)
    mismatch = coords and coordinates_mismatch(coords.meta, source, model.config.model_type, coords.name)
    if mismatch and warn:
        warn(mismatch)
    if read:
        checked.append(f"{source.spec}: recorded weight values (checkpoint)")
    modules = module_names(model, weights)
    present = dict(model.named_modules())
    missing = [name for name in modules if name not in present]
    if missing:  # the adapter table and the model disagree: nothing a user can fix by retrying
        raise UsageError(f"this model has no module {missing[0]}; check the adapter row for "
                         f"'{model.config.model_type}' in superweight/model/adapters.py")
    gguf_tensors: list[str] = []
    if fmt == "llama.cpp":
        gguf_path = gguf if gguf is not None else (source.location if source.kind == "gguf" else None)
        architecture = gguf_architecture(model.config.model_type)
        tensors = None
        if gguf_path is not None:
            progress(f"reading the tensor names of {gguf_path}")
            architecture, tensors = _read_gguf(gguf_path)
        gguf_tensors = gguf_tensor_names(model, weights, architecture)
        if tensors is not None:
            _check_gguf_tensors(model, weights, gguf_tensors, tensors, gguf_path)
            checked.append(f"{gguf_path}: tensor names and shapes")
        else:
            checked.append(f"gguf-py {_gguf_version()} name table for '{architecture}' (no GGUF file given: --gguf)")
        content = _llama_cpp(gguf_tensors, ggml_type)
        keep = gguf_tensors
    else:
        head = model.get_output_embeddings()
        head_names = [name for name, module in model.named_modules() if head is not None and module is head]
        defaults = sorted(get_keys_to_not_convert(model)) if fmt == "bitsandbytes" else head_names
        keep = list(dict.fromkeys([*defaults, *modules]))
        content = _bitsandbytes(keep) if fmt == "bitsandbytes" else _llm_compressor(keep)
    return Export(format=fmt, model=source.spec, modules=modules, gguf_tensors=gguf_tensors, keep=keep,
                  content=content, usage=_usage(fmt, out_name, consumer_model(source, hub_id)), checked=checked)
