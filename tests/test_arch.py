"""The adapter table: one test set per row of ADAPTERS, on tiny local models of that family."""

from __future__ import annotations

import pytest
import torch

from superweight.arch import (
    ADAPTERS,
    adapter_for,
    adapter_for_type,
    decoder_layers,
    down_proj_matrix,
    down_proj_module,
    num_experts,
    supported_families,
)
from superweight.detect import SpikeRule, detect
from superweight.errors import UnsupportedArchitectureError

from synthetic import HIDDEN, INTERMEDIATE, LAYERS, one_thread_per_module, plant_super_weight, tiny_model  # noqa: F401

FAMILIES = sorted(ADAPTERS)
PROMPT_IDS = torch.tensor([[3, 9, 27, 81, 12, 36, 108, 70, 50]])
REQUIRED = {
    "llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "gemma", "gemma2",
    "gemma3_text", "gpt2", "gpt_neox", "opt", "falcon",
}


def _experts(model) -> list[int | None]:
    n = num_experts(model)
    return [None] if n is None else list(range(n))


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
    experts = _experts(model)
    assert (len(experts) > 1) == adapter.experts
    for layer in range(LAYERS):
        param = getattr(down_proj_module(model, layer), adapter.weight_name)
        for expert in experts:
            matrix = down_proj_matrix(model, layer, expert)
            assert tuple(matrix.shape) == (HIDDEN, INTERMEDIATE)
            assert matrix.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
    # Coordinates must name an expert exactly when the family has experts.
    with pytest.raises(UnsupportedArchitectureError):
        down_proj_matrix(model, 0, None if adapter.experts else 0)

    # Writing the view writes the model: the output changes, and so does the parameter itself.
    before = _logits(model)
    with torch.no_grad():
        for expert in experts:
            down_proj_matrix(model, 0, expert).mul_(0).add_(0.5)
    param = getattr(down_proj_module(model, 0), adapter.weight_name)
    assert bool((param == 0.5).all())
    assert not torch.allclose(_logits(model), before)


@pytest.mark.parametrize("where", [(0, 20, 50, 0), (2, 30, 0, 3)])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_planted_super_weight_is_found_exactly(model_type, where):
    layer, row, col, expert = where
    model = tiny_model(model_type)
    if not ADAPTERS[model_type].experts:
        expert = None
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


@pytest.mark.parametrize("sign", [-1.0, 1.0])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_cancelling_layer_seen_through_family_hooks(model_type, sign):
    """The layer-input hook reads the residual stream in every family: a later layer writing the
    opposite sign of the super activation is cancelling (not reported); the same sign is a source."""
    expert = 2 if ADAPTERS[model_type].experts else None
    model = tiny_model(model_type, num_hidden_layers=8)  # the stream carries layer 1's spike to layer 4
    plant_super_weight(model, 1, 7, 13, expert)
    plant_super_weight(model, 4, 7, 21, expert, weight=sign * 9.0)

    detection = detect(model, PROMPT_IDS)

    stats = detection.iterations[0][4]
    assert stats.row == 7 and stats.residual_before > SpikeRule().min_spike
    assert stats.spike * sign > SpikeRule().min_spike
    keys = sorted(w.key for w in detection.super_weights)
    if sign < 0:
        assert keys == [(1, 7, 13, expert)]
        assert detection.cancelling_layers == [4]
    else:
        assert keys == [(1, 7, 13, expert), (4, 7, 21, expert)]
        assert detection.cancelling_layers == []


def test_unknown_model_type_lists_supported_families():
    with pytest.raises(UnsupportedArchitectureError) as info:
        adapter_for_type("not_a_family")
    message = str(info.value)
    assert "not_a_family" in message
    for family in ADAPTERS:
        assert family in message


def test_detect_on_unsupported_model_raises():
    model = tiny_model("llama")
    model.config.model_type = "not_a_family"
    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        detect(model, PROMPT_IDS)
