"""Super-weight detection on tiny random models with planted super weights."""

from __future__ import annotations

import pytest
import torch

from superweight.model.adapters import decoder_layers, down_proj_matrix
from superweight.find.detect import SpikeRule, detect
from superweight.errors import UsageError

from synthetic import (PROMPT_IDS, layered_super_activation, one_thread_per_module, plant_super_weight,  # noqa: F401
                       snapshot, tiny_model)

IDS = PROMPT_IDS


def _assert_bit_identical(model, before) -> None:
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"weights changed: {changed}"


def _hook_count(model) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(getattr(m, "_forward_hooks_with_kwargs", {}))
        for m in model.modules()
    )


def test_planted_super_weight_found_exactly():
    model = tiny_model("llama")
    plant_super_weight(model, 1, 7, 13, input_spike=100.0, weight=10.0)
    rule = SpikeRule()

    detection = detect(model, IDS, rule=rule)

    assert [w.key for w in detection.super_weights] == [(1, 7, 13, None)]
    w = detection.super_weights[0]
    assert w.value == 10.0
    assert w.input_activation == pytest.approx(100.0, rel=0.1)
    assert w.output_spike == pytest.approx(1000.0, rel=0.1)
    assert 0 <= w.token < IDS.shape[1]
    assert w.iteration == 0
    assert detection.candidate_layers == [[1], []]
    assert detection.num_tokens == IDS.shape[1]
    # the evidence of iteration 0 names the same place
    s = detection.iterations[0][1]
    assert (s.row, s.col) == (7, 13)


def test_nothing_planted_reports_nothing():
    for model_type in ("llama", "gpt2"):
        model = tiny_model(model_type)
        detection = detect(model, IDS)
        assert detection.super_weights == []
        assert detection.candidate_layers == [[]]
        assert len(detection.iterations) == 1
        assert max(abs(s.spike) for s in detection.iterations[0]) < SpikeRule().min_spike


def test_two_super_weights_in_one_row_found_by_iteration():
    model = tiny_model("llama")
    # The second one is hidden behind the first (smaller input spike): only seen once it is zeroed.
    plant_super_weight(model, 1, 7, 13, input_spike=100.0, weight=10.0)
    plant_super_weight(model, 1, 7, 40, input_spike=30.0, weight=10.0)
    before = snapshot(model)

    detection = detect(model, IDS, iterations=5)

    assert [(w.key, w.iteration) for w in detection.super_weights] == [
        ((1, 7, 13, None), 0),
        ((1, 7, 40, None), 1),
    ]
    assert detection.super_weights[1].output_spike == pytest.approx(300.0, rel=0.1)
    assert detection.candidate_layers == [[1], [1], []]
    _assert_bit_identical(model, before)

    # One iteration sees only the first.
    once = detect(model, IDS, iterations=1)
    assert [w.key for w in once.super_weights] == [(1, 7, 13, None)]
    _assert_bit_identical(model, before)


def test_col_is_the_largest_push_in_the_spikes_direction_not_against_it():
    model = tiny_model("llama")
    plant_super_weight(model, 1, 7, 13, input_spike=100.0, weight=10.0)  # writes +1000
    plant_super_weight(model, 1, 7, 40, input_spike=60.0, weight=10.0)  # writes +600
    plant_super_weight(model, 1, 7, 50, input_spike=120.0, weight=-9.0)  # -1080: larger, but against the spike

    detection = detect(model, IDS, iterations=1)

    assert [w.key for w in detection.super_weights] == [(1, 7, 13, None)]
    assert detection.super_weights[0].value == 10.0


def test_gpt2_conv1d_layout_reports_row_and_col():
    model = tiny_model("gpt2")
    c_proj = decoder_layers(model)[1].mlp.c_proj
    assert tuple(c_proj.weight.shape) == (64, 32)  # Conv1D: [in (intermediate), out (hidden)]
    plant_super_weight(model, 1, 7, 13, weight=10.0)

    detection = detect(model, IDS)

    assert [w.key for w in detection.super_weights] == [(1, 7, 13, None)]
    assert c_proj.weight[13, 7].item() == 10.0
    assert c_proj.weight[7, 13].item() != 10.0
    assert down_proj_matrix(model, 1)[7, 13].item() == c_proj.weight[13, 7].item()
    assert detection.super_weights[0].value == 10.0


@pytest.mark.parametrize("model_type", ["gemma2", "olmo2"])
def test_post_norm_super_weight_found_through_the_norm(model_type):
    rule = SpikeRule()
    # Raw down_proj output at the row is ~50, below the floor; the post-feed-forward norm's gain
    # at that row makes the residual write huge.
    model = tiny_model(model_type)
    plant_super_weight(model, 1, 7, 13, input_spike=100.0, weight=0.5, post_norm_gain=500.0)

    detection = detect(model, IDS, rule=rule)

    assert [w.key for w in detection.super_weights] == [(1, 7, 13, None)]
    stats = detection.iterations[0][1]
    assert stats.output_max < rule.min_spike
    assert abs(stats.spike) >= 10 * rule.min_spike

    # Control: the same plant with the norm left alone is not a super weight.
    plain = tiny_model(model_type)
    plant_super_weight(plain, 1, 7, 13, input_spike=100.0, weight=0.5, post_norm_gain=None)
    assert detect(plain, IDS, rule=rule).super_weights == []


@pytest.mark.parametrize("iterations", [0, -1])
def test_iterations_must_be_positive(iterations):
    model = tiny_model("llama")
    with pytest.raises(UsageError):
        detect(model, IDS, iterations=iterations)


def test_hooks_removed_after_detect(monkeypatch):
    model = tiny_model("llama")
    plant_super_weight(model, 1, 7, 13)
    baseline = _hook_count(model)
    mlp = decoder_layers(model)[3].mlp
    original = mlp.forward
    during = []

    def counting(*args, **kwargs):
        during.append(_hook_count(model))
        return original(*args, **kwargs)

    monkeypatch.setattr(mlp, "forward", counting)
    detect(model, IDS)
    assert len(during) == 2 and all(n > baseline for n in during)  # they were there while running
    assert _hook_count(model) == baseline


def test_hooks_removed_and_weights_restored_when_forward_raises(monkeypatch):
    model = tiny_model("llama")
    plant_super_weight(model, 1, 7, 13)
    before = snapshot(model)
    baseline = _hook_count(model)
    mlp = decoder_layers(model)[3].mlp
    original = mlp.forward
    calls = []

    def failing_on_second_pass(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after the first super weight was zeroed
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    monkeypatch.setattr(mlp, "forward", failing_on_second_pass)
    with pytest.raises(RuntimeError, match="boom"):
        detect(model, IDS)
    assert len(calls) == 2
    assert _hook_count(model) == baseline
    _assert_bit_identical(model, before)


def _cancelling_model(sign: float):
    # As in real models, the stream carries the super activation for a few layers before a later
    # layer (here 4 of 8) removes it.
    model = tiny_model("llama", num_hidden_layers=8)
    plant_super_weight(model, 1, 7, 13, input_spike=100.0, weight=10.0)  # writes ~ +1000 at row 7
    # Layer 4 writes at the same row ~ 900 with `sign`.
    plant_super_weight(model, 4, 7, 21, input_spike=100.0, weight=sign * 9.0)
    return model


def test_cancelling_layer_is_not_reported():
    model = _cancelling_model(-1.0)
    detection = detect(model, IDS)
    stats = detection.iterations[0][4]
    assert stats.spike < -SpikeRule().min_spike and stats.residual_before > 500  # opposite signs
    assert [w.key for w in detection.super_weights] == [(1, 7, 13, None)]
    assert detection.cancelling_layers == [4]


def test_same_sign_later_layer_is_reported():
    # Control for the test above: only the sign differs, and now layer 2 is a source too.
    model = _cancelling_model(+1.0)
    detection = detect(model, IDS)
    assert sorted(w.key for w in detection.super_weights) == [(1, 7, 13, None), (4, 7, 21, None)]
    assert detection.cancelling_layers == []


@pytest.mark.parametrize("model_type", ["gemma3_text", "gemma2", "llama"])
def test_super_activation_built_by_six_layers_is_found_in_every_layer(model_type):
    """Issue 12's real post-norm model, in small: every layer writes >= 1000 (so no layer stands out
    from the others), six consecutive layers each build the same super activation through one weight,
    two late layers cancel it. Each builder is judged on its own write: all six found, no canceller."""
    model = layered_super_activation(model_type)
    before = snapshot(model)

    detection = detect(model, IDS)

    first = detection.iterations[0]
    if model_type != "llama":  # post-norm: small raw outputs, massive writes everywhere
        assert all(abs(s.spike) >= 1000 for s in first)
        assert all(abs(first[layer].raw_output) < 2 for layer in range(2, 8))
    assert sorted(w.key for w in detection.super_weights) == [(layer, 7, 10 + layer, None) for layer in range(2, 8)]
    assert all(w.iteration == 0 for w in detection.super_weights)
    assert set(detection.cancelling_layers) == {10, 11}
    for w in detection.super_weights:
        assert w.concentration > 0.5 and w.share > 0.9 and w.residual_after * w.output_spike > 0
    _assert_bit_identical(model, before)


def test_each_rule_is_needed():
    """Each of the five conditions, switched off by its own threshold, lets a wrong layer in."""
    model = layered_super_activation("gemma3_text")
    detection = detect(model, IDS, iterations=1)
    reasons = dict(zip(range(12), detection.rejections[0]))
    assert reasons[10] == reasons[11] == "cancelling"
    assert {reasons[layer] for layer in (0, 1, 8, 9)} <= {"spread", "many weights"}
    # Without the concentration and share conditions the diffuse writers would be reported.
    loose = detect(model, IDS, iterations=1, rule=SpikeRule(min_concentration=1e-9, min_share=1e-9))
    assert {w.layer for w in loose.super_weights} - set(range(2, 8))


@pytest.mark.parametrize("field,value", [("min_spike", -5), ("min_spike", 0), ("min_concentration", 1.5),
                                         ("min_share", 0), ("min_share", float("nan"))])
def test_rule_thresholds_are_checked(field, value):
    with pytest.raises(UsageError, match=field.replace("_", "-")):
        SpikeRule(**{field: value})


def test_last_layers_are_not_sources():
    """A write in the last layers reaches the output head directly: the stream carries it nowhere."""
    model = tiny_model("llama", num_hidden_layers=10)
    plant_super_weight(model, 9, 7, 13)
    detection = detect(model, IDS)
    assert detection.super_weights == []
    assert detection.rejections[0][9] == "not carried"
