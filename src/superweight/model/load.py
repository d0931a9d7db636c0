"""Loading a causal LM the way `from_pretrained` users expect: hub id, local directory, GGUF file,
or a short alias from configs/models.yaml (see source.py), into a `LoadedModel`; and the same model
without weights, for checks before (or instead of) a load.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import distributed
from ..brief_repr import BriefRepr
from .adapters import resolve_adapter
from .devices import check_map_devices, resolve_device, torch_dtype
from .gguf import dequantized_gguf
from .hub import Progress, hub_options, model_load_error, read_config, read_tokenizer
from .integrity import check_complete, check_finite_offloaded_down_projections, check_finite_weights, \
    damaged_file_error, damaged_weight_file
from .quiet import quiet_transformers
from .source import ModelSource, cache_root, resolve
from ..errors import ModelLoadError, OutputPathError, first_line
from ..files import cache_folder, refuse_inside


@dataclass(repr=False)
class LoadedModel(BriefRepr):
    model: Any
    tokenizer: Any
    source: ModelSource
    dtype: str
    load_seconds: float
    from_cache: bool = False
    notes: list[str] = field(default_factory=list)


def model_fingerprint(loaded: LoadedModel) -> str:
    """Names the weights that were evaluated, for result caches: their source, version and dtype,
    and for files on disk their names, sizes and modification times (a rewrite is a new model)."""
    where = Path(getattr(loaded.model, "name_or_path", "") or loaded.source.location)
    weight_files = sorted(p for p in where.glob("*") if p.suffix in (".safetensors", ".bin")) if where.is_dir() else []
    stamps = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weight_files]
    return json.dumps([loaded.source.location, loaded.source.revision,
                       getattr(loaded.model.config, "_commit_hash", None), loaded.dtype, str(where), stamps])


def weightless_model(config: Any, trust_remote_code: bool = False) -> Any:
    """The model `config` describes, on the meta device: every module and shape, and no weight
    read or allocated (what checks of names and coordinates need before, or instead of, a load)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _fresh_offload_folder(cache_dir: str | None, source: ModelSource) -> Path:
    """A new folder of this load's own for accelerate's disk offload: never shared with another
    process or load (accelerate writes an index.json there), never inside the model's directory."""
    parent = cache_root(cache_dir) / "offload"
    try:
        refuse_inside(parent, source.protected_dirs)
    except OutputPathError:
        raise OutputPathError(
            f"the disk-offload folder {parent} would be inside the model's directory or the hub cache; "
            "point SUPERWEIGHT_CACHE (or --cache-dir) elsewhere"
        ) from None
    return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=cache_folder(parent)))


def _unreadable_weights_error(source: ModelSource, location: str, where: str, error: Exception) -> Exception:
    """What safetensors' refusal of a weight file means, naming the file: found by reading the
    headers of the checkpoint's files (in the hub cache for a hub model)."""
    directory: Path | None = Path(location) if Path(location).is_dir() else None
    if source.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(source.location, "config.json", cache_dir=source.cache_dir,
                                        revision=source.revision)
        directory = Path(config).parent if isinstance(config, str) else None
    found = damaged_weight_file(directory) if directory else None
    if found:
        return damaged_file_error(*found)
    return damaged_file_error(f"of {where}", first_line(error) or type(error).__name__)


def _out_of_memory(error: BaseException) -> bool:
    """torch's allocators say so in a RuntimeError (CPU: "can't allocate memory"; CUDA: OutOfMemoryError)."""
    return isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError" or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def _not_enough_memory(where: str, error: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"not enough memory to load {where} ({first_line(error) or type(error).__name__}); load it in half precision (--dtype bfloat16), "
        "spread it over GPUs, CPU and disk (--device-map auto, --max-memory), or detect with --stream")


def load_model(
    spec: str | None = None,
    *,
    revision: str | None = None,
    gguf_file: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
    progress: Progress | None = None,
    notice: Progress | None = None,
) -> LoadedModel:
    """Load MODEL and its tokenizer, ready for inference (eval mode, no grad needed).

    `progress` gets short status texts as the load goes; `notice` the few messages worth keeping
    on screen (a first, slow GGUF load; a cached copy used because the hub cannot be reached).
    Without `progress`, transformers' own progress bars and log lines are silenced: a library call
    prints nothing unless asked.
    """
    from transformers import AutoModelForCausalLM

    quiet = progress is None
    progress = progress or (lambda message: None)
    notice = notice or (lambda message: None)
    dtype_option = torch_dtype(dtype)
    target_device = None if device_map else resolve_device(distributed.rank_device(device))  # bad --device: now
    source = resolve(spec, revision=revision, gguf_file=gguf_file, cache_dir=cache_dir)
    started = time.perf_counter()
    from_cache = False
    location, hub_kwargs = source.location, {}
    if source.kind == "gguf":
        # Under a launcher rank 0 dequantizes and writes the cache first; the others then read it.
        with quiet_transformers(quiet):
            cached, from_cache = distributed.in_turns(
                lambda: dequantized_gguf(source, dtype, cache_dir, progress, notice))
        location = str(cached)
        dtype_option = torch_dtype("float32" if dtype == "auto" else dtype)
    else:
        hub_kwargs = hub_options(source, trust_remote_code, notice)
        progress(f"reading config of {source.spec}")
        with quiet_transformers(quiet):
            read_config(source, location, hub_kwargs)
    placement: dict[str, Any] = {}
    if max_memory and not device_map:
        device_map = "auto"  # a memory budget only means something to accelerate's placement
    offload_folder = None
    if isinstance(device_map, dict):
        check_map_devices(device_map)
    if isinstance(device_map, str):  # under a launcher, each rank spreads its copy over its own GPUs
        max_memory = distributed.rank_max_memory(max_memory)
    if device_map:
        placement["device_map"] = device_map
        if max_memory:
            placement["max_memory"] = max_memory
        # Any placement may send weights to "disk" ("auto" too, when they do not fit).
        offload_folder = _fresh_offload_folder(cache_dir, source)
        placement["offload_folder"] = str(offload_folder)
    where = source.spec if source.kind == "hub" else location
    if source.kind == "local":  # a lost shard or a broken index named now, not deep in from_pretrained
        found = damaged_weight_file(location)
        if found:
            raise damaged_file_error(*found)
    # The tokenizer before the weights: a folder without one fails in seconds, not after a long load.
    with quiet_transformers(quiet):
        tokenizer = read_tokenizer(source, location, hub_kwargs)
    progress(f"loading weights of {source.spec}")
    try:
        with quiet_transformers(quiet):
            # Mismatched shapes are reported (then refused below with the rest), not raised as a RuntimeError.
            model, loading_info = AutoModelForCausalLM.from_pretrained(
                location, dtype=dtype_option, output_loading_info=True, ignore_mismatched_sizes=True,
                **hub_kwargs, **placement)
        check_complete(loading_info, where)
        check_finite_weights(model)  # those in memory
        check_finite_offloaded_down_projections(model)  # and those accelerate offloaded, read where it keeps them
    except BaseException as e:
        if offload_folder is not None:
            shutil.rmtree(offload_folder, ignore_errors=True)  # a failed load leaves nothing behind
        if type(e).__name__ == "SafetensorError":  # safetensors' own type, raised from its Rust core
            raise _unreadable_weights_error(source, location, where, e) from None
        if isinstance(e, (OSError, ValueError)):
            raise model_load_error(source, e) from None
        if _out_of_memory(e):
            raise _not_enough_memory(where, e) from None
        raise
    if offload_folder is not None:
        if any(offload_folder.iterdir()):
            # Offloaded weights are read from there at every forward pass: it lives as long as the
            # model (finalize also runs at interpreter exit).
            weakref.finalize(model, shutil.rmtree, offload_folder, ignore_errors=True)
        else:
            offload_folder.rmdir()  # nothing written (a safetensors checkpoint is read in place)
    if not device_map:
        try:
            model.to(target_device)
        except BaseException as e:  # a model that fits in RAM but not on the GPU --device names
            if _out_of_memory(e):
                raise _not_enough_memory(f"{where} on {target_device}", e) from None
            raise
    model.eval()
    _, note = resolve_adapter(model)  # a model type the table lacks: which row's layout it follows
    return LoadedModel(
        model=model, tokenizer=tokenizer, source=source, dtype=str(model.dtype).removeprefix("torch."),
        load_seconds=time.perf_counter() - started, from_cache=from_cache, notes=[note] if note else [],
    )
