"""GGUF files: their header checked fast, their sizes read without dequantising, and the one
dequantisation into the cache.

transformers dequantizes a GGUF in ~20 s even for a 135M model. The first load therefore writes
the dequantized model (safetensors + config + tokenizer) to `<cache>/gguf/<sha256 of the
file>-<dtype>/`; later loads (and the other commands: streaming, export) read that directory instead. The entry
records what it holds (integrity.write_manifest); a damaged one is rebuilt, with a notice.

A GGUF dequantizes to float32 whatever the dtype asked for, and is then rounded to it: where the
float32 entry is cached, another dtype's entry is that entry rounded, the same values bit for bit
in seconds instead of a second dequantization.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .hub import Progress, check_supported_config
from .integrity import check_complete, manifest_problem, write_manifest
from .source import ModelSource, cache_root
from ..errors import ModelLoadError, first_line
from ..files import atomic_directory, cache_folder


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _header_architecture(path: str) -> str:
    """Read the GGUF header; return its architecture. Corrupt or truncated files fail here, fast."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        field_ = reader.fields.get("general.architecture")
        architecture = bytes(field_.parts[field_.data[0]]).decode() if field_ else "unknown"
        # Touch the last tensor so a truncated file is caught before the slow dequantisation.
        if reader.tensors:
            _ = reader.tensors[-1].data.reshape(-1)[-1:]
        return architecture
    except Exception as e:  # gguf raises ValueError, IndexError, struct errors... on bad input
        raise ModelLoadError(
            f"{path} is not a readable GGUF file (corrupt or truncated: {type(e).__name__}); download it again"
        ) from None


def gguf_dense_shape(path: str) -> tuple[int, int, int] | None:
    """(decoder layers, hidden size, intermediate size) from a GGUF's header, read without
    dequantising anything; None for a mixture-of-experts model or a header that lacks them."""
    try:
        from gguf import GGUFReader

        fields = GGUFReader(path).fields

        def number(key: str) -> int | None:
            field_ = fields.get(key)
            return int(field_.parts[field_.data[0]][0]) if field_ else None

        architecture = bytes(fields["general.architecture"].parts[fields["general.architecture"].data[0]]).decode()
        if number(f"{architecture}.expert_count"):
            return None
        shape = tuple(number(f"{architecture}.{key}")
                      for key in ("block_count", "embedding_length", "feed_forward_length"))
        return None if None in shape else shape  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - an unreadable header is the load's to report
        return None


def dequantized_gguf(source: ModelSource, dtype: str, cache_dir: str | None, progress: Progress,
                     notice: Progress) -> tuple[Path, bool]:
    """The directory of `source`'s dequantized copy in the cache, written on the first call; and
    whether it was there already."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype_name = "float32" if dtype == "auto" else dtype  # GGUF holds quantised blocks: dequantise to fp32
    progress("hashing GGUF file")
    digest = file_sha256(source.location)
    target = cache_root(cache_dir) / "gguf" / f"{digest[:32]}-{dtype_name}"
    # Absolute: a bare relative name's folder is '', which from_pretrained takes for a hub id.
    directory, name = os.path.split(os.path.abspath(source.location))
    if target.is_dir():
        problem = manifest_problem(target)
        if problem is None:
            return target, True
        notice(f"the cached copy of {name} in {target} is damaged ({problem}): rebuilding it")
    cache_folder(target.parent)  # before the slow dequantization whose result it will hold
    float32_entry = target.with_name(f"{digest[:32]}-float32")
    if dtype_name != "float32" and float32_entry.is_dir() and manifest_problem(float32_entry) is None:
        if not target.is_dir():
            notice(f"first load of {name} in {dtype_name}: rounding its cached float32 copy, once")
        progress(f"rounding the cached float32 copy of {name} to {dtype_name}")
        model = AutoModelForCausalLM.from_pretrained(float32_entry, dtype=getattr(torch, dtype_name))
        _write_entry(target, model, AutoTokenizer.from_pretrained(float32_entry))
        return target, False
    architecture = _header_architecture(source.location)
    if not target.is_dir():
        notice(f"first load of {name}: dequantizing ({architecture}) and caching it, once; later loads read the cache")
    progress(f"dequantizing GGUF ({architecture})")
    try:
        model, loading_info = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=getattr(torch, dtype_name), output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except ValueError as e:
        raise ModelLoadError(
            f"transformers cannot read the '{architecture}' architecture of {source.location}: "
            f"{first_line(e) or type(e).__name__}; convert the model to safetensors"
        ) from None
    check_supported_config(model.config)
    check_complete(loading_info, source.location)  # a GGUF that lacks tensors is not cached
    # The loaded weights are plain dequantised floats, but the model still carries the gguf
    # quantizer, which makes save_pretrained refuse; drop it and its config entry.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    _write_entry(target, model, tokenizer)
    return target, False


def _write_entry(target: Path, model, tokenizer) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(target, force=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp)  # what the entry must hold, compared at every later use
