"""Round-to-nearest weight and activation quantization, naive and super-outlier aware."""

from __future__ import annotations

import json
import math

import pytest
import torch

from superweight.model.adapters import decoder_layers, down_proj_matrix, down_proj_module
from superweight.coords import SuperWeight
from superweight.errors import UsageError
from superweight.edit.quantize import (
    AUTO_Z_GRID,
    auto_z,
    block_scales,
    default_block_sizes,
    fake_quantize_blockwise,
    fake_quantize_superweight_aware,
    parse_z,
    quantize_model_weights,
    quantized_weights,
    restore_weights,
    weight_targets,
    zscore_clip,
)
from superweight.edit.quantize_activations import (
    fake_quantize_activation_aware,
    fake_quantize_per_sequence,
    quantized_activations,
    super_activation_mask,
)
from superweight.measure.requests import Group, Request
from superweight.measure.scoring import Scorer
from superweight.model import padding
from superweight.measure.quantized import activation_quantization_compare, weight_quantization_sweep
from superweight.report.plots import plot_sweep

from conftest import build_word_tokenizer
from synthetic import PROBE_IDS, one_thread_per_module, plant_super_weight, snapshot, tiny_model  # noqa: F401

LAYER, ROW, COL = 1, 5, 9
SW = SuperWeight(LAYER, ROW, COL)


@pytest.fixture(scope="module")
def planted():
    """A tiny Llama with a genuine super weight at (1, 5, 9)."""
    model = tiny_model("llama", seed=3)
    plant_super_weight(model, LAYER, ROW, COL)
    return model


def _tol(x: torch.Tensor) -> torch.Tensor:
    return x * (1 + 1e-5) + 1e-7


# ----------------------------------------------------------------------------- tensor quantizers


def test_blockwise_by_hand():
    w = torch.tensor([0.0, 0.1, 0.3, 1.5, -2.0, 0.4, 0.2, 1.0])
    # block 0: min 0, max 1.5 -> scale 0.5, zero 0; block 1: min -2, max 1 -> scale 1, zero 2 (2 bits: 3 levels)
    assert block_scales(w, 2, 4).tolist() == pytest.approx([0.5, 1.0])
    dq = fake_quantize_blockwise(w, bits=2, block_size=4)
    assert dq.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.5, -2.0, 0.0, 0.0, 1.0], abs=1e-7)


def test_blockwise_error_bound_and_shape_dtype():
    torch.manual_seed(0)
    w = torch.randn(37, 53) * torch.linspace(0.01, 3, 53)  # 1961 elements: the last block is partial
    for bits, block in ((2, 64), (4, 128), (8, 500), (3, 1)):
        dq = fake_quantize_blockwise(w, bits, block)
        assert dq.shape == w.shape and dq.dtype == w.dtype
        scales = block_scales(w, bits, block)
        err = (w - dq).abs().reshape(-1)
        per_element = scales.repeat_interleave(block)[: w.numel()]
        assert bool((err <= _tol(per_element / 2)).all())
    w16 = w.to(torch.bfloat16)
    assert fake_quantize_blockwise(w16, 4, 64).dtype == torch.bfloat16
    original = w.clone()
    fake_quantize_blockwise(w, 4, 64)
    assert torch.equal(w, original)


def test_each_block_uses_its_own_range_and_last_partial_block():
    small = torch.linspace(0, 0.01, 4)
    large = torch.linspace(0, 100, 4)
    tail = torch.tensor([6.0, 9.0, 7.0])  # a partial block of three: its own scale 1 puts them on integers
    w = torch.cat([small, large, tail])
    dq = fake_quantize_blockwise(w, bits=2, block_size=4)
    # 2 bits, 4 evenly spaced values per block: every value sits on its block's own grid
    assert torch.allclose(dq[:4], small, atol=1e-9)
    assert torch.allclose(dq[4:8], large, atol=1e-5)
    assert dq[8:].tolist() == [6.0, 9.0, 7.0]
    # one shared range would wipe out the small block
    shared = fake_quantize_blockwise(w, bits=2, block_size=w.numel())
    assert (shared[:4] - small).abs().max() > 1e-3


def test_constant_blocks_are_kept():
    w = torch.tensor([3.3, 3.3, 3.3, 3.3, 0.0, 1.0, 2.0, 3.0, -1.25])
    dq = fake_quantize_blockwise(w, bits=2, block_size=4)
    assert torch.equal(dq[:4], w[:4])
    assert torch.equal(dq[8:], w[8:])  # a one-element (constant) last block
    assert torch.equal(fake_quantize_blockwise(torch.full((3, 5), -0.7), 4, 8), torch.full((3, 5), -0.7))


@pytest.mark.parametrize("bits", [1, 9, 0, 4.0, True, "4"])
def test_bad_bits(bits):
    with pytest.raises(UsageError, match="bits must be an integer from 2 to 8") as e:
        fake_quantize_blockwise(torch.ones(4), bits, 2)
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="bits"):
        fake_quantize_per_sequence(torch.ones(4), bits)


@pytest.mark.parametrize("block", [0, -8, 2.5, None, False])
def test_bad_block_size(block):
    with pytest.raises(UsageError, match="block size must be a positive integer"):
        fake_quantize_blockwise(torch.ones(4), 4, block)


@pytest.mark.parametrize("z", [0, -1.0, math.nan, math.inf, True])
def test_bad_z(z):
    with pytest.raises(UsageError, match="z-score clipping threshold must be a positive number"):
        fake_quantize_superweight_aware(torch.ones(4, 4), 4, 4, z, [])


def test_clip_outliers_then_restore_the_super_weight():
    torch.manual_seed(1)
    w = torch.randn(64, 128) * 0.1
    w[3, 7] = 5.0  # the super weight
    w[40, 5] = -4.0  # another outlier, to be clipped
    z = 3.0
    wide = w.double()
    lo = float(wide.mean() - z * wide.std())
    hi = float(wide.mean() + z * wide.std())
    clipped, n = zscore_clip(w, z)
    assert clipped[40, 5].item() == pytest.approx(lo, rel=1e-6)
    assert clipped[3, 7].item() == pytest.approx(hi, rel=1e-6)
    assert n == int(((wide < lo) | (wide > hi)).sum()) >= 2
    inliers = (wide >= lo) & (wide <= hi)
    assert torch.equal(clipped[inliers], w[inliers])

    out = fake_quantize_superweight_aware(w, bits=4, block_size=64, z=z, super_weight_positions=[(3, 7)])
    assert out[3, 7].item() == 5.0  # exactly the original
    # the clipped outlier was quantized from mean - z * std, within its block's half-step
    block = (40 * 128 + 5) // 64
    scale = block_scales(clipped, 4, 64)[block]
    assert abs(out[40, 5].item() - lo) <= float(_tol(scale / 2))
    # clipping shrinks the outliers' blocks: their inliers are reproduced far better than by naive RTN
    naive = fake_quantize_blockwise(w, 4, 64)
    keep = torch.ones_like(w, dtype=torch.bool)
    keep[3, 7] = keep[40, 5] = False
    assert (out - w)[keep].abs().max() < 0.25 * (naive - w)[keep].abs().max()
    # without z only the restore happens
    restored_only = fake_quantize_superweight_aware(w, 4, 64, None, [(3, 7)])
    expected = naive.clone()
    expected[3, 7] = 5.0
    assert torch.equal(restored_only, expected)
    with pytest.raises(UsageError, match="does not fit a tensor of shape"):
        fake_quantize_superweight_aware(w, 4, 64, z, [(64, 0)])


# ----------------------------------------------------------------------------- model weights


def test_quantized_weights_restores_the_model_bit_identically(planted):
    before = snapshot(planted)
    matrix = down_proj_matrix(planted, LAYER)
    original = matrix[ROW, COL].clone()
    with quantized_weights(planted, bits=3, block_size=256, super_weights=[SW], z=3.0) as record:
        inside = snapshot(planted)
        assert matrix[ROW, COL].item() == original.item()
        changed = {k for k in before if not torch.equal(before[k], inside[k])}
        # every decoder weight matrix, nothing else (embeddings, head, norms stay)
        expected = {k for k, v in before.items() if k.startswith("model.layers.") and v.dim() >= 2}
        assert changed == expected and len(expected) == 4 * 7
        assert record.clipped > 0 and len(record.names) == len(expected)
        assert record.to_dict()["super_weights"] == [{"layer": LAYER, "row": ROW, "col": COL}]
    after = snapshot(planted)
    assert all(torch.equal(before[k], after[k]) for k in before)

    with pytest.raises(RuntimeError, match="boom"):
        with quantized_weights(planted, bits=2, block_size=64):
            assert not torch.equal(down_proj_matrix(planted, 0), before["model.layers.0.mlp.down_proj.weight"])
            raise RuntimeError("boom")
    after = snapshot(planted)
    assert all(torch.equal(before[k], after[k]) for k in before)

    record = quantize_model_weights(planted, 4, 128)  # naive: the super weight is quantized too
    assert matrix[ROW, COL].item() != original.item()
    restore_weights(record)
    assert all(torch.equal(before[k], v) for k, v in snapshot(planted).items())


def _largest_error(quantized: torch.Tensor, original: torch.Tensor) -> float:
    return float((quantized.float() - original.float()).abs().max())


@pytest.mark.parametrize("block_size", [64, 1024, 16384])
def test_auto_z_is_the_grid_threshold_with_the_least_largest_error_and_never_worse_than_naive(block_size):
    torch.manual_seed(0)
    matrix = torch.randn(64, 256) * 0.02
    matrix[5, 9] = 2.0  # a super weight (restored exactly after quantizing)
    matrix[7, 100], matrix[40, 3] = 0.6, -0.5  # other outliers
    positions = [(5, 9)]
    chosen = auto_z(matrix, 4, block_size, positions)
    errors = {z: _largest_error(fake_quantize_superweight_aware(matrix, 4, block_size, z, positions), matrix)
              for z in AUTO_Z_GRID}
    assert errors[chosen] == min(errors.values())
    auto = fake_quantize_superweight_aware(matrix, 4, block_size, "auto", positions)
    assert torch.equal(auto, fake_quantize_superweight_aware(matrix, 4, block_size, chosen, positions))
    assert _largest_error(auto, matrix) <= _largest_error(fake_quantize_blockwise(matrix, 4, block_size), matrix)
    assert auto[5, 9] == 2.0


def _just_above(bulk: torch.Tensor, z: float, margin: float) -> torch.Tensor:
    """`bulk` with its [7, 100] set `margin` x above the z-score threshold of the result."""
    matrix = bulk.clone()
    for _ in range(20):  # the threshold moves with the value it is set from; a fixed point soon
        wide = matrix.double()
        matrix[7, 100] = float((wide.mean() + z * wide.std()) * (1 + margin))
    return matrix


def test_auto_z_never_cuts_a_large_weight_deep_but_shaves_one_just_past_a_threshold():
    torch.manual_seed(0)
    bulk = torch.randn(64, 256) * 0.02
    isolated = bulk.clone()
    isolated[7, 100] = 1.0  # 50x the bulk: clipping it at any grid threshold costs it far more than the
    for block_size in (64, bulk.numel()):  # rounding error it saves the others, so it is kept
        assert auto_z(isolated, 4, block_size) is None
    # 1 % past z = 8: clipping it there costs it 1 % and narrows the block's range by about as
    # much, which lowers the largest rounding error; any lower threshold cuts it deeper.
    shaved = _just_above(bulk, 8.0, 0.01)
    assert auto_z(shaved, 4, shaved.numel()) == 8.0
    clipped = fake_quantize_superweight_aware(shaved, 4, shaved.numel(), "auto")
    assert _largest_error(clipped, shaved) < _largest_error(fake_quantize_blockwise(shaved, 4, shaved.numel()), shaved)
    assert auto_z(_just_above(bulk, 8.0, 0.5), 4, shaved.numel()) is None  # 50 % past it: kept whole


def test_model_quantization_with_auto_z_records_each_matrix_threshold(planted):
    before = snapshot(planted)
    sw = SuperWeight(LAYER, ROW, COL)
    with quantized_weights(planted, 4, 1024, [sw], z="auto") as record:
        assert len(record.chosen_z) == len(record.names) == 4 * 7
        assert set(record.chosen_z) <= set(AUTO_Z_GRID)
        assert sum(record.to_dict()["chosen_z"].values()) == 4 * 7
        assert down_proj_matrix(planted, LAYER)[ROW, COL] == before[f"model.layers.{LAYER}.mlp.down_proj.weight"][ROW, COL]
        aware = snapshot(planted)
    with quantized_weights(planted, 4, 1024):
        naive = snapshot(planted)
    for name in record.names:  # no weight further from its original than naive RTN's worst
        assert _largest_error(aware[name], before[name]) <= _largest_error(naive[name], before[name])
    assert all(torch.equal(before[k], v) for k, v in snapshot(planted).items())


def test_parse_z():
    assert parse_z("auto") == "auto" and parse_z("9") == 9.0
    for text in ("abc", "0", "-1", "inf"):
        with pytest.raises(UsageError, match="z"):
            parse_z(text)


def test_gpt2_conv1d_blocks_follow_the_out_in_layout():
    model = tiny_model("gpt2", seed=0)
    before = snapshot(model)
    sw = SuperWeight(0, 3, 11)  # c_proj.weight is [in, out]: the weight lives at [11, 3]
    with quantized_weights(model, 4, 64, [sw], z=2.0):
        view = down_proj_matrix(model, 0)
        assert view[3, 11].item() == before["transformer.h.0.mlp.c_proj.weight"][11, 3].item()
        expected = fake_quantize_superweight_aware(before["transformer.h.0.mlp.c_proj.weight"].T, 4, 64, 2.0, [(3, 11)])
        assert torch.equal(view, expected)
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())


@pytest.mark.parametrize("model_type, layer", [("gpt_oss", 1), ("llama4_text", 1)])
def test_transposed_fused_experts_keep_the_super_weight_and_follow_the_out_in_layout(model_type, layer):
    """gpt-oss and Llama 4 store experts [expert, in, out]: the super weight (row 3, col 40 of
    expert 1) lives at down_proj[1, 40, 3]; col 40 is past the hidden size (32)."""
    model = tiny_model(model_type, seed=0)
    name = f"model.layers.{layer}.{'mlp' if model_type == 'gpt_oss' else 'feed_forward'}.experts.down_proj"
    before = snapshot(model)
    sw = SuperWeight(layer, 3, 40, expert=1)
    with quantized_weights(model, 4, 64, [sw], z=2.0):
        view = down_proj_matrix(model, layer, 1)
        assert view[3, 40].item() == before[name][1, 40, 3].item()
        expected = fake_quantize_superweight_aware(before[name][1].T, 4, 64, 2.0, [(3, 40)])
        assert torch.equal(view, expected)
        # another expert holds no super weight: its weight at the same place is quantized
        other = fake_quantize_superweight_aware(before[name][0].T, 4, 64, 2.0)
        assert torch.equal(down_proj_matrix(model, layer, 0), other)
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())


@pytest.mark.parametrize("model_type, layer", [("gpt_oss", 1), ("llama4_text", 1)])
def test_transposed_fused_gate_up_follows_the_out_in_layout_and_biases_are_left_alone(model_type, layer):
    """gate_up_proj is stored [expert, in, out] in these families too, so its blocks run along each
    output's inputs as in every other matrix; gpt-oss's per-expert biases ([expert, out], 2-D) are
    biases, which the paper's RTN leaves alone."""
    model = tiny_model(model_type, seed=0)
    experts = f"model.layers.{layer}.{'mlp' if model_type == 'gpt_oss' else 'feed_forward'}.experts"
    before = snapshot(model)
    with quantized_weights(model, 4, 64) as record:
        after = snapshot(model)
    for e in range(before[f"{experts}.gate_up_proj"].shape[0]):
        expected = fake_quantize_blockwise(before[f"{experts}.gate_up_proj"][e].T, 4, 64).T
        assert torch.equal(after[f"{experts}.gate_up_proj"][e], expected)
    biases = [name for name in before if name.startswith("model.layers.") and name.endswith("bias")]
    assert (len(biases) > 0) == (model_type == "gpt_oss")
    assert all(torch.equal(after[name], before[name]) for name in biases)
    assert not any(name.endswith("bias") for name in record.names)


def test_default_block_sizes():
    model = tiny_model("llama")  # largest matrix 32 x 64 = 2048 weights
    assert default_block_sizes(model) == [64, 256, 1024]
    assert default_block_sizes(model, factor=2) == [64, 128, 256, 512, 1024]
    with pytest.raises(UsageError, match="factor"):
        default_block_sizes(model, factor=1)


# ----------------------------------------------------------------------------- activations


def test_activation_tensor_quantizers():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [100.0, 0.5, 1.5, 2.5]])
    mask = super_activation_mask(x[None], [0])[0]
    assert mask.tolist() == [[False] * 4, [True, False, False, False]]
    out = fake_quantize_activation_aware(x, bits=2, mask=mask)
    assert out[1, 0].item() == 100.0
    # without the spike the range is [0, 3]: scale 1, so values land on integers
    assert out[0].tolist() == [0.0, 1.0, 2.0, 3.0]
    naive = fake_quantize_per_sequence(x, bits=2)  # scale 100 / 3: everything small becomes 0
    assert naive[0].tolist() == [0.0, 0.0, 0.0, 0.0]
    # the median replaces the spike while quantizing: (range [0, 3] either way here)
    assert torch.equal(fake_quantize_activation_aware(x, 2, torch.zeros_like(mask)), naive)


def _capture_down_proj_input(model, layer):
    """(pre-hook seeing the original input, forward hook seeing the input after later pre-hooks)."""
    seen: dict[str, torch.Tensor] = {}
    module = down_proj_module(model, layer)
    first = module.register_forward_pre_hook(lambda m, args: seen.__setitem__("original", args[0].clone()))
    last = module.register_forward_hook(lambda m, args, out: seen.__setitem__("used", args[0].clone()))
    return seen, (first, last)


def test_quantized_activations_keeps_the_super_activation_exact(planted):
    counts = [len(down_proj_module(planted, i)._forward_pre_hooks) for i in range(4)]
    seen, handles = _capture_down_proj_input(planted, LAYER)
    try:
        with torch.inference_mode(), quantized_activations(planted, bits=4, super_weights=[SW]) as stats:
            planted(PROBE_IDS)
        x, used = seen["original"], seen["used"]
        spike = super_activation_mask(x, [COL])
        assert x[..., COL].abs().min() > 50  # the planted spike is at every token
        assert int(spike.sum()) == PROBE_IDS.shape[1] == stats.held_out and stats.calls == 4
        assert torch.equal(used[spike], x[spike])
        rest = ~spike
        assert not torch.equal(used[rest], x[rest])
        held = torch.where(spike, x.median(), x)
        scale = (held.max() - held.min()) / 15
        assert bool(((used - x)[rest].abs() <= _tol(scale / 2)).all())

        with torch.inference_mode(), quantized_activations(planted, bits=4):  # naive: the spike sets the range
            planted(PROBE_IDS)
        naive = seen["used"]
        assert (naive - x)[rest].abs().max() > 5 * (used - x)[rest].abs().max()
    finally:
        for h in handles:
            h.remove()
    assert [len(down_proj_module(planted, i)._forward_pre_hooks) for i in range(4)] == counts

    with pytest.raises(RuntimeError, match="boom"):
        with quantized_activations(planted, 8, [SW]):
            raise RuntimeError("boom")
    assert [len(down_proj_module(planted, i)._forward_pre_hooks) for i in range(4)] == counts
    with pytest.raises(UsageError, match="activation bits"):
        with quantized_activations(planted, 9):
            pass


def test_activation_ranges_are_per_sequence_and_leave_padding_out():
    x = torch.tensor([[[0.0, 1.0], [2.0, 3.0], [-50.0, 90.0]],  # its last position is padding
                      [[0.0, 10.0], [20.0, 30.0], [15.0, 6.0]]])
    tokens = torch.tensor([[True, True, False], [True, True, True]])
    out = fake_quantize_per_sequence(x, bits=2, tokens=tokens)
    assert out[0, :2].tolist() == [[0.0, 1.0], [2.0, 3.0]]  # range [0, 3]: neither the pads' nor row 1's
    assert out[1].tolist() == [[0.0, 10.0], [20.0, 30.0], [20.0, 10.0]]  # range [0, 30], scale 10
    assert torch.equal(fake_quantize_per_sequence(x[1], 2), out[1])  # one sequence: as alone
    x[0, 2, 0] = 1000.0  # the largest |x[..., 0]| of row 0, but padding: not the super activation
    mask = super_activation_mask(x, [0], tokens=tokens)
    assert mask[..., 0].tolist() == [[False, True, False], [False, True, True]]
    aware = fake_quantize_activation_aware(x, 2, mask, tokens)
    assert aware[0, 1, 0] == 2.0 and aware[1, 1, 0] == 20.0 and aware[1, 2, 0] == 15.0  # held out: exact
    # row 1's spikes replaced by its median, 10 (of 0, 6, 10, 15, 20, 30), while quantizing: range [0, 30]
    assert aware[1, 0].tolist() == [0.0, 10.0] and aware[1, 2, 1] == 10.0
    assert torch.equal(aware[1], fake_quantize_activation_aware(x[1], 2, mask[1]))


def _quantized_inputs(model, run) -> list[torch.Tensor]:
    """Every down projection's input as quantized in `run()` (under quantized_activations)."""
    seen: dict[int, torch.Tensor] = {}
    handles = [down_proj_module(model, i).register_forward_hook(lambda m, args, out, i=i: seen.update({i: args[0].clone()}))
               for i in range(len(decoder_layers(model)))]
    try:
        with torch.inference_mode():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return [seen[i] for i in sorted(seen)]


@pytest.mark.parametrize("super_weights", [None, [SW]], ids=["naive", "aware"])
def test_padding_is_left_out_of_the_quantization_range(planted, super_weights):
    """A sequence padded in a batch (with an attention mask, or marked as the scorer marks it) is
    quantized as it is alone: the pads' activations never set its range."""
    alone_ids = PROBE_IDS[:, :6]
    pads = torch.arange(100, 110)  # whatever the pads hold: these tokens widen the range where they count
    batch = torch.stack([torch.cat([alone_ids[0], pads]), torch.arange(16) * 7 + 3])
    tokens = torch.ones(batch.shape, dtype=torch.bool)
    tokens[0, 6:] = False

    def same(padded: list[torch.Tensor], alone: list[torch.Tensor]) -> list[bool]:
        return [torch.allclose(p[0, :6], a[0], rtol=1e-5, atol=1e-5) for p, a in zip(padded, alone)]

    with quantized_activations(planted, 4, super_weights):
        alone = _quantized_inputs(planted, lambda: planted(alone_ids))
        masked = _quantized_inputs(planted, lambda: planted(batch, attention_mask=tokens.long()))
        with padding.marked(planted, tokens):
            marked = _quantized_inputs(planted, lambda: planted(batch))
        unmarked = _quantized_inputs(planted, lambda: planted(batch))
    assert all(same(masked, alone)) and all(same(marked, alone))
    assert not all(same(unmarked, alone))  # the pads count where nothing says which they are


def test_a_documents_score_does_not_depend_on_its_batch():
    """`sw quantize --activations` scores each request alike at batch size 1 and 4: its sequence has
    its own range, whatever else and however much padding share its batch."""
    model = tiny_model("llama", seed=3, initializer_range=0.3)  # weights large enough for INT4 to show
    plant_super_weight(model, LAYER, ROW, COL)
    lengths = [12, 5, 9, 3, 7, 11, 4, 8]
    requests = [Request(tuple((3 + 11 * i + 5 * j) % 120 + 3 for j in range(n)), 2) for i, n in enumerate(lengths)]
    groups = [Group([i]) for i in range(len(requests))]
    for super_weights in (None, [SW]):
        with quantized_activations(model, 4, super_weights):
            scores = {size: [s.logprob for s in Scorer(model, size).score(requests, groups)] for size in (1, 4)}
        assert scores[1] == pytest.approx(scores[4], rel=1e-5, abs=1e-5), super_weights


def test_choices_that_share_a_context_are_quantized_each_as_its_own_sequence():
    """lm-eval runs each choice with its context as one sequence; packed in one row, the choices
    would share one activation range. Under activation quantization each is scored alone; the
    packing comes back after the block."""
    model = tiny_model("llama", seed=3, initializer_range=0.3)
    plant_super_weight(model, LAYER, ROW, COL)
    context = tuple((5 + 7 * j) % 120 + 3 for j in range(10))
    choices = [(40, 41, 42), (90, 17), (118, 119, 3, 4)]  # the last reaches far: it widens a shared range
    requests = [Request(context + c, len(c)) for c in choices]
    scorer = Scorer(model, 4)
    scorer.score(requests[:1], [Group([0])])  # checks the shortcuts on this model
    assert scorer.share_prefix  # packing reproduces the plain forward here: the test is about it
    for super_weights in (None, [SW]):
        with quantized_activations(model, 4, super_weights):
            assert not scorer.packs_prefixes
            packed = [s.logprob for s in scorer.score(requests, [Group([0, 1, 2])])]
            alone = [scorer.score([r], [Group([0])])[0].logprob for r in requests]
        assert packed == pytest.approx(alone, rel=1e-5, abs=1e-5), super_weights
    assert scorer.packs_prefixes


# ----------------------------------------------------------------------------- drivers


WORDS = "the of and to in a is was on for as with by he it at from his an were are which".split()


@pytest.fixture(scope="module")
def wikitext_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    (path / "wikitext").mkdir()
    pages = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(40)) for i in range(2)]
    (path / "wikitext" / "wikitext-2-raw-v1_test_documents.jsonl").write_text(
        "".join(json.dumps({"page": p}) + "\n" for p in pages))
    return path


def test_sweeps_on_a_tiny_model(planted, wikitext_dir, tmp_path):
    tokenizer = build_word_tokenizer(WORDS)
    before = snapshot(planted)
    options = dict(data_dir=str(wikitext_dir), max_length=16)
    rows = weight_quantization_sweep(planted, tokenizer, [SW], [64, 1024], bits=3, z=3.0, baseline=True, **options)
    assert [r["block_size"] for r in rows] == [64, 1024]
    for r in rows:
        assert r["bits"] == 3 and r["z"] == 3.0 and r["clipped"] > 0
        for key in ("naive_perplexity", "aware_perplexity", "baseline_perplexity"):
            assert math.isfinite(r[key]) and r[key] > 1
        assert r["naive"]["wikitext"]["word_perplexity"] == r["naive_perplexity"]
    assert rows[0]["baseline_perplexity"] == rows[1]["baseline_perplexity"]
    assert rows[0]["naive_perplexity"] != rows[1]["naive_perplexity"]
    assert all(torch.equal(before[k], v) for k, v in snapshot(planted).items())

    png = plot_sweep(rows, tmp_path / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    act = activation_quantization_compare(planted, tokenizer, [SW], bits=[4], **options)
    assert act[0]["bits"] == 4 and act[0]["held_out"] > 0
    assert math.isfinite(act[0]["naive_perplexity"]) and math.isfinite(act[0]["aware_perplexity"])
    assert all(len(down_proj_module(planted, i)._forward_pre_hooks) == 0 for i in range(len(decoder_layers(planted))))

    with pytest.raises(UsageError, match="no block sizes given"):
        weight_quantization_sweep(planted, tokenizer, [SW], [], **options)
    with pytest.raises(UsageError, match="block size"):
        weight_quantization_sweep(planted, tokenizer, [SW], [64, 0], **options)
    with pytest.raises(UsageError, match="z-score"):
        weight_quantization_sweep(planted, tokenizer, [SW], [64], z=-1, **options)
    with pytest.raises(UsageError, match="nothing to plot"):
        plot_sweep([], tmp_path / "empty.png")


def test_sweeps_report_progress_for_every_stage(planted, wikitext_dir):
    tokenizer = build_word_tokenizer(WORDS)
    options = dict(data_dir=str(wikitext_dir), max_length=16)
    seen: dict[str, list[tuple[int, int]]] = {}

    def progress(stage: str, done: int, total: int) -> None:
        seen.setdefault(stage, []).append((done, total))

    weight_quantization_sweep(planted, tokenizer, [SW], [64, 1024], bits=3, z=3.0, baseline=True, progress=progress,
                              **options)
    matrices = len(weight_targets(planted))
    expected = ["unquantized: wikitext"]
    for size in (64, 1024):
        for scheme in ("naive", "aware (z=3)"):
            expected += [f"INT3 {scheme}, block {size}: quantizing", f"INT3 {scheme}, block {size}: wikitext"]
    assert list(seen) == expected
    for stage, calls in seen.items():
        done, total = calls[-1]
        assert done == total > 0, stage  # every stage runs to its end
        if stage.endswith("quantizing"):
            assert total == matrices and [d for d, _ in calls] == list(range(1, matrices + 1))

    seen.clear()
    activation_quantization_compare(planted, tokenizer, [SW], bits=[4], progress=progress, **options)
    assert list(seen) == ["A4 naive: wikitext", "A4 super activation held out: wikitext"]


def test_aware_worse_than_naive_is_flagged_and_worded():
    """`sw quantize --z 9` made the aware row worse than naive without a word (issue 21, point 8)."""
    from superweight.measure.quantized import _comparison_row, quantization_warnings

    better = _comparison_row({"wikitext": {"word_perplexity": 119.8}}, {"wikitext": {"word_perplexity": 110.0}},
                             None, bits=4, block_size=64, z=9.0)
    worse = _comparison_row({"wikitext": {"word_perplexity": 119.8}, "piqa": {"acc": 0.6, "acc_norm": 0.6}},
                            {"wikitext": {"word_perplexity": 158.9}, "piqa": {"acc": 0.5, "acc_norm": 0.7}},
                            None, bits=4, block_size=1024, z=9.0)
    assert better["aware_worse"] == [] and worse["aware_worse"] == ["wikitext word_perplexity", "piqa acc"]
    assert quantization_warnings([better]) == []
    [line] = quantization_warnings([better, worse])
    assert line.startswith("INT4 block 1024: super-weight aware (z=9) is worse than naive on wikitext word_perplexity")
    assert "158.9 vs 119.8" in line and "--z auto" in line and "\n" not in line


def test_the_sweep_rows_carry_whether_aware_is_worse(planted, wikitext_dir):
    from superweight.measure.quantized import aware_worse_than_naive

    rows = weight_quantization_sweep(planted, build_word_tokenizer(WORDS), [SW], [64], bits=3, z=3.0,
                                     data_dir=str(wikitext_dir), max_length=16)
    assert rows[0]["aware_worse"] == aware_worse_than_naive(rows[0])
    assert (rows[0]["aware_perplexity"] > rows[0]["naive_perplexity"]) == bool(rows[0]["aware_worse"])
