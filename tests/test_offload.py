"""Models split by accelerate (`--device-map`, `--max-memory`) with layers offloaded to disk.

An offloaded layer keeps its parameters on the meta device; accelerate's hook reads the real
values from their file at every forward pass (placement.py). Detection, ablation of a
disk-offloaded layer, undo, activation restoration and evaluation must agree with a plain load.
Here only "cpu" and "disk" exist: the "two devices" of a CPU-only split. On a machine with CUDA,
the last test splits a model over the GPU, the CPU and the disk.
"""

from __future__ import annotations

import gc

import pytest
import torch

from superweight.edit import ablate, restore, save
from superweight.model.adapters import decoder_layers, down_proj_matrix, down_proj_module
from superweight.coords import SuperWeight
from superweight.find.detect import detect
from superweight.errors import OutputPathError
from superweight.measure.evaluate import evaluate
from superweight.measure.scoring import Scorer
from superweight.measure.configurations import Configuration, run_configurations
from superweight.model.load import load_model
from superweight.model.placement import execution_device

from conftest import DATA_DIR, PROMPT_WORDS, build_word_tokenizer
from synthetic import PROMPT_IDS, one_thread_per_module, plant_super_weight, tiny_model  # noqa: F401

PLANTED = SuperWeight(1, 7, 13)
# The embeddings, layers 1 (the planted one) and 2, and the LM head on disk; the rest in memory.
SPLIT_MAP = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
             "model.layers.1": "disk", "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu",
             "lm_head": "disk"}
# A layer of the tiny model is 37 KB (float32): the embeddings and layer 0 fit, the rest goes to disk.
TIGHT_BUDGET = {"cpu": "100KB"}
PLACEMENTS = {"device map": dict(device_map=SPLIT_MAP), "max memory": dict(max_memory=TIGHT_BUDGET)}
EVAL_OPTIONS = dict(data_dir=str(DATA_DIR), limit=1, max_length=32)
PERPLEXITY_RTOL = 1e-4


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    """The tiny Llama of synthetic.py with a super weight planted at PLANTED, saved as safetensors."""
    model = tiny_model("llama")
    plant_super_weight(model, PLANTED.layer, PLANTED.row, PLANTED.col)
    path = tmp_path_factory.mktemp("planted-llama")
    model.save_pretrained(path)
    build_word_tokenizer(PROMPT_WORDS).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Offload folders go under this test's own cache, never ~/.cache."""
    monkeypatch.setenv("SUPERWEIGHT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def plain(planted_dir):
    return load_model(str(planted_dir), device="cpu")


@pytest.fixture(params=sorted(PLACEMENTS))
def split(request, planted_dir):
    return load_model(str(planted_dir), **PLACEMENTS[request.param])


def _logits(model, ids=PROMPT_IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.float()


def _loader(model):
    """accelerate's OffloadedWeightsLoader behind the planted layer's down projection."""
    return down_proj_module(model, PLANTED.layer)._hf_hook.weights_map.dataset


def _in_memory(model) -> set[str]:
    return set(_loader(model).state_dict)


def test_the_planted_layer_is_offloaded_to_disk(split):
    model = split.model
    placement = model.hf_device_map
    assert "disk" in placement.values() and "cpu" in placement.values()
    assert down_proj_module(model, PLANTED.layer).weight.is_meta
    assert not down_proj_module(model, 0).weight.is_meta
    assert _in_memory(model) == set()  # everything offloaded is read from the checkpoint file
    assert execution_device(model.get_input_embeddings()) == torch.device("cpu")
    assert execution_device(model.get_output_embeddings()) == torch.device("cpu")  # on disk, runs on CPU


def test_a_nan_in_a_disk_offloaded_down_projection_is_refused_at_load(planted_dir, tmp_path):
    """Read where accelerate keeps it: the in-memory check sees a meta tensor there."""
    import shutil

    from safetensors.torch import load_file, save_file
    from superweight.errors import ModelLoadError

    broken = tmp_path / "nan"
    shutil.copytree(planted_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][2, 2] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"^model\.layers\.1\.mlp\.down_proj\.weight holds 1 NaN"):
        load_model(str(broken), device_map=SPLIT_MAP)


def test_split_model_computes_what_the_plain_one_does(split, plain):
    assert torch.equal(_logits(split.model), _logits(plain.model))


def test_scoring_shortcuts_stay_on(split):
    """They are checked against a plain forward pass; an offloaded head or embedding must not
    make that check fail (tensors sent to the meta device) and silently switch them off."""
    scorer = Scorer(split.model)
    scorer._check_shortcuts(list(PROMPT_IDS[0].tolist()))
    assert scorer.device == torch.device("cpu") and scorer.split_head and scorer.share_prefix


def test_detect_finds_the_same_coordinates(split, plain):
    found = detect(split.model, PROMPT_IDS)
    expected = detect(plain.model, PROMPT_IDS)
    assert [w.key for w in found.super_weights] == [w.key for w in expected.super_weights] == [PLANTED.key]
    assert [w.value for w in found.super_weights] == [w.value for w in expected.super_weights]
    assert [s.spike for s in found.iterations[-1]] == pytest.approx([s.spike for s in expected.iterations[-1]])
    assert torch.equal(_logits(split.model), _logits(plain.model))  # the zeroing in between was undone
    # Reading every layer's matrix to locate spikes keeps none in memory: only the zeroed one was.
    assert _in_memory(split.model) <= {"model.layers.1.mlp.down_proj.weight"}


def test_ablating_a_disk_offloaded_weight_changes_the_output_and_undo_restores_it(split, plain):
    model = split.model
    before = _logits(model)
    weights_before = down_proj_matrix(model, PLANTED.layer, writable=False).clone()
    record = ablate.apply(model, [PLANTED])
    try:
        assert float(down_proj_matrix(model, PLANTED.layer, writable=False)[PLANTED.row, PLANTED.col]) == 0.0
        ablated = _logits(model)
        assert (ablated - before).abs().max() > 0.1  # the super weight really was removed
        with ablate.ablated(plain.model, [PLANTED]):
            assert torch.allclose(ablated, _logits(plain.model), atol=1e-5)
    finally:
        ablate.undo(model, record)
    assert torch.equal(_logits(model), before)
    assert torch.equal(down_proj_matrix(model, PLANTED.layer, writable=False), weights_before)
    assert _in_memory(model) == set()  # unchanged again, the matrix is read from disk once more


def test_an_edit_that_is_not_undone_stays_in_memory(split):
    model = split.model
    outer = ablate.apply(model, [PLANTED])
    inner = ablate.apply(model, [SuperWeight(PLANTED.layer, 0, 0)])
    ablate.undo(model, inner)  # the outer ablation still holds: the edited matrix must not be dropped
    assert float(down_proj_matrix(model, PLANTED.layer, writable=False)[PLANTED.row, PLANTED.col]) == 0.0
    ablate.undo(model, outer)
    assert _in_memory(model) == set()


def test_saving_an_ablated_split_model_writes_every_weight(split, plain, tmp_path):
    from safetensors.torch import load_file

    with ablate.ablated(split.model, [PLANTED]) as record:
        save.save_ablated(split, record, tmp_path / "out")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    expected = {name: tensor.clone() for name, tensor in plain.model.state_dict().items()}
    expected["model.layers.1.mlp.down_proj.weight"][PLANTED.row, PLANTED.col] = 0
    assert sorted(saved) == sorted(expected)
    assert [name for name in saved if not torch.equal(saved[name], expected[name])] == []


def test_restored_activation_works_on_a_disk_offloaded_layer(split, plain):
    model = split.model
    original = _logits(model)
    with ablate.ablated(model, [PLANTED]) as record:
        zeroed = _logits(model)
        with restore.restored_activation(model, record):
            restored = _logits(model)
        with ablate.ablated(plain.model, [PLANTED]) as plain_record, \
                restore.restored_activation(plain.model, plain_record):
            assert torch.allclose(restored, _logits(plain.model), atol=1e-5)
    assert (zeroed - original).abs().max() > 0.1
    torch.testing.assert_close(restored, original, rtol=1e-4, atol=1e-4)


def test_evaluation_gives_the_plain_perplexity(split, plain):
    configurations = [Configuration("original"), Configuration("zeroed", (PLANTED,)),
                      Configuration("restored", (PLANTED,), restore_activation=True)]
    got = run_configurations(split.model, split.tokenizer, configurations, ["wikitext"], **EVAL_OPTIONS)
    expected = run_configurations(plain.model, plain.tokenizer, configurations, ["wikitext"], **EVAL_OPTIONS)
    for name in got:
        perplexity = got[name]["results"]["wikitext"]["word_perplexity"]
        assert perplexity == pytest.approx(expected[name]["results"]["wikitext"]["word_perplexity"], rel=PERPLEXITY_RTOL)
    assert got["zeroed"]["results"]["wikitext"]["word_perplexity"] != pytest.approx(
        got["original"]["results"]["wikitext"]["word_perplexity"], rel=1e-3)
    assert _in_memory(split.model) == set()


def test_hooks_see_real_tensors_on_the_execution_device(split):
    """Forward hooks on an offloaded down projection run after accelerate put its weight back on
    the meta device; what they receive (and what they read through down_proj_matrix) must be real."""
    model = split.model
    seen = []

    def hook(module, args, output):
        weight = down_proj_matrix(model, PLANTED.layer, writable=False)
        seen.append((args[0].device, output.device, module.weight.device, weight.device))

    handle = down_proj_module(model, PLANTED.layer).register_forward_hook(hook)
    try:
        _logits(model)
    finally:
        handle.remove()
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert seen == [(cpu, cpu, meta, cpu)]


def test_offload_folder_is_fresh_outside_the_model_and_removed_with_it(tmp_path, cache, monkeypatch):
    """A pickle checkpoint makes accelerate write the offloaded tensors into the offload folder
    (a safetensors file each, which it then reads at every forward pass)."""
    model = tiny_model("llama")
    plant_super_weight(model, PLANTED.layer, PLANTED.row, PLANTED.col)
    pickles = tmp_path / "pickled"
    model.config.save_pretrained(pickles)
    torch.save(model.state_dict(), pickles / "pytorch_model.bin")  # save_pretrained writes safetensors only
    build_word_tokenizer(PROMPT_WORDS).save_pretrained(pickles)
    model_files = sorted(p.name for p in pickles.iterdir())
    first = load_model(str(pickles), device_map=SPLIT_MAP)
    second = load_model(str(pickles), device_map=SPLIT_MAP)
    folders = sorted((cache / "offload").iterdir())
    assert len(folders) == 2 and all(any(f.glob("*.safetensors")) for f in folders)  # one of its own per load
    assert sorted(p.name for p in pickles.iterdir()) == model_files
    with ablate.ablated(first.model, [PLANTED]):
        assert not torch.equal(_logits(first.model), _logits(second.model))
    assert torch.equal(_logits(first.model), _logits(second.model))
    del first, second
    gc.collect()
    assert list((cache / "offload").iterdir()) == []
    monkeypatch.setenv("SUPERWEIGHT_CACHE", str(pickles / "cache"))
    with pytest.raises(OutputPathError, match="offload"):
        load_model(str(pickles), device_map=SPLIT_MAP)


def test_a_safetensors_checkpoint_leaves_no_offload_folder(planted_dir, cache):
    loaded = load_model(str(planted_dir), max_memory=TIGHT_BUDGET)
    assert down_proj_module(loaded.model, PLANTED.layer).weight.is_meta
    assert list((cache / "offload").iterdir()) == []  # accelerate reads the checkpoint in place


@pytest.mark.parametrize("option, value, says", [
    ("--device-map", "disk-only-nonsense", "bad --device-map 'disk-only-nonsense'"),
    ("--device-map", '{"": "tpu"}', 'device "tpu"'),
    ("--device-map", '{"model": "cpu", "lm_head": 99}', "CUDA device 99"),
    ("--max-memory", "cpu=100KB,disk", "'disk'"),  # ("--max-memory", "0=lots"): tests/test_model.py
])
def test_cli_bad_placement_is_a_one_line_error(planted_dir, tmp_path, cache, option, value, says):
    from test_cli import assert_one_line_error, invoke

    assert_one_line_error(invoke("detect", planted_dir, "-q", "--out", tmp_path / "c.yaml", option, value),
                          option, says)
    assert not (tmp_path / "c.yaml").exists()
    assert not (cache / "offload").exists() or list((cache / "offload").iterdir()) == []


def test_cli_detect_with_a_tight_memory_budget(planted_dir, tmp_path):
    from test_cli import invoke

    result = invoke("detect", planted_dir, "-q", "--out", tmp_path / "c.yaml", "--max-memory", "cpu=100KB")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "c.yaml").read_text()
    assert "layer: 1" in text and "row: 7" in text and "col: 13" in text


def test_cli_quantize_of_an_offloaded_model_is_refused(planted_dir, tmp_path, cache):
    from conftest import DATA_DIR
    from test_cli import assert_one_line_error, invoke

    assert_one_line_error(invoke("quantize", planted_dir, "-q", "--coord", "1,7,13", "--block-size", "64",
                                 "--data-dir", DATA_DIR, "--limit", "1", "--max-memory", "cpu=100KB"),
                          "whole model in memory", "--max-memory")


@pytest.mark.cuda
def test_gpu_cpu_disk_split(planted_dir, plain):
    """Layers on the GPU, offloaded to CPU memory (accelerate's own in-memory copies, run on the
    GPU) and to disk: the planted layer on each in turn."""
    for where in ("cpu", "disk", 0):
        device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": where,
                      "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": 0, "lm_head": "cpu"}
        split = load_model(str(planted_dir), device_map=device_map)
        model = split.model
        assert execution_device(down_proj_module(model, PLANTED.layer)) == torch.device(0)
        ids = PROMPT_IDS.to(0)
        before = _logits(model, ids)
        assert torch.allclose(before.cpu(), _logits(plain.model), atol=1e-4)
        assert [w.key for w in detect(model, PROMPT_IDS).super_weights] == [PLANTED.key]
        with ablate.ablated(model, [PLANTED]) as record:
            zeroed = _logits(model, ids)
            with restore.restored_activation(model, record):
                restored = _logits(model, ids)
        assert (zeroed - before).abs().max() > 0.1
        torch.testing.assert_close(restored, before, rtol=1e-4, atol=1e-4)
        assert torch.equal(_logits(model, ids), before)
        got = evaluate(model, split.tokenizer, ["wikitext"], **EVAL_OPTIONS)["results"]["wikitext"]
        expected = evaluate(plain.model, plain.tokenizer, ["wikitext"], **EVAL_OPTIONS)["results"]["wikitext"]
        assert got["word_perplexity"] == pytest.approx(expected["word_perplexity"], rel=PERPLEXITY_RTOL)
        assert len(decoder_layers(model)) == 4
