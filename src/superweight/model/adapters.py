"""The adapter table: where each model family keeps its MLP down projection.

Coordinates are always reported as (layer, row, col[, expert]) with
  row = hidden (output) channel of the down projection, what it writes into the residual stream,
  col = intermediate (input) channel of the down projection.
For `nn.Linear` (weight shape [out, in]) that is `weight[row, col]`; for GPT-2's `Conv1D`
(weight shape [in, out]) it is `weight[col, row]`; for fused MoE experts (a 3-D parameter
[expert, out, in]) it is `down_proj[expert, row, col]` (gpt-oss and Llama 4 store
[expert, in, out]: `down_proj[expert, col, row]`). A mixture-of-experts layer's shared expert (an
MLP every token runs, beside the routed ones) is named by the expert value `"shared"`; the dense
layers of a mixture-of-experts model (DeepSeek-V3's first layers) name no expert.
`down_proj_matrix` hides the differences by returning a [out, in] view that shares storage with
the checkpoint tensor.

Adding a family is one row in `ADAPTERS` plus one test in tests/test_arch.py. A model type not in
the table whose modules follow the layout of a row is handled with that row (`resolve_adapter`
says so in a note).
"""

from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..coords import SHARED_EXPERT
from ..errors import UnsupportedArchitectureError
from .placement import stored_tensor

Expert = int | str | None

logger = logging.getLogger("superweight")


@dataclass(frozen=True)
class Adapter:
    """How to find the down projection of one model family."""

    layers: str  # dotted path from the model to the ModuleList of decoder layers
    down_proj: str  # dotted path from a decoder layer to the down projection (or fused experts)
    transposed: bool = False  # weight stored [in, out] (GPT-2 Conv1D; gpt-oss, Llama 4 experts)
    post_norm: str | None = None  # norm applied to the MLP output before the residual add
    experts: bool = False  # down_proj is a fused experts module: parameter [expert, out, in]
    # Mixture-of-experts models only:
    dense_down_proj: str | None = None  # the down projection of a layer without experts
    shared_expert: str | None = None  # the shared expert's down projection (nn.Linear) in a layer with experts
    # How the fused experts are called: "top_k" = (hidden, top_k_index, top_k_weights), weights applied
    # to the outputs (transformers' experts interface); "scaled_input" = one argument, every expert's
    # input stacked [expert * token, hidden] with the routing score already multiplied in (Llama 4).
    experts_call: str = "top_k"
    # The config attribute the MLP output is multiplied by before the residual add (Granite's
    # residual_multiplier): the write the detector judges is the scaled one, what the stream gets.
    residual_scale: str | None = None

    @property
    def weight_name(self) -> str:
        """Name of the tensor inside the down-projection module of a layer with experts (or of every
        layer, for a dense family)."""
        return "down_proj" if self.experts else "weight"


_LLAMA_LIKE = Adapter(layers="model.layers", down_proj="mlp.down_proj")
_GEMMA2_LIKE = Adapter(
    layers="model.layers", down_proj="mlp.down_proj", post_norm="post_feedforward_layernorm"
)
_FUSED_EXPERTS = Adapter(layers="model.layers", down_proj="mlp.experts", experts=True,
                         dense_down_proj="mlp.down_proj")
_QWEN_SHARED_EXPERT = Adapter(layers="model.layers", down_proj="mlp.experts", experts=True,
                              dense_down_proj="mlp.down_proj", shared_expert="mlp.shared_expert.down_proj")
_DEEPSEEK_LIKE = Adapter(layers="model.layers", down_proj="mlp.experts", experts=True,
                         dense_down_proj="mlp.down_proj", shared_expert="mlp.shared_experts.down_proj")
_LLAMA4 = Adapter(layers="model.layers", down_proj="feed_forward.experts", experts=True, transposed=True,
                  dense_down_proj="feed_forward.down_proj", shared_expert="feed_forward.shared_expert.down_proj",
                  experts_call="scaled_input")

# One row per `config.model_type`.
ADAPTERS: dict[str, Adapter] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "ministral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    # Qwen 3.5 (hybrid linear/full attention): a Qwen3_5Config checkpoint loads as the text model.
    "qwen3_5": _LLAMA_LIKE,
    "qwen3_5_text": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
    # Granite adds the MLP output times config.residual_multiplier.
    "granite": Adapter(layers="model.layers", down_proj="mlp.down_proj", residual_scale="residual_multiplier"),
    # Cohere 2: attention and MLP in parallel, both added to the residual stream.
    "cohere2": _LLAMA_LIKE,
    # These normalise the MLP output before adding it to the residual stream.
    "olmo2": _GEMMA2_LIKE,
    "olmo3": _GEMMA2_LIKE,
    "gemma2": _GEMMA2_LIKE,
    "gemma3_text": _GEMMA2_LIKE,
    "gemma4_text": _GEMMA2_LIKE,
    # A Gemma 4 checkpoint (text + vision + audio) loads as the multimodal model, its text layers inside.
    "gemma4": Adapter(layers="model.language_model.layers", down_proj="mlp.down_proj",
                      post_norm="post_feedforward_layernorm"),
    "exaone4": _GEMMA2_LIKE,
    "glm4": Adapter(layers="model.layers", down_proj="mlp.down_proj", post_norm="post_mlp_layernorm"),
    "gpt2": Adapter(layers="transformer.h", down_proj="mlp.c_proj", transposed=True),
    "gpt_neox": Adapter(layers="gpt_neox.layers", down_proj="mlp.dense_4h_to_h"),
    "opt": Adapter(layers="model.decoder.layers", down_proj="fc2"),
    "falcon": Adapter(layers="transformer.h", down_proj="mlp.dense_4h_to_h"),
    "mixtral": _FUSED_EXPERTS,
    "qwen3_moe": _FUSED_EXPERTS,
    "olmoe": _FUSED_EXPERTS,
    "phimoe": _FUSED_EXPERTS,
    "gpt_oss": Adapter(layers="model.layers", down_proj="mlp.experts", experts=True, transposed=True),
    "qwen2_moe": _QWEN_SHARED_EXPERT,
    "qwen3_5_moe": _QWEN_SHARED_EXPERT,
    "qwen3_5_moe_text": _QWEN_SHARED_EXPERT,
    "deepseek_v3": _DEEPSEEK_LIKE,
    "glm4_moe": _DEEPSEEK_LIKE,
    # Llama 4: MoE layers interleave with dense ones; a Llama4Config checkpoint loads as the text model.
    "llama4": _LLAMA4,
    "llama4_text": _LLAMA4,
}


def supported_families() -> list[str]:
    return sorted(ADAPTERS)


def _unsupported(model_type: str, why: str = "is not supported") -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"model type '{model_type}' {why}; supported: {', '.join(supported_families())}. "
        "To add a family, add one row to ADAPTERS in superweight/model/adapters.py (see docs/architectures.md)"
    )


def adapter_for_type(model_type: str) -> Adapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise _unsupported(model_type) from None


# --------------------------------------------------------------------------------------------
# A model type the table lacks: use the row whose layout its modules follow


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _hidden_size(model: nn.Module) -> int | None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return int(weight.shape[-1]) if weight is not None else None


def _follows(model: nn.Module, adapter: Adapter) -> bool:
    """Whether every decoder layer of `model` has the modules `adapter` names, with the down
    projections writing the hidden size (so orientation and experts' calling convention fit)."""
    layers = _submodule(model, adapter.layers)
    hidden = _hidden_size(model)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or hidden is None:
        return False
    any_experts = False
    for block in layers:
        if adapter.post_norm and _submodule(block, adapter.post_norm) is None:
            return False
        if _is_moe(block, adapter):
            experts = block.get_submodule(adapter.down_proj)
            weight = getattr(experts, "down_proj", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
                return False
            out_dim = weight.shape[2] if adapter.transposed else weight.shape[1]
            arguments = len(inspect.signature(experts.forward).parameters)
            if out_dim != hidden or (arguments >= 3) != (adapter.experts_call == "top_k"):
                return False
            if adapter.shared_expert and not isinstance(_submodule(block, adapter.shared_expert), nn.Linear):
                return False
            any_experts = True
        else:
            path = adapter.dense_down_proj if adapter.experts else adapter.down_proj
            module = _submodule(block, path) if path else None
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                return False
            if (weight.shape[1] if adapter.transposed else weight.shape[0]) != hidden:
                return False
    return any_experts or not adapter.experts


def _specificity(adapter: Adapter) -> int:
    """Rows that name more modules are tried first: a post-norm model also 'follows' the row
    without the norm, a model with shared experts the row without them."""
    return sum(bool(x) for x in (adapter.post_norm, adapter.experts, adapter.shared_expert, adapter.dense_down_proj))


def infer_adapter(model: nn.Module) -> tuple[Adapter, str]:
    """(the table row whose layout `model`'s modules follow, a one-line note saying so).

    Raises UnsupportedArchitectureError when no row fits: the layout is not recognisable.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
    rows: dict[Adapter, list[str]] = {}
    for family, adapter in ADAPTERS.items():
        rows.setdefault(adapter, []).append(family)
    for adapter in sorted(rows, key=_specificity, reverse=True):
        if _follows(model, adapter):
            path = adapter.down_proj if not adapter.experts else f"{adapter.down_proj}.down_proj"
            note = (f"model type '{model_type}' is not in the adapter table; its modules follow the layout of "
                    f"{rows[adapter][0]} ({adapter.layers}.N.{path}" + (f", then {adapter.post_norm}" if
                    adapter.post_norm else "") + "), so that layout is used")
            return adapter, note
    raise _unsupported(model_type, "is not in the adapter table and its modules follow no known layout")


_inferred: weakref.WeakKeyDictionary[nn.Module, tuple[Adapter, str]] = weakref.WeakKeyDictionary()


def resolve_adapter(model: nn.Module) -> tuple[Adapter, str | None]:
    """(adapter, note): the table row of the model's type, or the inferred row and a note saying so
    (logged once per model on the "superweight" logger)."""
    model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
    if model_type in ADAPTERS:
        return ADAPTERS[model_type], None
    if model not in _inferred:
        _inferred[model] = infer_adapter(model)
        logger.warning(_inferred[model][1])
    return _inferred[model]


def adapter_for(model: nn.Module) -> Adapter:
    return resolve_adapter(model)[0]


def adapter_for_config(config, *, trust_remote_code: bool = False) -> tuple[Adapter, str | None]:
    """(adapter, note) for a config before its weights load: a type the table lacks is looked at
    on a weightless (meta-device) model built from the config."""
    if config.model_type in ADAPTERS:
        return ADAPTERS[config.model_type], None
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return infer_adapter(skeleton)


# --------------------------------------------------------------------------------------------
# Where a coordinate's matrix lives


def decoder_layers(model: nn.Module, adapter: Adapter | None = None) -> nn.ModuleList:
    adapter = adapter or adapter_for(model)
    return model.get_submodule(adapter.layers)


def _is_moe(block: nn.Module, adapter: Adapter) -> bool:
    return adapter.experts and _submodule(block, adapter.down_proj) is not None


def is_moe_layer(model: nn.Module, layer: int, adapter: Adapter | None = None) -> bool:
    """Whether decoder layer `layer` has fused experts (some MoE models keep dense layers)."""
    adapter = adapter or adapter_for(model)
    # A dense family's answer needs no module lookup (this runs for every layer of every pass).
    return adapter.experts and _is_moe(decoder_layers(model, adapter)[layer], adapter)


def _location(model: nn.Module, layer: int, expert: Expert, adapter: Adapter) -> tuple[str, str, bool, bool]:
    """(module path in the layer, tensor name, stored [in, out], fused [expert, ...]) of a coordinate,
    or UnsupportedArchitectureError when its expert does not fit the layer."""
    if not is_moe_layer(model, layer, adapter):
        if expert is not None:
            raise UnsupportedArchitectureError(
                f"layer {layer} of this model has no experts, but a coordinate names expert {expert}; "
                "were the coordinates made for another model?"
            )
        if adapter.experts:
            return adapter.dense_down_proj, "weight", False, False
        return adapter.down_proj, "weight", adapter.transposed, False
    if expert == SHARED_EXPERT:
        if not adapter.shared_expert:
            raise UnsupportedArchitectureError("this mixture-of-experts model has no shared expert, but a "
                                               "coordinate names one; were the coordinates made for another model?")
        return adapter.shared_expert, "weight", False, False
    if expert is None:
        raise UnsupportedArchitectureError(
            "this is a mixture-of-experts model: coordinates must name an expert"
            + (" (or 'shared')" if adapter.shared_expert else "")
        )
    if isinstance(expert, str):
        raise UnsupportedArchitectureError(f"expert '{expert}' is neither an expert number nor '{SHARED_EXPERT}'")
    return adapter.down_proj, adapter.weight_name, adapter.transposed, True


def down_proj_path(model: nn.Module, layer: int, expert: Expert = None, adapter: Adapter | None = None) -> str:
    """The dotted path, inside decoder layer `layer`, of the module holding the down projection: for a
    layer with experts, the fused experts (or, with expert "shared", the shared expert's)."""
    adapter = adapter or adapter_for(model)
    if expert is None and is_moe_layer(model, layer, adapter):
        return adapter.down_proj
    return _location(model, layer, expert, adapter)[0]


def down_proj_module(model: nn.Module, layer: int, adapter: Adapter | None = None, expert: Expert = None,
                     ) -> nn.Module:
    """The module at `down_proj_path`."""
    adapter = adapter or adapter_for(model)
    return decoder_layers(model, adapter)[layer].get_submodule(down_proj_path(model, layer, expert, adapter))


def down_proj_tensor(model: nn.Module, layer: int, expert: Expert = None,
                     adapter: Adapter | None = None) -> tuple[nn.Module, str]:
    """(module, tensor name) of the parameter that holds the coordinate's matrix (all experts'
    matrices, for fused experts; expert None in a layer with experts means those)."""
    adapter = adapter or adapter_for(model)
    block = decoder_layers(model, adapter)[layer]
    if expert is None and is_moe_layer(model, layer, adapter):
        return block.get_submodule(adapter.down_proj), adapter.weight_name
    path, name, _, _ = _location(model, layer, expert, adapter)
    return block.get_submodule(path), name


def num_experts(model: nn.Module, adapter: Adapter | None = None) -> int | None:
    """Routed experts per layer with experts (None for a dense model)."""
    adapter = adapter or adapter_for(model)
    if not adapter.experts:
        return None
    for layer in range(len(decoder_layers(model, adapter))):
        if is_moe_layer(model, layer, adapter):
            return getattr(down_proj_module(model, layer, adapter), adapter.weight_name).shape[0]
    return None


def layer_experts(model: nn.Module, layer: int, adapter: Adapter | None = None) -> list[Expert]:
    """The expert values a coordinate of `layer` can take: [None] for a dense layer; the routed
    experts' numbers, then "shared" where there is a shared expert, for a layer with experts."""
    adapter = adapter or adapter_for(model)
    if not is_moe_layer(model, layer, adapter):
        return [None]
    routed = getattr(down_proj_module(model, layer, adapter), adapter.weight_name).shape[0]
    return [*range(routed), *([SHARED_EXPERT] if adapter.shared_expert else [])]


def down_proj_matrix(
    model: nn.Module, layer: int, expert: Expert = None, adapter: Adapter | None = None,
    *, writable: bool = True,
) -> torch.Tensor:
    """The down projection of `layer` (and `expert`) as an [out, in] view of the real tensor.

    Writing into the returned view writes the model's weight, also where accelerate offloaded the
    layer (see placement.py: an edited disk-offloaded matrix then stays in memory). Readers that
    scan many layers pass `writable=False` so that offloaded matrices are only read.
    """
    return down_proj_reader(model, layer, expert, adapter, writable=writable)()


def down_proj_reader(
    model: nn.Module, layer: int, expert: Expert = None, adapter: Adapter | None = None,
    *, writable: bool = True,
) -> Callable[[], torch.Tensor]:
    """`down_proj_matrix` as a function of no arguments: where the matrix lives is looked up once,
    the tensor itself on every call (a hook that runs on every pass reads a layer whose weights
    layer streaming or offloading may have replaced since)."""
    adapter = adapter or adapter_for(model)
    path, name, transposed, fused = _location(model, layer, expert, adapter)
    module = decoder_layers(model, adapter)[layer].get_submodule(path)

    def read() -> torch.Tensor:
        weight = stored_tensor(module, name, writable=writable)
        if fused:
            weight = weight[expert]
        return weight.T if transposed else weight

    return read



class DownProjections:
    """The [out, in] down-projection views that hold a set of weights, each looked up once and
    keyed by (layer, expert): what reading or editing many weights of one model goes through.

    Only `writable` views may be written (an offloaded matrix is otherwise a copy, see placement.py).
    """

    def __init__(self, model: nn.Module, writable: bool = False):
        self.model = model
        self.adapter = adapter_for(model)
        self.writable = writable
        self._views: dict[tuple[int, Expert], torch.Tensor] = {}

    def __call__(self, weight) -> torch.Tensor:  # a coords.SuperWeight (or anything with layer and expert)
        key = (weight.layer, weight.expert)
        if key not in self._views:
            # detached: a view of the same storage, so writes reach the weight without autograd
            self._views[key] = down_proj_matrix(self.model, weight.layer, weight.expert, self.adapter,
                                                writable=self.writable).detach()
        return self._views[key]

def tensor_name(model: nn.Module, layer: int, adapter: Adapter | None = None, expert: Expert = None) -> str:
    """The checkpoint name of the tensor that holds layer's down projection (all experts, when fused)."""
    adapter = adapter or adapter_for(model)
    if expert is None and is_moe_layer(model, layer, adapter):
        path, name = adapter.down_proj, adapter.weight_name
    else:
        path, name = _location(model, layer, expert, adapter)[:2]
    return f"{adapter.layers}.{layer}.{path}.{name}"


def tensor_templates(adapter: Adapter) -> dict[str, str]:
    """How a coordinate maps onto checkpoint tensors, for a coordinates file's header: `tensor`
    (with `{layer}`) and its `layout`; for mixture-of-experts models, also where the coordinates of
    layers without experts (no expert, [row, col]) and of the shared expert (expert "shared",
    [row, col]) live."""
    templates = {
        "tensor": f"{adapter.layers}.{{layer}}.{adapter.down_proj}.{adapter.weight_name}",
        "layout": ("[expert, col, row]" if adapter.transposed else "[expert, row, col]") if adapter.experts
        else ("[col, row] (Conv1D)" if adapter.transposed else "[row, col]"),
    }
    if adapter.experts and adapter.dense_down_proj:
        templates["dense_layer_tensor"] = f"{adapter.layers}.{{layer}}.{adapter.dense_down_proj}.weight"
    if adapter.shared_expert:
        templates["shared_expert_tensor"] = f"{adapter.layers}.{{layer}}.{adapter.shared_expert}.weight"
    return templates


# llama.cpp's architecture name (GGUF `general.architecture`, gguf-py's MODEL_ARCH_NAMES) where it is
# not the transformers `model_type`: llama.cpp's converter writes Mistral and Mixtral as "llama",
# DeepSeek-V3 as "deepseek2" (its DeepseekV2Model class) and OLMo 3 as "olmo2" (its Olmo2Model class).
# Every row was checked against llama.cpp's converter: docs/architectures.md, "llama.cpp names".
_GGUF_ARCHITECTURES = {
    "mistral": "llama",
    "mixtral": "llama",
    "gpt_neox": "gptneox",
    "gemma3_text": "gemma3",
    "gemma4_text": "gemma4",
    "qwen3_moe": "qwen3moe",
    "qwen2_moe": "qwen2moe",
    "qwen3_5": "qwen35",
    "qwen3_5_text": "qwen35",
    "qwen3_5_moe": "qwen35moe",
    "qwen3_5_moe_text": "qwen35moe",
    "olmo3": "olmo2",
    "gpt_oss": "gpt-oss",
    "deepseek_v3": "deepseek2",
    "glm4_moe": "glm4moe",
    "llama4_text": "llama4",
}


def gguf_architecture(model_type: str) -> str:
    """The llama.cpp architecture a model of this family is converted to (opt has none)."""
    return _GGUF_ARCHITECTURES.get(model_type, model_type)
