"""Layer-streaming detection (`sw detect --stream`) gives what a full load gives."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from superweight.cli import app
from superweight.find.detect import DEFAULT_PROMPT, Detection, detect, encode_prompt
from superweight.errors import ModelLoadError, UnsupportedArchitectureError
from superweight.find.hooks import capture_layer_stats
from superweight.model.load import load_model
from superweight.find.stream import LayerStream, detect_streamed, open_checkpoint

from conftest import PROMPT_WORDS, build_word_tokenizer
from synthetic import PROMPT_IDS, one_thread_per_module, plant_super_weight, tiny_config, tiny_model  # noqa: F401

PLANTED = [((1, 7, 13, None), 0), ((1, 7, 40, None), 1)]  # the second is seen once the first is zeroed


def _save_planted(path, model_type: str, max_shard_size: str | None = None):
    """A tiny model of `model_type` with two super weights in one row, saved as a model directory."""
    layer_types = getattr(tiny_config(model_type), "layer_types", None)  # must match the 4 layers to save
    model = tiny_model(model_type, **({"layer_types": layer_types[:4]} if layer_types else {}))
    plant_super_weight(model, 1, 7, 13, input_spike=100.0, weight=10.0)
    plant_super_weight(model, 1, 7, 40, input_spike=30.0, weight=10.0)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    build_word_tokenizer(PROMPT_WORDS).save_pretrained(path)
    return path


def assert_same_detection(streamed: Detection, full: Detection) -> None:
    assert [(w.key, w.iteration) for w in streamed.super_weights] == [(w.key, w.iteration) for w in full.super_weights]
    assert streamed.candidate_layers == full.candidate_layers
    assert streamed.cancelling_layers == full.cancelling_layers
    assert len(streamed.iterations) == len(full.iterations)
    for streamed_pass, full_pass in zip(streamed.iterations, full.iterations):
        for s, f in zip(streamed_pass, full_pass, strict=True):
            for name, value in dataclasses.asdict(f).items():
                if isinstance(value, float):
                    assert getattr(s, name) == pytest.approx(value, rel=1e-5, abs=1e-6), (s.layer, name)
                else:
                    assert getattr(s, name) == value, (s.layer, name)


@pytest.mark.parametrize("model_type,max_shard_size", [
    ("llama", "40KB"),  # sharded: a layer's tensors spread over several files
    ("llama", None),  # one model.safetensors
    ("gemma2", "40KB"),  # post-feed-forward norm, sliding-window layers, scaled embeddings
    ("gpt2", "40KB"),  # Conv1D (transposed) weights, learned position embeddings
])
def test_streamed_equals_full_load(tmp_path, model_type, max_shard_size):
    path = _save_planted(tmp_path / model_type, model_type, max_shard_size)
    shards = list(path.glob("*.safetensors"))
    assert (len(shards) > 1) == (max_shard_size is not None)
    full = detect(load_model(str(path), device="cpu").model, PROMPT_IDS)

    streamed = detect_streamed(open_checkpoint(str(path)), PROMPT_IDS)

    assert [(w.key, w.iteration) for w in streamed.super_weights] == PLANTED
    assert streamed.super_weights[0].value == 10.0
    assert_same_detection(streamed, full)


def test_a_pad_id_beyond_the_prompts_rows_streams(tmp_path):
    # Phi-3-mini's pad id is 32000: the embedding keeps only the prompt's rows when streaming.
    model = tiny_model("llama", pad_token_id=100)
    plant_super_weight(model, 1, 7, 13, input_spike=100.0, weight=10.0)
    path = tmp_path / "padded"
    model.save_pretrained(path)
    build_word_tokenizer(PROMPT_WORDS).save_pretrained(path)
    full = detect(load_model(str(path), device="cpu").model, PROMPT_IDS)
    streamed = detect_streamed(open_checkpoint(str(path)), PROMPT_IDS)
    assert [w.key for w in streamed.super_weights][:1] == [(1, 7, 13, None)]
    assert_same_detection(streamed, full)


def test_one_iteration_sees_only_the_first(tmp_path):
    path = _save_planted(tmp_path / "llama", "llama")
    once = detect_streamed(open_checkpoint(str(path)), PROMPT_IDS, iterations=1)
    assert [w.key for w in once.super_weights] == [PLANTED[0][0]]


def test_one_layer_in_memory_at_a_time(tmp_path):
    stream = LayerStream(open_checkpoint(str(_save_planted(tmp_path / "llama", "llama", "40KB"))))
    loaded_while_running = []

    def count_loaded(module, args, output):
        loaded_while_running.append(sum(not layer.mlp.down_proj.weight.is_meta for layer in stream.layers))

    handles = [layer.mlp.down_proj.register_forward_hook(count_loaded) for layer in stream.layers]
    try:
        stats = stream.one_pass(PROMPT_IDS)
    finally:
        for handle in handles:
            handle.remove()
    assert loaded_while_running == [1, 1, 1, 1]
    assert all(p.is_meta for layer in stream.layers for p in layer.parameters())
    assert stats[1].row == 7 and stats[1].col == 13
    assert stream.model.get_input_embeddings().weight.device.type == "cpu"  # read once, kept


def test_hub_id_streams_from_its_snapshot_in_the_cache(tmp_path):
    """A hub id is read from its snapshot folder (offline here: a hand-made cache entry)."""
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny"
    _save_planted(repo / "snapshots" / commit, "llama", "40KB")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    checkpoint = open_checkpoint("someone/tiny", cache_dir=str(tmp_path / "hub"))

    assert checkpoint.source.kind == "hub" and checkpoint.directory == repo / "snapshots" / commit
    assert [(w.key, w.iteration) for w in detect_streamed(checkpoint, PROMPT_IDS).super_weights] == PLANTED
    with pytest.raises(ModelLoadError, match="someone/other"):
        open_checkpoint("someone/other", cache_dir=str(tmp_path / "hub"))


def test_pickle_only_checkpoint_is_refused_with_a_conversion_hint(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "pickled"
    model.config.save_pretrained(path)
    build_word_tokenizer(PROMPT_WORDS).save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")

    with pytest.raises(ModelLoadError, match="only PyTorch pickles") as error:
        open_checkpoint(str(path))
    assert "save_pretrained" in str(error.value) and "\n" not in str(error.value)
    result = CliRunner().invoke(app, ["detect", str(path), "--stream", "-q", "--out", str(tmp_path / "c.yaml")])
    assert result.exit_code != 0
    assert result.output.strip().startswith("error: --stream reads safetensors")
    assert len(result.output.strip().splitlines()) == 1


def test_mixture_of_experts_is_refused(tmp_path):
    path = tmp_path / "mixtral"
    tiny_model("mixtral").save_pretrained(path)
    build_word_tokenizer(PROMPT_WORDS).save_pretrained(path)
    with pytest.raises(UnsupportedArchitectureError, match="without --stream"):
        detect_streamed(open_checkpoint(str(path)), PROMPT_IDS)


def test_cli_stream_json_matches_full_load(tmp_path):
    path = _save_planted(tmp_path / "model", "llama", "40KB")
    runner = CliRunner()

    def run(*extra):
        out = tmp_path / f"coords{len(extra)}.json"
        result = runner.invoke(app, ["detect", str(path), "-q", "--json", "--out", str(out), "--device", "cpu",
                                     *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.output), json.loads(out.read_text())

    streamed, streamed_file = run("--stream")
    full, _ = run()
    assert streamed["super_weights"] == full["super_weights"]
    assert [(w["layer"], w["row"], w["col"]) for w in streamed_file["super_weights"]] == [(1, 7, 13), (1, 7, 40)]
    assert streamed["model"]["model_type"] == "llama" and streamed["model"]["dtype"] == "float32"


def test_cli_stream_with_device_map_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(app, ["detect", str(tmp_path), "--stream", "--device-map", "auto", "-q"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: --stream") and "--device-map" in result.output


@pytest.mark.parametrize("stream", [True, False])
def test_cli_prompt_longer_than_a_gpt2_context_is_one_line_with_or_without_stream(tmp_path, stream):
    """Learned positions (64 here) end where the context does: a longer --prompt is refused before
    a pass, in one line (before: an IndexError from the position embedding)."""
    path = _save_planted(tmp_path / "gpt2", "gpt2")
    prompt = " ".join(PROMPT_WORDS * 10)  # 130 tokens
    result = CliRunner().invoke(app, ["detect", str(path), "-q", "--device", "cpu", "--prompt", prompt,
                                      "--out", str(tmp_path / "c.yaml"), *(["--stream"] if stream else [])])
    assert result.exit_code != 0 and not isinstance(result.exception, IndexError)
    assert result.output.strip() == "error: the prompt is 130 tokens; this model reads at most 64; give a shorter --prompt"
    assert not (tmp_path / "c.yaml").exists()


def test_smollm2_streamed_equals_full_load(smollm2):
    input_ids = encode_prompt(smollm2.tokenizer, DEFAULT_PROMPT)
    full = detect(smollm2.model, input_ids)

    checkpoint = open_checkpoint("smollm2-135m")  # the GGUF, streamed from its safetensors cache
    streamed = detect_streamed(checkpoint, input_ids, device="cpu")

    assert checkpoint.from_cache and checkpoint.dtype == "float32"
    assert [w.key for w in streamed.super_weights] == [w.key for w in full.super_weights]
    assert {(11, 507, 1229, None), (11, 507, 1487, None)} <= {w.key for w in streamed.super_weights}
    assert_same_detection(streamed, full)


def test_only_the_prompts_embedding_rows_are_read(tmp_path):
    path = _save_planted(tmp_path / "llama", "llama")
    prompt = torch.tensor([[5, 9, 5, 70, 9, 3]])
    stream = LayerStream(open_checkpoint(str(path)), token_ids=prompt)
    embedding = stream.model.get_input_embeddings().weight
    full = load_model(str(path), device="cpu").model
    assert embedding.shape[0] == 4  # ids 3, 5, 9, 70
    assert torch.equal(embedding, full.get_input_embeddings().weight[[3, 5, 9, 70]])
    streamed_stats = stream.one_pass(prompt)
    with capture_layer_stats(full) as full_stats, torch.inference_mode():
        full(input_ids=prompt, use_cache=False)
    assert [s.spike for s in streamed_stats] == pytest.approx([s.spike for s in full_stats], rel=1e-5)
    with pytest.raises(ValueError):
        stream.one_pass(torch.tensor([[5, 6]]))  # 6's row was never read
