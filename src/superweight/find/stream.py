"""Layer-streaming detection (`sw detect --stream`): one decoder layer in memory at a time.

The model is built on the meta device, so it holds no weights. What precedes the decoder layers
(the prompt's embedding rows, position tables) is read from the safetensors checkpoint once; then the model's own
forward pass runs with a hook around every decoder layer that reads just that layer's tensors
before it runs and puts the layer back on the meta device after. Running the model's own forward,
rather than calling the layers by hand, keeps each family's masks, position embeddings and
embedding scaling exactly as in a full load, so the hooks of hooks.py see the same numbers. The
pass stops after the last decoder layer: the final norm and the LM head are never needed.

Peak memory is about one layer + the prompt's embedding rows and activations. Super weights
found by one pass are zeroed in the streamed tensors of the next (the iteration of detect.py).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..model.adapters import Adapter, adapter_for_config, decoder_layers, down_proj_matrix
from ..coords import SuperWeight
from .detect import DEFAULT_ITERATIONS, DEFAULT_PROMPT, Detection, SpikeRule, forward_pass, iterate
from ..errors import ModelLoadError, UnsupportedArchitectureError
from .hooks import LayerStats, around_layers, capture_layer_stats
from ..model.devices import resolve_device, torch_dtype
from ..model.gguf import dequantized_gguf
from ..model.hub import Progress, hub_access, model_load_error, read_config, read_tokenizer
from ..model.integrity import (
    check_complete, check_finite_weights, damaged_file_error, shard_map, stored_shapes, weight_file_problem,
)
from ..model.source import ModelSource, resolve

# What a hub snapshot needs for streaming: config, tokenizer files, the transformers-layout
# safetensors (not pickles, nor a duplicate consolidated.safetensors some repos also carry).
SNAPSHOT_PATTERNS = ["*.json", "model*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass
class Checkpoint:
    """A safetensors checkpoint directory opened for streaming: config and tokenizer, no weights."""

    source: ModelSource
    directory: Path
    config: Any
    tokenizer: Any
    dtype: str
    files: dict[str, Path]  # checkpoint tensor name -> the safetensors file that holds it
    load_seconds: float = 0.0
    from_cache: bool = False
    trust_remote_code: bool = False


def safetensors_files(directory: Path, spec: str) -> dict[str, Path]:
    """Which file holds each tensor: from the shard index, or the one model.safetensors; each file's
    header checked (a truncated or corrupt one is named)."""
    single = directory / "model.safetensors"
    shards = shard_map(directory)
    if shards is not None:
        files = shards
    elif single.is_file():
        files = {name: single for name in stored_shapes(single)}
    else:
        pickles = any(directory.glob("pytorch_model*.bin*"))
        found = "only PyTorch pickles (pytorch_model*.bin)" if pickles else "no model.safetensors(.index.json)"
        target = spec.rstrip("/") + "-safetensors"
        raise ModelLoadError(
            f"--stream reads safetensors checkpoints, but {directory} has {found}; convert with: "
            f"python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{spec}').save_pretrained('{target}')\", or drop --stream"
        )
    for path in sorted(set(files.values())):
        if problem := weight_file_problem(path):
            raise damaged_file_error(path, problem)
    return files


def _checkpoint_dtype(config, files: dict[str, Path]) -> str:
    """--dtype auto: the config's dtype, else the stored dtype of the first tensor (as from_pretrained)."""
    from safetensors import safe_open

    declared = getattr(config, "dtype", None)
    if declared is not None:
        return str(declared).removeprefix("torch.")
    name, path = next(iter(files.items()))
    with safe_open(path, framework="pt") as f:
        return _SAFETENSORS_DTYPES.get(f.get_slice(name).get_dtype(), "float32")


def _snapshot(source: ModelSource, cache_dir: str | None, notice: Progress) -> Path:
    from huggingface_hub import snapshot_download

    access = hub_access(source, notice)
    try:
        return Path(snapshot_download(source.location, revision=source.revision, cache_dir=cache_dir,
                                      allow_patterns=SNAPSHOT_PATTERNS, **access))
    except (OSError, ValueError) as e:
        raise model_load_error(source, e) from None


def open_checkpoint(
    spec: str | None = None,
    *,
    revision: str | None = None,
    gguf_file: str | None = None,
    dtype: str = "auto",
    cache_dir: str | None = None,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    notice: Progress | None = None,
) -> Checkpoint:
    """MODEL as a safetensors directory (a hub snapshot, a local dir, or the GGUF cache) + config + tokenizer."""
    progress = progress or (lambda message: None)
    notice = notice or (lambda message: None)
    torch_dtype(dtype)  # an unknown --dtype fails before anything is read
    source = resolve(spec, revision=revision, gguf_file=gguf_file, cache_dir=cache_dir)
    started = time.perf_counter()
    from_cache = False
    if source.kind == "gguf":  # stream from the dequantised cache, written once as in a full load
        directory, from_cache = dequantized_gguf(source, dtype, cache_dir, progress, notice)
        dtype = "float32" if dtype == "auto" else dtype
    elif source.kind == "hub":
        progress(f"fetching config, tokenizer and safetensors of {source.spec}")
        directory = _snapshot(source, cache_dir, notice)
    else:
        directory = Path(source.location)
    progress(f"reading config of {source.spec}")
    config = read_config(source, directory, {"trust_remote_code": trust_remote_code})  # on disk now: no hub
    files = safetensors_files(directory, source.spec)
    tokenizer = read_tokenizer(source, directory, {"trust_remote_code": trust_remote_code})
    return Checkpoint(
        source=source, directory=directory, config=config, tokenizer=tokenizer,
        dtype=_checkpoint_dtype(config, files) if dtype == "auto" else dtype, files=files,
        load_seconds=time.perf_counter() - started, from_cache=from_cache, trust_remote_code=trust_remote_code,
    )


class _LastLayerDone(Exception):
    """Raised after the last decoder layer: the rest of the forward pass is not needed."""


class LayerStream:
    """A meta-device model whose decoder layers read their weights from disk as they run."""

    def __init__(self, checkpoint: Checkpoint, device: str = "cpu", token_ids: torch.Tensor | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        self.adapter: Adapter = adapter_for_config(checkpoint.config,
                                                   trust_remote_code=checkpoint.trust_remote_code)[0]
        if self.adapter.experts:
            raise UnsupportedArchitectureError(
                f"--stream does not support mixture-of-experts models ({checkpoint.config.model_type}: the "
                "checkpoint stores experts unfused, the model fused); run sw detect without --stream"
            )
        self.files = checkpoint.files
        self.directory = checkpoint.directory
        self.device = torch.device(device)
        # Buffers stay real (include_buffers=False): rotary tables and the like are computed from
        # the config at construction, exactly as in a full load, and are not in the checkpoint.
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(
                checkpoint.config, dtype=getattr(torch, checkpoint.dtype),
                trust_remote_code=checkpoint.trust_remote_code,
            )
        self.model.eval().requires_grad_(False)
        for module in self.model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(self.device)
        self.layers = decoder_layers(self.model, self.adapter)
        self.stored_name = self._stored_names()
        self.zeroed: dict[int, list[SuperWeight]] = {}
        self.checked: set[int] = set()  # layers whose weights were found finite
        self.on_meta: dict[int, dict[str, torch.Tensor]] = {}  # layer -> its meta tensors while loaded
        outside_layers = {n: t for n, t in self.model.state_dict(keep_vars=True).items()
                          if n in self.stored_name and not n.startswith(f"{self.adapter.layers}.")}
        self.vocabulary: torch.Tensor | None = None  # the token ids whose embedding rows were read
        if token_ids is not None:
            self._load_embedding_rows(outside_layers, token_ids)
        self._load(self.model, "", outside_layers)
        check_finite_weights(self.model)  # the weights outside the layers, in memory from here on

    def _load_embedding_rows(self, outside_layers: dict[str, torch.Tensor], token_ids: torch.Tensor) -> None:
        """Read only the prompt's rows of the token embedding (a large part of a streamed peak:
        128k x 8192 for Llama 3) and give the embedding just those rows; `one_pass` then feeds
        the model each token's row number instead of its id. Token ids are used for nothing but
        this lookup in the families the adapter table covers."""
        from safetensors import safe_open

        embedding = self.model.get_input_embeddings()
        name = next(f"{n}.weight" for n, m in self.model.named_modules() if m is embedding)
        meta = outside_layers.pop(name)
        self.vocabulary = torch.unique(token_ids.flatten().cpu())
        with safe_open(self.files[self.stored_name[name]], framework="pt") as f:
            rows = f.get_slice(self.stored_name[name])
            weight = torch.cat([rows[i : i + 1] for i in self.vocabulary.tolist()])
        embedding.weight = nn.Parameter(weight.to(self.device, meta.dtype), requires_grad=False)
        embedding.padding_idx = None  # a pad id past the kept rows fails F.embedding's check; it only masks gradients

    def _stored_names(self) -> dict[str, str]:
        """Model tensor name -> checkpoint tensor name, for every weight the pass needs; a checkpoint
        that lacks some, holds others of another shape, or holds more decoder layers than the config
        says, is refused as a full load refuses it.

        The LM head is skipped (tied or not, the pass stops before it). Checkpoints saved from
        the base model lack its prefix (GPT-2's `h.0...` for `transformer.h.0...`).
        """
        head = self.model.get_output_embeddings()
        head_prefix = next((f"{name}." for name, module in self.model.named_modules() if module is head), None)
        base_prefix = f"{self.model.base_model_prefix}."
        shapes: dict[str, tuple[int, ...]] = {}
        for path in set(self.files.values()):
            shapes.update(stored_shapes(path))
        names, missing, mismatched, known = {}, set(), set(), set()
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            stored = name if name in self.files else name.removeprefix(base_prefix)
            known.add(stored)
            if not tensor.is_meta or (head_prefix and name.startswith(head_prefix)):
                continue
            if stored not in self.files:
                missing.add(name)
            elif shapes.get(stored, tuple(tensor.shape)) != tuple(tensor.shape):
                mismatched.add((name, shapes[stored], tuple(tensor.shape)))
            else:
                names[name] = stored
        if missing and not any(n.startswith(f"{self.adapter.layers}.") for n in names):
            raise ModelLoadError(
                f"the checkpoint has no tensor '{sorted(missing)[0]}': its tensor names differ from the model's "
                "(an older or converted layout); run sw detect without --stream"
            )
        layer_prefixes = (f"{self.adapter.layers}.", f"{self.adapter.layers}.".removeprefix(base_prefix))
        ignored = re.compile("|".join([r"rotary_emb\.inv_freq", r"(^|\.)position_ids$",
                                       *(self.model._keys_to_ignore_on_load_unexpected or [])]))
        unexpected = {n for n in self.files if n.startswith(layer_prefixes) and n not in known and not ignored.search(n)}
        check_complete({"missing_keys": missing, "mismatched_keys": mismatched, "unexpected_keys": unexpected},
                       str(self.directory))
        return names

    def _load(self, module: nn.Module, prefix: str, meta: dict[str, torch.Tensor]) -> None:
        """Replace `module`'s meta tensors (named relative to it) by the checkpoint's, cast to their dtype."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in meta:
            by_file.setdefault(self.files[self.stored_name[prefix + name]], []).append(name)
        tensors = {}
        for path, names in by_file.items():
            # A fresh opening per layer: the file mapping behind its tensors goes when they are released.
            with safe_open(path, framework="pt") as f:
                for name in names:
                    tensors[name] = f.get_tensor(self.stored_name[prefix + name]).to(self.device, meta[name].dtype)
        module.load_state_dict(tensors, strict=False, assign=True)

    def stored_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor the pass reads, by model name in model order, as the model holds it (cast to
        its dtype), one at a time from the checkpoint: what a pass gone NaN blames (hooks.py)."""
        from safetensors import safe_open

        dtypes = {name: tensor.dtype for name, tensor in self.model.state_dict(keep_vars=True).items()}
        for name, stored in self.stored_name.items():
            with safe_open(self.files[stored], framework="pt") as f:
                yield name, f.get_tensor(stored).to(dtypes[name])

    def materialise(self, layer: int) -> None:
        module = self.layers[layer]
        prefix = f"{self.adapter.layers}.{layer}."
        self.on_meta[layer] = {n: t for n, t in module.state_dict(keep_vars=True).items() if t.is_meta}
        self._load(module, prefix, self.on_meta[layer])
        if layer not in self.checked:  # once per layer, before any zeroing
            check_finite_weights(module, prefix)
            self.checked.add(layer)
        with torch.no_grad():
            for weight in self.zeroed.get(layer, []):
                down_proj_matrix(self.model, layer, weight.expert, self.adapter)[weight.row, weight.col] = 0

    def release(self, layer: int) -> None:
        if layer in self.on_meta:
            self.layers[layer].load_state_dict(self.on_meta.pop(layer), strict=False, assign=True)

    def zero(self, weight: SuperWeight) -> None:
        self.zeroed.setdefault(weight.layer, []).append(weight)

    def one_pass(self, input_ids: torch.Tensor, carry_layers: int | None = None) -> list[LayerStats]:
        last = len(self.layers) - 1

        def after(layer: int) -> None:
            self.release(layer)
            if layer == last:
                raise _LastLayerDone

        try:
            with capture_layer_stats(self.model, self.adapter, carry_layers, defer=False,
                                     weights=self.stored_tensors) as stats, \
                    around_layers(self.layers, self.materialise, after):
                if self.vocabulary is not None:
                    if not torch.isin(input_ids.cpu(), self.vocabulary).all():
                        raise ValueError("this stream holds the embedding rows of another prompt")
                    input_ids = torch.searchsorted(self.vocabulary, input_ids.cpu())
                forward_pass(self.model, input_ids.to(self.device))
        except _LastLayerDone:
            pass
        finally:
            for layer in list(self.on_meta):  # a pass that failed mid-layer
                self.release(layer)
        return stats


def detect_streamed(
    checkpoint: Checkpoint,
    input_ids: torch.Tensor,
    *,
    device: str = "cpu",
    iterations: int = DEFAULT_ITERATIONS,
    rule: SpikeRule | None = None,
    prompt: str = DEFAULT_PROMPT,
    on_iteration=None,
) -> Detection:
    """`detect` on a checkpoint read one decoder layer at a time; the same coordinates as a full load."""
    stream = LayerStream(checkpoint, resolve_device(device), token_ids=input_ids)
    rule = rule or SpikeRule()
    carry_layers = rule.carry_layers(len(stream.layers))
    return iterate(lambda: stream.one_pass(input_ids, carry_layers), stream.zero, iterations=iterations, rule=rule,
                   prompt=prompt, num_tokens=int(input_ids.shape[-1]), on_iteration=on_iteration)
