"""Ablation, controls, super-activation restoration and saving, on tiny synthetic models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from superweight import __version__
from superweight.edit.ablate import AblationRecord, ablated, apply, outlier_control, random_control, undo
from superweight.edit.restore import restore_threshold, restored_activation
from superweight.edit.save import RECORD_FILE, save_ablated
from superweight.edit.validate import validate_coords
from superweight.model.adapters import adapter_for, decoder_layers, down_proj_matrix, down_proj_module, num_experts
from superweight.coords import SuperWeight
from superweight.errors import CoordinatesError, OutputPathError, UsageError
from superweight.model.load import load_model

from synthetic import (HIDDEN, INTERMEDIATE, LAYERS, PROMPT_IDS, one_thread_per_module, plant_super_weight,  # noqa: F401
                       snapshot, tiny_model)

IDS = PROMPT_IDS


def _changed(model, before) -> dict[str, list[tuple[int, ...]]]:
    """Per tensor, the indices whose value differs from `before` (NaN-safe, bit-level for floats)."""
    after = model.state_dict()
    changed = {}
    for name, old in before.items():
        new = after[name]
        if not torch.equal(old, new):
            diff = (old != new).nonzero().tolist()
            changed[name] = sorted(tuple(i) for i in diff)
    return changed


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


# ---------------------------------------------------------------------------------------------
# apply / undo


def test_zero_changes_exactly_the_named_weights_and_undo_restores():
    model = tiny_model("llama")
    before = snapshot(model)
    weights = [SuperWeight(0, 3, 5), SuperWeight(2, 31, 63), SuperWeight(2, 0, 7)]
    originals = [float(down_proj_matrix(model, w.layer)[w.row, w.col].detach()) for w in weights]
    assert all(v != 0 for v in originals)

    record = apply(model, weights, mode="zero")

    assert _changed(model, before) == {
        "model.layers.0.mlp.down_proj.weight": [(3, 5)],
        "model.layers.2.mlp.down_proj.weight": [(0, 7), (31, 63)],
    }
    assert all(float(down_proj_matrix(model, w.layer)[w.row, w.col].detach()) == 0.0 for w in weights)
    assert record.mode == "zero" and record.factor == 0.0
    assert record.original_values == originals
    assert record.new_values == [0.0, 0.0, 0.0]

    undo(model, record)
    assert _changed(model, before) == {}


def test_scale_multiplies_by_factor():
    model = tiny_model("llama")
    before = snapshot(model)
    w = SuperWeight(1, 7, 13)
    original = down_proj_matrix(model, 1)[7, 13].clone()

    record = apply(model, [w, w], mode="scale", factor=2.5)  # a repeated coordinate is applied once

    assert _changed(model, before) == {"model.layers.1.mlp.down_proj.weight": [(7, 13)]}
    assert torch.equal(down_proj_matrix(model, 1)[7, 13], original * 2.5)
    assert record.weights == [w] and record.factor == 2.5
    undo(model, record)
    assert _changed(model, before) == {}


def test_gpt2_conv1d_layout_and_moe_expert():
    gpt2 = tiny_model("gpt2")
    before = snapshot(gpt2)
    record = apply(gpt2, [SuperWeight(1, 7, 13)])
    # Conv1D stores [in, out]: (row 7, col 13) is weight[13, 7]
    assert _changed(gpt2, before) == {"transformer.h.1.mlp.c_proj.weight": [(13, 7)]}
    undo(gpt2, record)
    assert _changed(gpt2, before) == {}

    moe = tiny_model("mixtral")
    before = snapshot(moe)
    record = apply(moe, [SuperWeight(2, 5, 9, expert=3)], mode="scale", factor=-1.0)
    assert _changed(moe, before) == {"model.layers.2.mlp.experts.down_proj": [(3, 5, 9)]}
    undo(moe, record)
    assert _changed(moe, before) == {}


def test_shared_expert_and_dense_layer_coordinates_of_a_deepseek_layout():
    """DeepSeek-V3's shape: layer 0 dense (no expert), later layers routed + shared experts."""
    model = tiny_model("deepseek_v3")
    before = snapshot(model)
    weights = [SuperWeight(0, 5, 9), SuperWeight(2, 5, 9, expert="shared"), SuperWeight(2, 6, 3, expert=1)]
    record = apply(model, weights, mode="scale", factor=-1.0)
    assert _changed(model, before) == {
        "model.layers.0.mlp.down_proj.weight": [(5, 9)],
        "model.layers.2.mlp.shared_experts.down_proj.weight": [(5, 9)],
        "model.layers.2.mlp.experts.down_proj": [(1, 6, 3)],
    }
    undo(model, record)
    assert _changed(model, before) == {}


@pytest.mark.parametrize("model_type, bad, words", [
    ("deepseek_v3", SuperWeight(0, 1, 2, expert=0), ["expert 0", "layer 0 is a dense layer"]),
    ("deepseek_v3", SuperWeight(1, 1, 2), ["no expert", "LAYER,ROW,COL,shared"]),
    ("mixtral", SuperWeight(1, 1, 2, expert="shared"), ["shared expert", "has none"]),
])
def test_expert_coordinates_that_do_not_fit_the_layer_refused(model_type, bad, words):
    model = tiny_model(model_type)
    before = snapshot(model)
    with pytest.raises(CoordinatesError) as info:
        apply(model, [bad])
    for word in [*words, "another model"]:
        assert word in str(info.value)
    assert _changed(model, before) == {}


def test_outlier_control_reaches_shared_experts():
    model = tiny_model("qwen2_moe")
    with torch.no_grad():
        down_proj_matrix(model, 3, "shared")[4, 7] = 50.0  # the largest weight of all down projections
    drawn = outlier_control(model, [SuperWeight(1, 0, 0, expert=0)], top=1)
    assert [w.key for w in drawn] == [(3, 4, 7, "shared")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_undo_is_bit_exact_in_half_precision(dtype):
    model = tiny_model("llama").to(dtype)
    before = snapshot(model)
    weights = [SuperWeight(0, 1, 2), SuperWeight(3, 30, 60)]
    record = apply(model, weights, mode="scale", factor=0.3)
    assert all(t.dtype == dtype and t.dim() == 0 for t in record.original)
    assert set(_changed(model, before)) == {"model.layers.0.mlp.down_proj.weight", "model.layers.3.mlp.down_proj.weight"}
    undo(model, record)
    assert _changed(model, before) == {}


def test_ablated_context_undoes_even_on_error():
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ablated(model, [SuperWeight(1, 7, 13)]) as record:
            assert float(down_proj_matrix(model, 1)[7, 13].detach()) == 0.0
            assert isinstance(record, AblationRecord)
            raise RuntimeError("boom")
    assert _changed(model, before) == {}


@pytest.mark.parametrize(
    "mode, factor",
    [("scale", None), ("scale", math.nan), ("scale", math.inf), ("scale", True), ("scale", "2"),
     ("zero", 2.0), ("halve", None)],
)
def test_bad_mode_or_factor_is_a_usage_error(mode, factor):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(UsageError):
        apply(model, [SuperWeight(1, 7, 13)], mode=mode, factor=factor)
    assert _changed(model, before) == {}


@pytest.mark.parametrize(
    "bad, words",
    [
        (SuperWeight(LAYERS, 0, 0), ["layer 4", "0..3"]),
        (SuperWeight(1, HIDDEN, 0), ["row 32", "0..31"]),
        (SuperWeight(1, 0, INTERMEDIATE), ["col 64", "0..63"]),
        (SuperWeight(1, 0, 0, expert=0), ["expert 0", "no experts"]),
        (SuperWeight(-1, 0, 0), ["layer", "non-negative"]),
    ],
)
def test_out_of_range_coordinates_refused_before_touching(bad, words):
    model = tiny_model("llama")
    before = snapshot(model)
    good = SuperWeight(0, 1, 2)
    with pytest.raises(CoordinatesError) as info:
        apply(model, [good, bad])
    message = str(info.value)
    assert "\n" not in message and "another model" in message
    for word in words:
        assert word in message
    assert _changed(model, before) == {}


@pytest.mark.parametrize(
    "bad, words",
    [(SuperWeight(1, 0, 0), ["no expert", "4 experts"]), (SuperWeight(1, 0, 0, expert=4), ["expert 4", "0..3"])],
)
def test_moe_expert_coordinates_refused(bad, words):
    model = tiny_model("mixtral")
    before = snapshot(model)
    with pytest.raises(CoordinatesError) as info:
        apply(model, [SuperWeight(0, 1, 2, expert=0), bad])
    for word in [*words, "another model"]:
        assert word in str(info.value)
    assert _changed(model, before) == {}


def test_empty_coordinates_refused():
    model = tiny_model("llama")
    with pytest.raises(CoordinatesError):
        validate_coords(model, [])
    with pytest.raises(CoordinatesError):
        apply(model, [])
    validate_coords(model, [SuperWeight(LAYERS - 1, HIDDEN - 1, INTERMEDIATE - 1)])  # the last weight is fine


# ---------------------------------------------------------------------------------------------
# Controls


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
def test_random_control(model_type):
    model = tiny_model(model_type)
    expert = 0 if model_type == "mixtral" else None
    supers = [SuperWeight(1, 7, 13, expert), SuperWeight(1, 7, 40, expert), SuperWeight(3, 2, 5, expert)]

    drawn = random_control(model, supers, seed=123)

    assert len(drawn) == len(supers)
    assert [(d.layer, d.expert) for d in drawn] == [(s.layer, s.expert) for s in supers]
    keys = {d.key for d in drawn}
    assert len(keys) == len(drawn) and not keys & {s.key for s in supers}
    assert [d.value for d in drawn] == [float(down_proj_matrix(model, d.layer, d.expert)[d.row, d.col].detach()) for d in drawn]
    assert random_control(model, supers, seed=123) == drawn
    assert random_control(model, supers, seed=124) != drawn
    validate_coords(model, drawn)


def test_random_control_never_draws_a_super_weight():
    model = tiny_model("llama", hidden_size=8, intermediate_size=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=4)
    # layer 0's down projection has 16 weights; 8 are "super weights": the draws must be the other 8
    everything = {(r, c) for r in range(8) for c in range(2)}
    supers = [SuperWeight(0, r, c) for r, c in sorted(everything)[::2]]
    rest = everything - {(s.row, s.col) for s in supers}
    for seed in range(5):
        drawn = random_control(model, supers, seed)
        assert {(d.row, d.col) for d in drawn} == rest and all(d.layer == 0 for d in drawn)
    extra = SuperWeight(0, *sorted(rest)[0])
    with pytest.raises(UsageError):  # 9 super weights leave only 7 to draw from
        random_control(model, [*supers, extra], seed=0)


def _brute_force_outliers(model, supers, top):
    adapter = adapter_for(model)
    excluded = {s.key for s in supers}
    entries = []
    n_experts = num_experts(model, adapter)
    for layer in range(len(decoder_layers(model, adapter))):
        for expert in range(n_experts) if n_experts else (None,):
            matrix = down_proj_matrix(model, layer, expert, adapter)
            for row in range(matrix.shape[0]):
                for col, value in enumerate(matrix[row].tolist()):
                    if (layer, row, col, expert) not in excluded:
                        entries.append((abs(value), (layer, row, col, expert)))
    entries.sort(key=lambda e: -e[0])
    return [key for _, key in entries[:top]]


@pytest.mark.parametrize("model_type, top", [("llama", 1), ("llama", 40), ("mixtral", 25), ("gpt2", 30)])
def test_outlier_control_is_the_top_n_without_super_weights(model_type, top):
    model = tiny_model(model_type)
    expert = 1 if model_type == "mixtral" else None
    supers = [SuperWeight(1, 7, 13, expert), SuperWeight(2, 4, 9, expert)]
    with torch.no_grad():  # make the super weights the largest of all: they must still be left out
        down_proj_matrix(model, 1, expert)[7, 13] = 50.0
        down_proj_matrix(model, 2, expert)[4, 9] = -40.0
    before = snapshot(model)

    outliers = outlier_control(model, supers, top)

    assert [o.key for o in outliers] == _brute_force_outliers(model, supers, top)
    assert len(outliers) == top
    assert [o.value for o in outliers] == [
        float(down_proj_matrix(model, o.layer, o.expert)[o.row, o.col].detach()) for o in outliers
    ]
    assert _changed(model, before) == {}


def test_outlier_control_rejects_bad_top():
    model = tiny_model("llama")
    for top in (0, -3, 2.5, True):
        with pytest.raises(UsageError):
            outlier_control(model, [SuperWeight(1, 7, 13)], top)


def test_controls_are_recorded():
    model = tiny_model("llama")
    supers = [SuperWeight(1, 7, 13)]
    drawn = random_control(model, supers, seed=7)
    with ablated(model, drawn, control="random", seed=7, reference=supers) as record:
        doc = record.to_dict()
    assert doc["control"]["kind"] == "random" and doc["control"]["seed"] == 7
    assert doc["control"]["super_weights"] == [{"layer": 1, "row": 7, "col": 13}]
    assert doc["coordinates"] == [{"layer": d.layer, "row": d.row, "col": d.col} for d in drawn]
    json.dumps(doc)
    with ablated(model, outlier_control(model, supers, 5), control="outliers", top=5) as record:
        assert record.to_dict()["control"] == {"kind": "outliers", "seed": None, "top": 5}
    with pytest.raises(UsageError):
        apply(model, supers, control="sideways")


# ---------------------------------------------------------------------------------------------
# Super-activation restoration


def _spiky_input(spike_positions, spike=100.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(1, 8, INTERMEDIATE, generator=generator)
    x[0, spike_positions, 13] = spike
    return x


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2"])
def test_restoration_writes_back_the_original_output_only_where_it_spikes(model_type):
    model = tiny_model(model_type)
    module = down_proj_module(model, 1)
    with torch.no_grad():
        matrix = down_proj_matrix(model, 1)
        matrix[7, 13] = 10.0
        matrix[7, 20] = 3.0
    spikes = [1, 4]
    others = [i for i in range(8) if i not in spikes]
    x = _spiky_input(spikes)
    x[0, :, 20] = 2.0  # the second ablated column contributes 6 at every position
    with torch.no_grad():
        y_orig = module(x)
    assert (y_orig[0, spikes, 7].abs() > 900).all() and (y_orig[0, others, 7].abs() < 100).all()

    with ablated(model, [SuperWeight(1, 7, 13), SuperWeight(1, 7, 20)]) as record:
        with torch.no_grad():
            y_ablated = module(x)
            hooks = _hook_count(model)
            with restored_activation(model, record):
                assert _hook_count(model) == hooks + 1
                y_restored = module(x)
            assert _hook_count(model) == hooks
    assert not torch.allclose(y_ablated[0, spikes, 7], y_orig[0, spikes, 7], rtol=0.1)
    torch.testing.assert_close(y_restored[0, spikes, 7], y_orig[0, spikes, 7], rtol=1e-5, atol=1e-4)
    assert torch.equal(y_restored[0, others, 7], y_ablated[0, others, 7])
    other_rows = [r for r in range(HIDDEN) if r != 7]
    assert torch.equal(y_restored[..., other_rows], y_ablated[..., other_rows])


def test_restoration_threshold_rule():
    assert restore_threshold([SuperWeight(1, 7, 13)]) == 100.0
    assert restore_threshold([SuperWeight(1, 7, 13)], floor=5.0) == 5.0
    assert restore_threshold([SuperWeight(1, 7, 13, output_spike=-5000.0)]) == 500.0
    assert restore_threshold([SuperWeight(1, 7, 13, output_spike=300.0)]) == 100.0
    assert restore_threshold([SuperWeight(1, 7, 13, output_spike=3000.0), SuperWeight(1, 7, 14)]) == 300.0

    model = tiny_model("llama")
    module = down_proj_module(model, 1)
    with torch.no_grad():
        down_proj_matrix(model, 1)[7, 13] = 10.0
    x = _spiky_input([2], spike=50.0)  # original output at row 7 is about 500 at position 2
    with torch.no_grad():
        y_orig = module(x)

    def restored(weight, **kwargs):
        with ablated(model, [weight]) as record, torch.no_grad():
            with restored_activation(model, record, **kwargs):
                return module(x)[0, 2, 7]

    assert torch.isclose(restored(SuperWeight(1, 7, 13)), y_orig[0, 2, 7])  # 500 >= 100
    assert not torch.isclose(restored(SuperWeight(1, 7, 13), floor=1000.0), y_orig[0, 2, 7])
    assert torch.isclose(restored(SuperWeight(1, 7, 13, output_spike=4000.0)), y_orig[0, 2, 7])  # >= 400
    assert not torch.isclose(restored(SuperWeight(1, 7, 13, output_spike=6000.0)), y_orig[0, 2, 7])  # < 600


def test_restoration_through_the_whole_model_recovers_the_output():
    model = tiny_model("llama")
    plant_super_weight(model, 1, 7, 13, input_spike=100.0, weight=10.0)
    before = snapshot(model)
    original = _logits(model)
    weights = [SuperWeight(1, 7, 13)]
    with ablated(model, weights) as record:
        broken = _logits(model)
        with restored_activation(model, record):
            restored = _logits(model)
        # the list-of-weights form, reading the ablated values from the model
        with restored_activation(model, weights, [v for v in record.original]):
            restored_again = _logits(model)
        with restored_activation(model, weights * 2, [v for v in record.original] * 2):  # a repeat counts once
            restored_repeated = _logits(model)
        assert torch.equal(_logits(model), broken)  # hooks are gone
    assert (broken - original).abs().max() > 1e-2
    torch.testing.assert_close(restored, original, rtol=1e-4, atol=1e-4)
    assert torch.equal(restored, restored_again) and torch.equal(restored, restored_repeated)
    assert _changed(model, before) == {}


@pytest.mark.parametrize("model_type", ["olmo2", "gemma2"])
def test_restoration_of_a_detected_weight_recovers_post_norm_models(model_type):
    # The recorded spike is the residual write, after the post-feed-forward norm: it is not in the
    # raw down-projection units the hook compares, so it must not set the threshold there.
    from superweight.find.detect import detect

    model = tiny_model(model_type)
    plant_super_weight(model, 1, 7, 13, post_norm_gain=5000.0)
    original = _logits(model)
    weights = detect(model, IDS).super_weights
    assert [(w.layer, w.row, w.col) for w in weights][:1] == [(1, 7, 13)] and abs(weights[0].output_spike) > 2000
    with ablated(model, weights[:1]) as record:
        broken = _logits(model)
        with restored_activation(model, record):
            restored = _logits(model)
    assert (broken - original).abs().max() > 1e-2
    torch.testing.assert_close(restored, original, rtol=1e-4, atol=1e-4)


def test_restoration_hooks_removed_on_error_and_moe_refused():
    model = tiny_model("llama")
    hooks = _hook_count(model)
    with ablated(model, [SuperWeight(1, 7, 13)]) as record:
        with pytest.raises(RuntimeError):
            with restored_activation(model, record):
                assert _hook_count(model) == hooks + 1
                raise RuntimeError("boom")
    assert _hook_count(model) == hooks

    moe = tiny_model("mixtral")
    hooks = _hook_count(moe)
    with ablated(moe, [SuperWeight(1, 7, 13, expert=0)]) as record:
        with pytest.raises(UsageError, match="mixture-of-experts"):
            with restored_activation(moe, record):
                pass
    assert _hook_count(moe) == hooks


# ---------------------------------------------------------------------------------------------
# Saving


@pytest.fixture
def loaded(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), device="cpu")


def _record_on(loaded, weights=(SuperWeight(1, 7, 13),)):
    return apply(loaded.model, list(weights))


def test_save_ablated_round_trip(loaded, tmp_path):
    record = _record_on(loaded, [SuperWeight(1, 7, 13), SuperWeight(2, 3, 4)])
    expected = snapshot(loaded.model)
    out = save_ablated(loaded, record, tmp_path / "ablated")

    assert out == tmp_path / "ablated"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert float(reloaded.model.layers[1].mlp.down_proj.weight[7, 13].item()) == 0.0
    state = reloaded.state_dict()
    assert set(state) == set(expected)
    assert [k for k, v in expected.items() if not torch.equal(state[k], v)] == []

    doc = json.loads((out / RECORD_FILE).read_text())
    assert doc["superweight_version"] == __version__
    assert doc["source"]["location"] == str(loaded.source.location) and doc["source"]["spec"] == loaded.source.spec
    assert doc["coordinates"] == [{"layer": 1, "row": 7, "col": 13}, {"layer": 2, "row": 3, "col": 4}]
    assert doc["mode"] == "zero" and doc["factor"] == 0.0
    assert doc["original_values"] == record.original_values and doc["new_values"] == [0.0, 0.0]
    assert doc["control"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["ablated"]  # no temporary directory left


def test_save_refuses_non_empty_directory_without_force(loaded, tmp_path):
    record = _record_on(loaded)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="--force"):
        save_ablated(loaded, record, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    save_ablated(loaded, record, out, force=True)
    assert (out / RECORD_FILE).is_file() and not (out / "keep.txt").exists()


def test_save_refuses_inside_the_model_directory(loaded, tiny_llama_dir):
    record = _record_on(loaded)
    listing = sorted(p.name for p in tiny_llama_dir.iterdir())
    for target in (tiny_llama_dir / "ablated", tiny_llama_dir):
        with pytest.raises(OutputPathError, match="inside the model directory"):
            save_ablated(loaded, record, target, force=True)
    assert sorted(p.name for p in tiny_llama_dir.iterdir()) == listing


def test_save_refuses_a_directory_that_contains_the_model_even_with_force(loaded, tiny_llama_dir):
    record = _record_on(loaded)
    parent = tiny_llama_dir.parent  # replacing it with --force would delete the model inside
    listing = sorted(p.name for p in parent.iterdir())
    with pytest.raises(OutputPathError, match="contains the model directory"):
        save_ablated(loaded, record, parent, force=True)
    assert sorted(p.name for p in parent.iterdir()) == listing and (tiny_llama_dir / "config.json").is_file()


def test_interrupted_save_leaves_nothing(loaded, tmp_path, monkeypatch):
    record = _record_on(loaded)
    real_save = loaded.model.save_pretrained

    def save_then_interrupt(path, *args, **kwargs):
        real_save(path, *args, **kwargs)
        assert any(p.iterdir() for p in [path])  # something was half written
        raise KeyboardInterrupt

    monkeypatch.setattr(loaded.model, "save_pretrained", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_ablated(loaded, record, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_save_drops_a_leftover_quantizer(loaded, tmp_path):
    record = _record_on(loaded)
    model = loaded.model

    class FakeGgufQuantizer:  # what a dequantised GGUF model still carries
        pass

    quantizer = FakeGgufQuantizer()
    model.hf_quantizer = quantizer
    model.config.quantization_config = {"quant_method": "gguf"}
    out = save_ablated(loaded, record, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert float(AutoModelForCausalLM.from_pretrained(out).model.layers[1].mlp.down_proj.weight[7, 13].item()) == 0.0
    assert model.hf_quantizer is quantizer  # the in-memory model is left as it was


def test_save_refuses_a_model_not_in_the_recorded_state(loaded, tmp_path):
    record = _record_on(loaded)
    undo(loaded.model, record)
    with pytest.raises(UsageError, match="not ablated"):
        save_ablated(loaded, record, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_restoration_recovers_a_post_norm_model_whose_raw_outputs_are_tiny():
    """Issue 12's Gemma-3 pattern: six layers build the super activation, each through one weight
    whose raw output is < 2 (the norm's gain makes it massive). The restoration threshold comes from
    the recorded raw output; a floor of 100 raw units would never fire and restore nothing."""
    from superweight.find.detect import detect
    from synthetic import layered_super_activation

    model = layered_super_activation("gemma3_text")
    original = _logits(model)
    weights = detect(model, IDS).super_weights
    assert len(weights) == 6 and all(abs(w.raw_output) < 2 for w in weights)
    with ablated(model, weights) as record:
        broken = _logits(model)
        with restored_activation(model, record):
            restored = _logits(model)
    assert (broken - original).abs().max() > 1e-2
    torch.testing.assert_close(restored, original, rtol=1e-4, atol=1e-4)
    assert restore_threshold(weights, post_norm=True) == pytest.approx(0.1 * max(abs(w.raw_output) for w in weights))


# --------------------------------------------------------------------------------------------
# Coordinates are checked once per model


def test_checked_coordinates_are_not_checked_again_on_their_model_only(monkeypatch):
    import superweight.edit.validate as validate

    model, other = tiny_model("llama"), tiny_model("llama", seed=1)
    checked = validate_coords(model, [SuperWeight(1, 2, 3), SuperWeight(0, 4, 5)])
    assert isinstance(checked, validate.CheckedCoords) and list(checked) == [SuperWeight(1, 2, 3), SuperWeight(0, 4, 5)]

    def no_check(*args, **kwargs):
        raise AssertionError("checked again")

    monkeypatch.setattr(validate, "decoder_layers", no_check)
    with ablated(model, checked) as record:  # no second check on the model they were checked for
        assert record.new_values == [0.0, 0.0]
    assert random_control(model, checked, seed=0) and outlier_control(model, checked, top=2)
    with pytest.raises(AssertionError, match="checked again"):  # ... but on another model, they are
        apply(other, checked)


def test_checked_coords_refuses_a_recorded_value_the_model_does_not_hold():
    from superweight.edit.validate import checked_coords

    model = tiny_model("llama")
    held = float(down_proj_matrix(model, 1).detach()[2, 3])
    assert list(checked_coords(model, [SuperWeight(1, 2, 3, value=held)])) == [SuperWeight(1, 2, 3, value=held)]
    with pytest.raises(CoordinatesError, match="records the weight as"):
        checked_coords(model, [SuperWeight(1, 2, 3, value=held + 1.0)])
    with pytest.raises(CoordinatesError, match="layer 9 is out of range"):
        checked_coords(model, [SuperWeight(9, 2, 3)])


def test_coordinates_checked_before_the_load_say_so(tiny_llama_dir, tmp_path):
    from superweight.edit.validate import check_coords_before_load
    from superweight.model.source import resolve

    source = resolve(str(tiny_llama_dir))
    assert check_coords_before_load(source, [SuperWeight(3, 31, 63)]) is True
    with pytest.raises(CoordinatesError, match="col 64 is out of range"):
        check_coords_before_load(source, [SuperWeight(3, 31, 64)])
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")  # left to the load to report
    assert check_coords_before_load(resolve(str(tmp_path)), [SuperWeight(0, 0, 0)]) is False


def test_readme_states_the_post_norm_restoration_threshold_the_code_uses():
    """README's "Restoring the super activation" gives the threshold a reader sets expectations by:
    on a post-norm family it is 0.1 x the recorded raw output, which can be far below 100."""
    from conftest import REPO

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("**Restoring the super activation.**", 1)[1].split("\n## ", 1)[0]
    weights = [SuperWeight(1, 7, 13, output_spike=5000.0, raw_output=1.5)]
    assert restore_threshold(weights, post_norm=True) == pytest.approx(0.15)
    assert "100 alone" not in section
    assert "0.1 x the largest raw down-projection output recorded (`raw_output`" in section
