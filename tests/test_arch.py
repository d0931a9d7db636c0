"""The adapter table: one test set per row of ADAPTERS, on tiny local models of that family."""

from __future__ import annotations

import pytest
import torch

from superweight.model.adapters import (
    ADAPTERS,
    SHARED_EXPERT,
    adapter_for,
    adapter_for_config,
    adapter_for_type,
    decoder_layers,
    down_proj_matrix,
    down_proj_tensor,
    is_moe_layer,
    layer_experts,
    resolve_adapter,
    supported_families,
)
from superweight.find.detect import SpikeRule, detect
from superweight.errors import UnsupportedArchitectureError

from synthetic import (  # noqa: F401
    COMPOSITE,
    HIDDEN,
    INTERMEDIATE,
    LAYERS,
    one_thread_per_module,
    plant_super_weight,
    tiny_config,
    tiny_model,
)

# A composite (text + vision) type's tiny model is its text type's: tested once, under that name.
FAMILIES = sorted(set(ADAPTERS) - set(COMPOSITE))
SHARED_FAMILIES = sorted(t for t in FAMILIES if ADAPTERS[t].shared_expert)
PROMPT_IDS = torch.tensor([[3, 9, 27, 81, 12, 36, 108, 70, 50]])
REQUIRED = {
    "llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "gemma", "gemma2",
    "gemma3_text", "gpt2", "gpt_neox", "opt", "falcon",
    # the families people download now (transformers 5)
    "qwen3_5", "qwen3_5_moe", "gemma4", "gemma4_text", "olmo3", "llama4_text", "deepseek_v3", "gpt_oss", "glm4",
    "glm4_moe", "smollm3", "granite", "ministral", "qwen2_moe", "olmoe", "phimoe", "cohere2", "exaone4",
}
# Each of these writes the MLP output into the residual stream through a norm: the detector must read it there.
POST_NORM = {"olmo2", "olmo3", "gemma2", "gemma3_text", "gemma4", "gemma4_text", "exaone4", "glm4"}


def _routed_expert(model, layer: int, expert: int | None) -> int | None:
    """`expert` where `layer` has experts, None where it is dense."""
    return expert if is_moe_layer(model, layer) else None


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bit_identical(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"weights changed: {changed}"


def _logits(model, ids=PROMPT_IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.clone()


def test_table_covers_required_families():
    assert REQUIRED <= set(ADAPTERS), f"missing: {sorted(REQUIRED - set(ADAPTERS))}"
    moe = {t for t, a in ADAPTERS.items() if a.experts}
    assert moe & {"mixtral", "qwen3_moe"}, "no mixture-of-experts family in the table"
    assert supported_families() == sorted(ADAPTERS)
    assert {t for t, a in ADAPTERS.items() if a.post_norm} == POST_NORM


@pytest.mark.parametrize("model_type", sorted(COMPOSITE))
def test_composite_checkpoint_type_loads_as_its_text_row(model_type):
    """A Qwen 3.5 / Llama 4 checkpoint's config is composite (text + vision); AutoModelForCausalLM
    builds the text model, whose type has the same row."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type)
    config.text_config = tiny_config(COMPOSITE[model_type])
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    assert model.config.model_type == COMPOSITE[model_type]
    assert adapter_for(model) is ADAPTERS[model_type] is ADAPTERS[COMPOSITE[model_type]]
    assert len(decoder_layers(model)) == LAYERS


@pytest.mark.parametrize("model_type", FAMILIES)
def test_tiny_model_builds_from_local_config(model_type):
    model = tiny_model(model_type)
    assert model.config.model_type == model_type
    assert adapter_for(model) is ADAPTERS[model_type]
    assert len(decoder_layers(model)) == LAYERS
    logits = _logits(model)
    assert logits.shape[:2] == PROMPT_IDS.shape
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_down_proj_matrix_is_out_by_in_view(model_type):
    model = tiny_model(model_type)
    adapter = ADAPTERS[model_type]
    moe_layers = [layer for layer in range(LAYERS) if is_moe_layer(model, layer)]
    assert bool(moe_layers) == adapter.experts
    for layer in range(LAYERS):
        experts = layer_experts(model, layer)
        assert (layer in moe_layers) == (experts != [None])
        assert (SHARED_EXPERT in experts) == (layer in moe_layers and bool(adapter.shared_expert))
        for expert in experts:
            param = getattr(*down_proj_tensor(model, layer, expert))
            matrix = down_proj_matrix(model, layer, expert)
            assert tuple(matrix.shape) == (HIDDEN, INTERMEDIATE)
            assert matrix.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
    # Coordinates must name an expert exactly where the layer has experts ("shared" only where it has one).
    first_moe = moe_layers[0] if moe_layers else 0
    with pytest.raises(UnsupportedArchitectureError):
        down_proj_matrix(model, first_moe, None if adapter.experts else 0)
    if not adapter.shared_expert:
        with pytest.raises(UnsupportedArchitectureError):
            down_proj_matrix(model, first_moe, SHARED_EXPERT)
    dense_layers = [layer for layer in range(LAYERS) if layer not in moe_layers]
    if adapter.experts and dense_layers:  # DeepSeek-V3's first layer, Llama 4's interleaved ones
        with pytest.raises(UnsupportedArchitectureError):
            down_proj_matrix(model, dense_layers[0], 0)

    # Writing the view writes the model: the output changes, and so does the parameter itself.
    before = _logits(model)
    with torch.no_grad():
        for expert in layer_experts(model, first_moe):
            down_proj_matrix(model, first_moe, expert).mul_(0).add_(0.5)
    for expert in layer_experts(model, first_moe):
        assert bool((down_proj_matrix(model, first_moe, expert) == 0.5).all())
    assert not torch.allclose(_logits(model), before)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_random_model_reports_nothing(model_type):
    detection = detect(tiny_model(model_type), PROMPT_IDS)
    assert detection.super_weights == []


@pytest.mark.parametrize("where", [(0, 20, 50, 0), (2, 30, 0, 3)])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_planted_super_weight_is_found_exactly(model_type, where):
    layer, row, col, expert = where
    model = tiny_model(model_type)
    expert = _routed_expert(model, layer, expert)
    plant_super_weight(model, layer, row, col, expert)
    assert down_proj_matrix(model, layer, expert)[row, col].item() == 10.0
    before = _snapshot(model)
    rule = SpikeRule()

    detection = detect(model, PROMPT_IDS, iterations=5, rule=rule)

    assert [w.key for w in detection.super_weights] == [(layer, row, col, expert)]
    found = detection.super_weights[0]
    assert found.value == 10.0
    assert found.iteration == 0
    assert abs(found.output_spike) >= rule.min_spike
    assert detection.candidate_layers[0] == [layer]
    # It is a genuine super weight: with it zeroed (iteration 1) the layer's spike is gone.
    assert len(detection.iterations) == 2
    assert abs(detection.iterations[1][layer].spike) < rule.min_spike
    _assert_bit_identical(model, before)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_a_short_pass_reduced_after_its_last_layer_equals_one_reduced_layer_by_layer(model_type):
    """A pass of at most DEFER_MAX_TOKENS tokens keeps its dense layers' activations and reduces
    them all after the last layer; otherwise each layer is reduced as it runs. Every family must
    get the same numbers both ways (one that changed a kept tensor in place would not)."""
    import dataclasses

    from superweight.find.hooks import DEFER_MAX_TOKENS, capture_layer_stats

    assert PROMPT_IDS.shape[-1] <= DEFER_MAX_TOKENS
    model = tiny_model(model_type)
    plant_super_weight(model, 2, 30, 0, _routed_expert(model, 2, 3))
    runs = {}
    for defer in (True, False):
        with capture_layer_stats(model, defer=defer) as stats, torch.no_grad():
            model(PROMPT_IDS)
        runs[defer] = [dataclasses.asdict(s) for s in stats]
    assert runs[True] == runs[False]
    assert runs[True][2]["row"] == 30 and runs[True][2]["col"] == 0 and runs[True][2]["carried"]


@pytest.mark.parametrize("model_type", SHARED_FAMILIES)
def test_planted_shared_expert_weight_is_found_exactly(model_type):
    """A super weight in a layer's shared expert is reported with expert "shared", not as the
    routed expert that contributes most besides it."""
    model = tiny_model(model_type)
    assert is_moe_layer(model, 1)
    plant_super_weight(model, 1, 20, 50, SHARED_EXPERT)
    before = _snapshot(model)

    detection = detect(model, PROMPT_IDS)

    assert [w.key for w in detection.super_weights] == [(1, 20, 50, SHARED_EXPERT)]
    assert detection.super_weights[0].value == 10.0
    assert abs(detection.iterations[1][1].spike) < SpikeRule().min_spike
    _assert_bit_identical(model, before)


@pytest.mark.parametrize("sign", [-1.0, 1.0])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_cancelling_layer_seen_through_family_hooks(model_type, sign):
    """The layer-input hook reads the residual stream in every family: a later layer writing the
    opposite sign of the super activation is cancelling (not reported); the same sign is a source."""
    model = tiny_model(model_type, num_hidden_layers=8)  # the stream carries layer 1's spike to layer 4
    first, second = _routed_expert(model, 1, 2), _routed_expert(model, 4, 2)
    plant_super_weight(model, 1, 7, 13, first)
    plant_super_weight(model, 4, 7, 21, second, weight=sign * 9.0)

    detection = detect(model, PROMPT_IDS)

    stats = detection.iterations[0][4]
    assert stats.row == 7 and stats.residual_before > SpikeRule().min_spike
    assert stats.spike * sign > SpikeRule().min_spike
    keys = sorted(w.key for w in detection.super_weights)
    if sign < 0:
        assert keys == [(1, 7, 13, first)]
        assert detection.cancelling_layers == [4]
    else:
        assert keys == [(1, 7, 13, first), (4, 7, 21, second)]
        assert detection.cancelling_layers == []


def test_unknown_model_type_lists_supported_families():
    with pytest.raises(UnsupportedArchitectureError) as info:
        adapter_for_type("not_a_family")
    message = str(info.value)
    assert "not_a_family" in message
    for family in ADAPTERS:
        assert family in message


def test_detect_on_unrecognisable_layout_raises():
    model = tiny_model("llama")
    model.config.model_type = "not_a_family"
    for layer in decoder_layers(model, ADAPTERS["llama"]):
        layer.mlp.proj_out = layer.mlp.down_proj  # a down projection under a name no row knows
        del layer.mlp.down_proj
    with pytest.raises(UnsupportedArchitectureError, match="follow no known layout.*llama"):
        detect(model, PROMPT_IDS)


@pytest.mark.parametrize("model_type, where", [
    ("llama", (1, 20, 50, None)),
    ("gemma2", (1, 20, 50, None)),  # the post norm is recognised too
    ("qwen2_moe", (1, 20, 50, 2)),
    ("qwen2_moe", (1, 20, 50, SHARED_EXPERT)),  # shared experts too
    ("deepseek_v3", (0, 20, 50, None)),  # and dense layers beside layers with experts
])
def test_unknown_type_with_a_known_layout_uses_that_row_with_a_note(model_type, where):
    model = tiny_model(model_type)
    plant_super_weight(model, *where)
    model.config.model_type = "not_a_family"

    adapter, note = resolve_adapter(model)
    assert adapter is ADAPTERS[model_type]
    assert "'not_a_family' is not in the adapter table" in note
    assert any(f"layout of {family} " in note for family, row in ADAPTERS.items() if row is adapter)
    assert "\n" not in note
    assert resolve_adapter(tiny_model("llama")) == (ADAPTERS["llama"], None)  # a known type: no note
    assert [w.key for w in detect(model, PROMPT_IDS).super_weights] == [where]


@pytest.mark.parametrize("model_type, row", [("helium", "llama"), ("granitemoe", None), ("starcoder2", None)])
def test_config_of_a_type_the_table_lacks_is_judged_before_loading(model_type, row):
    """Real transformers families not in the table, looked at on a weightless model: Helium keeps
    Llama's layout; GraniteMoE's experts (input_linear/output_linear) and StarCoder2's MLP
    (c_fc/c_proj as nn.Linear) follow no row, so they are refused."""
    config = tiny_config(model_type) if model_type != "granitemoe" else tiny_config(
        model_type, num_local_experts=4, num_experts_per_tok=2)
    if row is None:
        with pytest.raises(UnsupportedArchitectureError, match=f"'{model_type}' is not in the adapter table"):
            adapter_for_config(config)
    else:
        adapter, note = adapter_for_config(config)
        assert adapter is ADAPTERS[row] and f"'{model_type}'" in note


def test_docs_list_every_row():
    """docs/architectures.md's table and README's Coordinates section name every model type."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    table = (repo / "docs" / "architectures.md").read_text(encoding="utf-8")
    readme = (repo / "README.md").read_text(encoding="utf-8")
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| ")]
    table_rows = "\n".join(first_cells)
    for family in ADAPTERS:
        assert re.search(rf"\b{family}\b", table_rows), f"{family} missing from docs/architectures.md's table"
        assert re.search(rf"\b{family}\b", readme), f"{family} missing from README"


def test_granite_write_is_what_the_residual_stream_gets():
    """Granite multiplies the MLP output by residual_multiplier before the residual add: the write
    detection judges and reports is that product (it was the raw output, 1 / 0.22 = 4.5x too large
    on Granite 3)."""
    from superweight.find.hooks import capture_layer_stats

    layer, row, col = 1, 20, 50
    model = tiny_model("granite", residual_multiplier=0.25)
    plant_super_weight(model, layer, row, col)
    detection = detect(model, PROMPT_IDS)
    assert [w.key[:3] for w in detection.super_weights] == [(layer, row, col)]
    found = detection.super_weights[0]
    with capture_layer_stats(model) as stats, torch.no_grad():
        model(PROMPT_IDS)
    s = stats[layer]
    assert found.output_spike == pytest.approx(0.25 * s.raw_output, rel=1e-6)
    unscaled = tiny_model("granite", residual_multiplier=1.0)
    plant_super_weight(unscaled, layer, row, col)
    with capture_layer_stats(unscaled) as plain, torch.no_grad():
        unscaled(PROMPT_IDS)
    assert plain[layer].spike == pytest.approx(plain[layer].raw_output, rel=1e-6)
