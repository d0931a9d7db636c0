"""Tiny random models of every supported family, and a way to plant a genuine super weight in them.

Nothing here downloads anything: configs come from `AutoConfig.for_model(model_type)` with small
sizes, models are randomly initialised (float32, eval mode).

`plant_super_weight(model, layer, row, col)` rewires one MLP so that it really behaves like the
paper's super weight, through the model's own forward pass:

* a constant *carrier* channel (`CARRIER_CHANNEL`) is added to every token embedding, so the
  normalised input of every MLP shares one direction at all tokens;
* the up side of the MLP (gate/up, fused gate_up, c_fc / fc1 / dense_h_to_4h, or an expert's fused
  gate_up_proj, with the router steered to that expert) is aligned with that direction for channel
  `col`, so the down-projection input has a large spike at `col` at every token;
* `down_proj[row, col]` is set large and the rest of the row's random entries are zeroed, so the
  MLP writes a massive value at hidden channel `row` and zeroing that one weight removes it;
* where the family normalises the MLP output (Gemma 2/3, OLMo-2), the post-feed-forward norm's
  gain at `row` is raised so the residual write stays massive.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import pytest

from superweight.model.adapters import (
    SHARED_EXPERT,
    adapter_for,
    decoder_layers,
    down_proj_matrix,
    down_proj_module,
    down_proj_path,
    is_moe_layer,
)

HIDDEN = 32
INTERMEDIATE = 64
LAYERS = 4
HEADS = 4
VOCAB = 128
CARRIER_CHANNEL = 1  # the hidden channel every token embedding carries; do not plant rows here
CARRIER_VALUE = 1.0

_COMMON = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
_LLAMA_SIZES = dict(intermediate_size=INTERMEDIATE, num_key_value_heads=2, head_dim=HIDDEN // HEADS)

# Per-layer lists, longer than any test's model (tests use up to 8 layers): cut to its layers.
_PER_LAYER = 16
_PER_LAYER_KEYS = {"layer_types", "no_rope_layers"}
_SLIDING_FULL = {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"] * (_PER_LAYER // 2)}
_QWEN3_5_ATTENTION = {  # hybrid: Gated DeltaNet (linear) and full attention layers
    "layer_types": ["linear_attention", "full_attention"] * (_PER_LAYER // 2),
    "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
}
_DEEPSEEK_EXPERTS = {"moe_intermediate_size": INTERMEDIATE, "n_shared_experts": 1, "n_routed_experts": 4,
                     "num_experts_per_tok": 2, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}

# Model types whose checkpoints hold a composite (text + vision) config that AutoModelForCausalLM
# loads as the text model: the tiny model is built from the text type.
COMPOSITE = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text", "llama4": "llama4_text"}
# Composite types that load as the multimodal model, the text model inside: given a tiny text config
# (and, where the default vision tower is large, a one-layer one). Gemma 3's has no row in the table.
WRAPPING = {"gemma4": "gemma4_text", "gemma3": "gemma3_text"}
_TINY_VISION = {"gemma3": dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=1,
                               num_attention_heads=HEADS)}

# Family-specific config bits (sizes the common names above do not reach).
FAMILY_CONFIG: dict[str, dict] = {
    "llama": _LLAMA_SIZES,
    "mistral": {**_LLAMA_SIZES, "sliding_window": None},
    "qwen2": {**_LLAMA_SIZES, "use_sliding_window": False},
    "qwen3": {**_LLAMA_SIZES, "use_sliding_window": False},
    "phi3": {"intermediate_size": INTERMEDIATE, "num_key_value_heads": 2},
    "olmo": {"intermediate_size": INTERMEDIATE, "num_key_value_heads": 2},
    "olmo2": {"intermediate_size": INTERMEDIATE, "num_key_value_heads": 2},
    "gemma": _LLAMA_SIZES,
    "gemma2": {**_LLAMA_SIZES, "sliding_window": 16, "query_pre_attn_scalar": HIDDEN // HEADS},
    "gemma3_text": {**_LLAMA_SIZES, "sliding_window": 16, "query_pre_attn_scalar": HIDDEN // HEADS},
    "gpt2": {"n_inner": INTERMEDIATE, "n_positions": 64},
    "gpt_neox": {"intermediate_size": INTERMEDIATE},
    "opt": {"ffn_dim": INTERMEDIATE, "word_embed_proj_dim": HIDDEN, "do_layer_norm_before": True},
    "falcon": {"ffn_hidden_size": INTERMEDIATE, "new_decoder_architecture": False, "multi_query": True},
    "mixtral": {**_LLAMA_SIZES, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    "qwen3_moe": {
        **_LLAMA_SIZES,
        "moe_intermediate_size": INTERMEDIATE,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "use_sliding_window": False,
    },
    # Families added with transformers 5 (issue 12, point 7).
    "ministral": {**_LLAMA_SIZES, "sliding_window": 16, "layer_types": ["sliding_attention"] * _PER_LAYER},
    "qwen3_5_text": {**_LLAMA_SIZES, **_QWEN3_5_ATTENTION},
    "smollm3": {**_LLAMA_SIZES, "no_rope_layers": [1, 1, 1, 0] * (_PER_LAYER // 4),
                "layer_types": ["full_attention"] * _PER_LAYER},
    "granite": _LLAMA_SIZES,
    "cohere2": {**_LLAMA_SIZES, **_SLIDING_FULL},
    "olmo3": {**_LLAMA_SIZES, **_SLIDING_FULL},
    "gemma4_text": {**_LLAMA_SIZES, **_SLIDING_FULL, "global_head_dim": 2 * HIDDEN // HEADS,
                    "hidden_size_per_layer_input": 0},
    "exaone4": {**_LLAMA_SIZES, **_SLIDING_FULL},
    "glm4": _LLAMA_SIZES,
    "olmoe": {**_LLAMA_SIZES, "num_experts": 4, "num_experts_per_tok": 2},
    "phimoe": {**_LLAMA_SIZES, "num_local_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": {**_LLAMA_SIZES, **_SLIDING_FULL, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        **_LLAMA_SIZES,
        "moe_intermediate_size": INTERMEDIATE,
        "shared_expert_intermediate_size": INTERMEDIATE,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "layer_types": ["full_attention"] * _PER_LAYER,
        "max_window_layers": _PER_LAYER,
    },
    "qwen3_5_moe_text": {
        **_LLAMA_SIZES,
        **_QWEN3_5_ATTENTION,
        "moe_intermediate_size": INTERMEDIATE,
        "shared_expert_intermediate_size": INTERMEDIATE,
        "num_experts": 4,
        "num_experts_per_tok": 2,
    },
    # DeepSeek-V3 / Kimi-K2 shape: layer 0 dense, then shared + routed experts.
    "deepseek_v3": {**_LLAMA_SIZES, **_DEEPSEEK_EXPERTS, "kv_lora_rank": 16, "q_lora_rank": 16,
                    "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "qk_head_dim": 8, "v_head_dim": 8, "head_dim": 4},
    "glm4_moe": {**_LLAMA_SIZES, **_DEEPSEEK_EXPERTS},
    # Llama 4: experts in layers 1 and 3, dense MLPs in 0 and 2 (the 128-expert model interleaves).
    "llama4_text": {
        **_LLAMA_SIZES,
        "intermediate_size_mlp": INTERMEDIATE,
        "num_local_experts": 4,
        "num_experts_per_tok": 1,
        "moe_layers": [1, 3],
        "interleave_moe_layer_step": 2,
        "no_rope_layers": [1, 1, 1, 0] * (_PER_LAYER // 4),
        "layer_types": (["chunked_attention"] * 3 + ["full_attention"]) * (_PER_LAYER // 4),
        "attention_chunk_size": 16,
    },
}


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one thread inside the block: tiny matmuls are dominated by thread
    synchronisation otherwise, badly so on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_config(model_type: str, **overrides):
    """A small config of `model_type` built locally (hidden 32, 4 layers, vocabulary 128)."""
    model_type = COMPOSITE.get(model_type, model_type)
    if model_type in WRAPPING:
        config = AutoConfig.for_model(model_type)
        config.text_config = tiny_config(WRAPPING[model_type], **overrides)
        for key, value in _TINY_VISION.get(model_type, {}).items():
            setattr(config.vision_config, key, value)
        return config
    settings = {**_COMMON, **FAMILY_CONFIG.get(model_type, {}), **overrides}
    for key in _PER_LAYER_KEYS & settings.keys():  # one entry per layer, as the family expects
        settings[key] = settings[key][:settings["num_hidden_layers"]]
    # Given to the constructor too: what it derives per layer (Gemma 4's full-attention head size) follows.
    config = AutoConfig.for_model(model_type, **settings)
    for key, value in settings.items():
        setattr(config, key, value)
    return config


def tiny_model(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialised tiny model of `model_type`: float32, eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    return model.eval()


PROBE_IDS = torch.tensor([[5, 17, 33, 42, 64, 77, 90, 101, 115, 126]])  # used to measure MLP inputs


def _mlp_parent(model: nn.Module, layer: int, expert=None) -> nn.Module:
    """The module that holds the down projection (the MLP, or the decoder layer itself for OPT)."""
    adapter = adapter_for(model)
    parent_path, _, _ = down_proj_path(model, layer, expert, adapter).rpartition(".")
    block = decoder_layers(model, adapter)[layer]
    return block.get_submodule(parent_path) if parent_path else block


def _router(block: nn.Module) -> nn.Module:
    for name in ("gate", "router"):
        if isinstance(getattr(block, name, None), nn.Module):
            return getattr(block, name)
    raise NotImplementedError(f"synthetic.py does not know the router of {type(block).__name__}")


def _up_side(model: nn.Module, layer: int, expert=None) -> tuple[str, nn.Module, nn.Module | None]:
    """(kind, module that reads the MLP input, router or None) for `layer` (and `expert`).

    kind is one of: "experts" (fused gate_up_proj [E, 2I, H], or [E, H, 2I] where the family stores
    experts transposed), "gated" (gate_proj + up_proj), "fused" (one Linear [2I, H], gate rows
    first: Phi-3, GLM-4), "plain" (one up projection + activation).
    """
    adapter = adapter_for(model)
    parent = _mlp_parent(model, layer, expert)
    if is_moe_layer(model, layer, adapter) and expert != SHARED_EXPERT:
        return "experts", down_proj_module(model, layer, adapter), _router(parent)
    if hasattr(parent, "gate_proj") and hasattr(parent, "up_proj"):
        return "gated", parent.gate_proj, None
    if hasattr(parent, "gate_up_proj"):
        return "fused", parent.gate_up_proj, None
    for name in ("c_fc", "dense_h_to_4h", "fc1", "up_proj"):
        if hasattr(parent, name):
            return "plain", getattr(parent, name), None
    raise NotImplementedError(f"synthetic.py does not know the up side of {type(parent).__name__}")


def _set_linear_row(module: nn.Module, index: int, vector: torch.Tensor) -> None:
    """Set output channel `index` of an nn.Linear or GPT-2 Conv1D (weight [in, out]); zero its bias."""
    if type(module).__name__ == "Conv1D":
        module.weight[:, index] = vector
    else:
        module.weight[index] = vector
    if getattr(module, "bias", None) is not None:
        module.bias[index] = 0


def _add_carrier(model: nn.Module) -> None:
    """Give every token embedding the same constant at CARRIER_CHANNEL (idempotent)."""
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        embeddings[:, CARRIER_CHANNEL] = CARRIER_VALUE


def mlp_input_direction(model: nn.Module, layer: int, expert=None) -> tuple[torch.Tensor, float]:
    """(unit vector along the mean MLP input of `layer` over PROBE_IDS, mean projection onto it).

    The MLP input is what the up side reads: the normalised residual stream.
    """
    kind, reader, router = _up_side(model, layer, expert)
    if kind == "experts":  # the router reads the MLP input itself (Llama 4's experts get it scaled)
        reader = router
    seen: dict[str, torch.Tensor] = {}

    def grab(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        seen["x"] = x.detach().reshape(-1, x.shape[-1]).clone()

    handle = reader.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(input_ids=PROBE_IDS, use_cache=False)
    finally:
        handle.remove()
    x = seen["x"]
    direction = x.mean(0)
    direction = direction / direction.norm()
    projections = x @ direction
    if not bool(projections.min() > 0.5 * projections.mean()):
        raise RuntimeError(f"layer {layer}: the MLP input has no direction shared by all tokens")
    return direction, float(projections.mean())


def plant_super_weight(
    model: nn.Module,
    layer: int,
    row: int,
    col: int,
    expert: int | None = None,
    *,
    input_spike: float = 100.0,
    weight: float = 10.0,
    post_norm_gain: float = 200.0,
    clean_row: bool = True,
) -> None:
    """Make `down_proj[row, col]` of `layer` (and `expert`) a genuine super weight.

    The down-projection input at `col` becomes about `input_spike` at every token, the weight
    becomes `weight`, so the raw MLP output at `row` is about `input_spike * weight`. With
    `clean_row`, the row's small (random-init, |w| < 1) entries are zeroed so that zeroing the
    planted weight really removes the spike; larger entries (earlier plants) are kept.
    Post-norm families get the post-feed-forward norm's gain at `row` set to `post_norm_gain`
    (pass None to leave the norm alone).
    """
    adapter = adapter_for(model)
    if row == CARRIER_CHANNEL:
        raise ValueError(f"row {row} is the carrier channel; plant elsewhere")
    _add_carrier(model)
    kind, reader, router = _up_side(model, layer, expert)
    direction, scale = mlp_input_direction(model, layer, expert)
    unit = direction / scale  # unit @ x ~= 1 for every token
    with torch.no_grad():
        if kind == "plain":
            # relu / gelu of a large positive pre-activation is about the pre-activation.
            _set_linear_row(reader, col, input_spike * unit)
        else:
            # act(g) * u with g = u = sqrt(spike): silu / gelu of a large g is about g.
            root = input_spike**0.5
            if kind == "gated":
                parent = _mlp_parent(model, layer, expert)
                _set_linear_row(parent.gate_proj, col, root * unit)
                _set_linear_row(parent.up_proj, col, root * unit)
            elif kind == "fused":
                half = reader.weight.shape[0] // 2
                _set_linear_row(reader, col, root * unit)
                _set_linear_row(reader, half + col, root * unit)
            else:  # experts: steer every token to `expert`, then plant inside it
                if expert is None:
                    raise ValueError("a mixture-of-experts model needs an expert to plant in")
                _plant_expert_input(reader, adapter.transposed, expert, col, root * unit)
                router.weight[expert] = 20.0 * unit
            if expert == SHARED_EXPERT:
                # Qwen gates the shared expert by sigmoid(shared_expert_gate(x)): open it fully.
                gate = getattr(_mlp_parent(model, layer), "shared_expert_gate", None)
                if gate is not None:
                    gate.weight[0] = 20.0 * unit
        matrix = down_proj_matrix(model, layer, expert, adapter)
        if clean_row:
            small = matrix[row].abs() < 1.0
            matrix[row][small] = 0
            module = down_proj_module(model, layer, adapter, expert)
            bias = getattr(module, "down_proj_bias" if is_moe_layer(model, layer, adapter) and
                           expert != SHARED_EXPERT else "bias", None)
            if bias is not None:
                (bias[row] if bias.dim() == 1 else bias[expert, row]).zero_()
        matrix[row, col] = weight
        if adapter.post_norm and post_norm_gain is not None:
            norm = decoder_layers(model, adapter)[layer].get_submodule(adapter.post_norm)
            # Gemma's RMSNorm multiplies by (1 + weight); the others by weight.
            offset = 1.0 if "Gemma" in type(norm).__name__ else 0.0
            norm.weight[row] = post_norm_gain - offset


def _plant_expert_input(experts: nn.Module, transposed: bool, expert: int, col: int, vector: torch.Tensor) -> None:
    """Make gate and up of intermediate channel `col` of `expert` read `vector` (so act(g) * u is large)."""
    gate_up = experts.gate_up_proj[expert]  # [2I, H], or [H, 2I] when transposed
    if transposed:
        gate_up = gate_up.T
    half = gate_up.shape[0] // 2
    # gpt-oss interleaves gate and up channels (gate 2i, up 2i + 1); the others concatenate them.
    interleaved = getattr(experts, "is_concatenated", True) is False
    gate_row, up_row = (2 * col, 2 * col + 1) if interleaved else (col, half + col)
    gate_up[gate_row] = vector
    gate_up[up_row] = vector
    bias = getattr(experts, "gate_up_proj_bias", None)
    if bias is not None:
        bias[expert, gate_row] = 0
        bias[expert, up_row] = 0


PROMPT_IDS = torch.tensor([[3, 9, 27, 81, 12, 36, 108, 70, 50]])  # a detection prompt for tiny models


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every tensor, to check that something left the model bit-identical."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(autouse=True, scope="module")
def one_thread_per_module():
    """Import into a test module to run its tiny models on one thread (see `single_threaded`)."""
    with single_threaded():
        yield


def layered_super_activation(model_type: str, *, num_layers: int = 12, builders=range(2, 8), cancellers=(10, 11),
                             row: int = 7, seed: int = 0) -> nn.Module:
    """What a real post-norm model (a Gemma-3-family GGUF, issue 12) does, in a tiny model.

    Six consecutive layers (`builders`) each write a massive value into hidden channel `row`
    through one weight of their own (input channel 10 + layer); the late `cancellers` write the
    opposite sign and remove it. In post-norm families the raw down_proj outputs stay small
    (< 2: the plant's input ~12 times a weight 0.15) and the post-feed-forward norm's gain (600)
    makes each write massive, and every other layer's norm gain is raised too (1000 everywhere)
    so that every layer writes >= 1000, as in the real model, but spread over many channels.
    In pre-norm families the builders write ~1000 each through weight 10.
    """
    model = tiny_model(model_type, seed=seed, num_hidden_layers=num_layers)
    adapter = adapter_for(model)
    post_norm = adapter.post_norm is not None
    spike, weight = (12.25, 0.15) if post_norm else (100.0, 10.0)
    for layer in range(num_layers):
        if post_norm and layer not in builders and layer not in cancellers:
            norm = decoder_layers(model, adapter)[layer].get_submodule(adapter.post_norm)
            offset = 1.0 if "Gemma" in type(norm).__name__ else 0.0
            with torch.no_grad():
                norm.weight.fill_(1000.0 - offset)
    for layer in builders:
        plant_super_weight(model, layer, row, 10 + layer, input_spike=spike, weight=weight, post_norm_gain=600.0)
    for layer in cancellers:
        plant_super_weight(model, layer, row, 40 + layer, input_spike=spike, weight=-weight, post_norm_gain=600.0)
    return model
