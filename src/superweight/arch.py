"""The adapter table: where each model family keeps its MLP down projection.

Coordinates are always reported as (layer, row, col[, expert]) with
  row = hidden (output) channel of the down projection, what it writes into the residual stream,
  col = intermediate (input) channel of the down projection.
For `nn.Linear` (weight shape [out, in]) that is `weight[row, col]`; for GPT-2's `Conv1D`
(weight shape [in, out]) it is `weight[col, row]`; for fused MoE experts (a 3-D parameter
[expert, out, in]) it is `down_proj[expert, row, col]`. `down_proj_matrix` hides the difference by
returning a [out, in] view that shares storage with the checkpoint tensor.

Adding a family is one row in `ADAPTERS` plus one test in tests/test_arch.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedArchitectureError
from .placement import stored_tensor


@dataclass(frozen=True)
class Adapter:
    """How to find the down projection of one model family."""

    layers: str  # dotted path from the model to the ModuleList of decoder layers
    down_proj: str  # dotted path from a decoder layer to the down projection (or fused experts)
    transposed: bool = False  # weight stored [in, out] (GPT-2 Conv1D) instead of [out, in]
    post_norm: str | None = None  # norm applied to the MLP output before the residual add
    experts: bool = False  # down_proj is a fused experts module: parameter [expert, out, in]

    @property
    def weight_name(self) -> str:
        """Name of the tensor inside the down-projection module."""
        return "down_proj" if self.experts else "weight"


_LLAMA_LIKE = Adapter(layers="model.layers", down_proj="mlp.down_proj")
_GEMMA2_LIKE = Adapter(
    layers="model.layers", down_proj="mlp.down_proj", post_norm="post_feedforward_layernorm"
)
_FUSED_EXPERTS = Adapter(layers="model.layers", down_proj="mlp.experts", experts=True)

# One row per `config.model_type`.
ADAPTERS: dict[str, Adapter] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    # OLMo-2 and Gemma 2/3 normalise the MLP output before adding it to the residual stream.
    "olmo2": _GEMMA2_LIKE,
    "gemma2": _GEMMA2_LIKE,
    "gemma3_text": _GEMMA2_LIKE,
    "gpt2": Adapter(layers="transformer.h", down_proj="mlp.c_proj", transposed=True),
    "gpt_neox": Adapter(layers="gpt_neox.layers", down_proj="mlp.dense_4h_to_h"),
    "opt": Adapter(layers="model.decoder.layers", down_proj="fc2"),
    "falcon": Adapter(layers="transformer.h", down_proj="mlp.dense_4h_to_h"),
    "mixtral": _FUSED_EXPERTS,
    "qwen3_moe": _FUSED_EXPERTS,
}


def supported_families() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for_type(model_type: str) -> Adapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"model type '{model_type}' is not supported; supported: {', '.join(supported_families())}. "
            "To add a family, add one row to ADAPTERS in superweight/arch.py (see docs/architectures.md)"
        ) from None


def adapter_for(model: nn.Module) -> Adapter:
    return adapter_for_type(getattr(model.config, "model_type", "unknown"))


def decoder_layers(model: nn.Module, adapter: Adapter | None = None) -> nn.ModuleList:
    adapter = adapter or adapter_for(model)
    return model.get_submodule(adapter.layers)


def down_proj_module(model: nn.Module, layer: int, adapter: Adapter | None = None) -> nn.Module:
    adapter = adapter or adapter_for(model)
    return decoder_layers(model, adapter)[layer].get_submodule(adapter.down_proj)


def num_experts(model: nn.Module, adapter: Adapter | None = None) -> int | None:
    adapter = adapter or adapter_for(model)
    if not adapter.experts:
        return None
    return getattr(down_proj_module(model, 0, adapter), adapter.weight_name).shape[0]


def down_proj_matrix(
    model: nn.Module, layer: int, expert: int | None = None, adapter: Adapter | None = None,
    *, writable: bool = True,
) -> torch.Tensor:
    """The down projection of `layer` (and `expert`) as an [out, in] view of the real tensor.

    Writing into the returned view writes the model's weight, also where accelerate offloaded the
    layer (see placement.py: an edited disk-offloaded matrix then stays in memory). Readers that
    scan many layers pass `writable=False` so that offloaded matrices are only read.
    """
    adapter = adapter or adapter_for(model)
    weight = stored_tensor(down_proj_module(model, layer, adapter), adapter.weight_name, writable=writable)
    if adapter.experts:
        if expert is None:
            raise UnsupportedArchitectureError(
                "this is a mixture-of-experts model: coordinates must name an expert"
            )
        weight = weight[expert]
    elif expert is not None:
        raise UnsupportedArchitectureError(
            "this model has no experts, but a coordinate names one; was the file made for another model?"
        )
    return weight.T if adapter.transposed else weight


def tensor_name(model: nn.Module, layer: int, adapter: Adapter | None = None) -> str:
    """The checkpoint name of the tensor that holds layer's down projection."""
    adapter = adapter or adapter_for(model)
    return f"{adapter.layers}.{layer}.{adapter.down_proj}.{adapter.weight_name}"


# llama.cpp's architecture name (GGUF `general.architecture`, gguf-py's MODEL_ARCH_NAMES) where it is
# not the transformers `model_type`: convert_hf_to_gguf.py writes Mistral and Mixtral as "llama".
_GGUF_ARCHITECTURES = {
    "mistral": "llama",
    "mixtral": "llama",
    "gpt_neox": "gptneox",
    "gemma3_text": "gemma3",
    "qwen3_moe": "qwen3moe",
}


def gguf_architecture(model_type: str) -> str:
    """The llama.cpp architecture a model of this family is converted to (opt has none)."""
    return _GGUF_ARCHITECTURES.get(model_type, model_type)
