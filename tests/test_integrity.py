"""A damaged or incomplete checkpoint is refused in one line, never measured (issue #20, point 4).

Fast cases on copies of the tiny Llama; the same cases on real SmolLM2 files are in
test_integrity_smollm2.py.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from superweight.errors import ModelLoadError
from superweight.find.stream import LayerStream, open_checkpoint
from superweight.model.integrity import (
    MANIFEST, check_complete, grouped, manifest_problem, weight_file_problem, write_manifest,
)
from superweight.model.load import load_model

LAYER_2 = "model.layers.2."


def _copy(source: Path, target: Path, tensors=None, config_changes=None) -> Path:
    """A copy of a model directory; `tensors` (name -> tensor) replace its weights, `config_changes` its config."""
    shutil.copytree(source, target)
    if tensors is not None:
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    if config_changes:
        config = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**config, **config_changes}))
    return target


@pytest.fixture
def weights(tiny_llama_dir):
    return load_file(tiny_llama_dir / "model.safetensors")


def test_the_whole_tiny_model_and_a_tied_head_load(tiny_llama_dir, tmp_path):
    load_model(str(tiny_llama_dir), device="cpu")
    # A tied head is not stored; transformers ties it again: no error.
    tied = _copy(tiny_llama_dir, tmp_path / "tied", config_changes={"tie_word_embeddings": True})
    stored = load_file(tied / "model.safetensors")
    save_file({k: v for k, v in stored.items() if k != "lm_head.weight"}, tied / "model.safetensors",
              metadata={"format": "pt"})
    loaded = load_model(str(tied), device="cpu")
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight


def test_a_layer_missing_from_the_weights_is_refused_and_grouped(tiny_llama_dir, tmp_path, weights):
    broken = _copy(tiny_llama_dir, tmp_path / "no-layer-2", {k: v for k, v in weights.items() if not k.startswith(LAYER_2)})
    with pytest.raises(ModelLoadError) as error:
        load_model(str(broken), device="cpu")
    message = str(error.value)
    assert "\n" not in message
    assert "9 tensors the model needs are not in its weight files (model.layers.2.*)" in message
    assert str(broken) in message and "download or copy the model again" in message.lower()


def test_a_config_with_more_or_fewer_layers_than_the_weights_is_refused(tiny_llama_dir, tmp_path):
    more = _copy(tiny_llama_dir, tmp_path / "six", config_changes={"num_hidden_layers": 6})
    with pytest.raises(ModelLoadError, match=r"18 tensors the model needs .*\(model\.layers\.\{4\.\.5\}\.\*\)"):
        load_model(str(more), device="cpu")
    fewer = _copy(tiny_llama_dir, tmp_path / "three", config_changes={"num_hidden_layers": 3})
    with pytest.raises(ModelLoadError, match=r"9 in its weight files are not part of the model .*model\.layers\.3\.\*"):
        load_model(str(fewer), device="cpu")


def test_a_tensor_of_another_shape_is_refused_with_both_shapes(tiny_llama_dir, tmp_path, weights):
    weights["model.layers.1.mlp.down_proj.weight"] = torch.zeros(32, 32)
    broken = _copy(tiny_llama_dir, tmp_path / "shape", weights)
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.down_proj\.weight: \[32, 32\] stored, "
                                             r"\[32, 64\] expected"):
        load_model(str(broken), device="cpu")


def test_a_truncated_weight_file_is_named(tiny_llama_dir, tmp_path):
    broken = _copy(tiny_llama_dir, tmp_path / "truncated")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as error:
        load_model(str(broken), device="cpu")
    assert f"weight file {broken / 'model.safetensors'} is damaged (truncated: {len(data) // 2} of {len(data)} bytes)" \
        in str(error.value)
    # a header that is not JSON
    (broken / "model.safetensors").write_bytes(data[:8] + b"\xff" * (len(data) - 8))
    assert weight_file_problem(broken / "model.safetensors") == "its header is corrupt"
    with pytest.raises(ModelLoadError, match="model.safetensors is damaged"):
        load_model(str(broken), device="cpu")


def _sharded(tiny_llama_dir, target: Path) -> Path:
    """The tiny Llama saved as a sharded checkpoint (several model-0000N-of-0000M files and their index)."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny_llama_dir, target)
    (target / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(target, max_shard_size="20KB")
    return target


def test_a_truncated_or_empty_pytorch_pickle_is_named(tiny_llama_dir, tmp_path, weights):
    """A pytorch_model.bin cut short gave 'cannot load DIR: [Errno 22] Invalid argument', an empty
    one 'EOFError:'."""
    pickled = _copy(tiny_llama_dir, tmp_path / "bin")
    (pickled / "model.safetensors").unlink()
    torch.save(weights, pickled / "pytorch_model.bin")
    load_model(str(pickled), device="cpu")  # whole: loads
    data = (pickled / "pytorch_model.bin").read_bytes()
    (pickled / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match=rf"^weight file {pickled / 'pytorch_model.bin'} is damaged \(truncated: "
                                             rf"{len(data) // 3} bytes, not a complete zip archive\); download"):
        load_model(str(pickled), device="cpu")
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin is damaged \(0 bytes\); download or copy"):
        load_model(str(pickled), device="cpu")


def test_a_model_larger_than_memory_gets_the_ways_to_load_it(tiny_llama_dir, tmp_path):
    """torch's "DefaultCPUAllocator: can't allocate memory" came out as a bare RuntimeError."""
    huge = _copy(tiny_llama_dir, tmp_path / "huge", config_changes={"intermediate_size": 10**12})  # 128 TB a layer
    with pytest.raises(ModelLoadError, match=rf"^not enough memory to load {huge} \(.*can't allocate memory.*\); load "
                                             r"it in half precision \(--dtype bfloat16\), .*--device-map auto"):
        load_model(str(huge), device="cpu")


def test_a_model_that_fits_in_memory_but_not_on_its_device_gets_the_ways_to_load_it(tiny_llama_dir, monkeypatch):
    """A model read into RAM, then moved to the GPU --device names: CUDA's OutOfMemoryError there is
    the same one line, naming the device (the CPU stands in for the GPU here)."""
    import torch

    def no_room(module, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.nn.Module, "to", no_room)
    with pytest.raises(ModelLoadError, match=rf"^not enough memory to load {tiny_llama_dir} on cpu \(CUDA out of "
                                             r"memory\. Tried to allocate 2\.00 GiB\); load it in half precision"):
        load_model(str(tiny_llama_dir), device="cpu")


@pytest.mark.parametrize("stream", [False, True], ids=["load", "stream"])
def test_a_lost_shard_or_a_broken_shard_index_is_named(tiny_llama_dir, tmp_path, stream):
    open_model = (lambda path: open_checkpoint(str(path))) if stream else (lambda path: load_model(str(path), device="cpu"))
    lost = _sharded(tiny_llama_dir, tmp_path / "lost")
    shard = sorted(lost.glob("model-0000*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=rf"^weight file {shard} is missing \(the checkpoint's "
                                             r"model\.safetensors\.index\.json names it\); download or copy"):
        open_model(lost)
    index = _sharded(tiny_llama_dir, tmp_path / "index") / "model.safetensors.index.json"
    for text in ('{"weight_map": ', '{"metadata": {}}', '[]'):  # cut off; no weight_map; not an object
        index.write_text(text)
        with pytest.raises(ModelLoadError, match=rf"^{index} is corrupt \(no readable weight_map\); download"):
            open_model(index.parent)


@pytest.mark.parametrize("stream", [False, True], ids=["load", "stream"])
def test_a_missing_or_broken_tokenizer_is_named_before_the_weights_load(tiny_llama_dir, tmp_path, stream, monkeypatch):
    from transformers import AutoModelForCausalLM

    open_model = (lambda path: open_checkpoint(str(path))) if stream else (lambda path: load_model(str(path), device="cpu"))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights read"))
    missing = _copy(tiny_llama_dir, tmp_path / "missing")
    (missing / "tokenizer.json").unlink()
    broken = _copy(tiny_llama_dir, tmp_path / "broken")
    (broken / "tokenizer.json").write_text("xx")
    for directory in (missing, broken):
        with pytest.raises(ModelLoadError, match=rf"^cannot read the tokenizer of {directory} \(.+\); a model "
                                                 "folder needs its tokenizer files .*copy them from the original"):
            open_model(directory)


@pytest.mark.parametrize("stream", [False, True], ids=["load", "stream"])
def test_a_config_field_of_the_wrong_type_is_named(tiny_llama_dir, tmp_path, stream):
    """transformers validates the field with huggingface_hub's StrictDataclassError, which is no
    ValueError: it came out as 'StrictDataclassFieldValidationError: Validation error for field ...'."""
    broken = _copy(tiny_llama_dir, tmp_path / "typed", config_changes={"hidden_size": "abc"})
    with pytest.raises(ModelLoadError, match=rf"^the config\.json of {broken} does not describe a model transformers "
                                             r"can build \(.*'hidden_size'.*'abc'.*\); fix that field"):
        open_checkpoint(str(broken)) if stream else load_model(str(broken), device="cpu")


@pytest.mark.parametrize("tensor", ["mlp.down_proj", "self_attn.q_proj"])  # a q_proj NaN never reaches the CPU's output
def test_a_weight_with_nan_or_inf_is_refused_by_name_at_load(tiny_llama_dir, tmp_path, weights, tensor):
    weights[f"model.layers.3.{tensor}.weight"][5, 7] = float("nan")
    weights[f"model.layers.3.{tensor}.weight"][0, 0] = float("inf")
    broken = _copy(tiny_llama_dir, tmp_path / "nan", weights)
    with pytest.raises(ModelLoadError, match=rf"^model\.layers\.3\.{tensor.replace('.', chr(92) + '.')}\.weight "
                                             "holds 2 NaN or infinite"):
        load_model(str(broken), device="cpu")


def test_streaming_refuses_the_same_damage(tiny_llama_dir, tmp_path, weights):
    def stream(directory):
        return LayerStream(open_checkpoint(str(directory)), "cpu")

    stream(tiny_llama_dir)
    missing = _copy(tiny_llama_dir, tmp_path / "missing", {k: v for k, v in weights.items() if not k.startswith(LAYER_2)})
    with pytest.raises(ModelLoadError, match=r"9 tensors the model needs .*\(model\.layers\.2\.\*\)"):
        stream(missing)
    more = _copy(tiny_llama_dir, tmp_path / "six", config_changes={"num_hidden_layers": 6})
    with pytest.raises(ModelLoadError, match=r"model\.layers\.\{4\.\.5\}\.\*"):
        stream(more)
    fewer = _copy(tiny_llama_dir, tmp_path / "three", config_changes={"num_hidden_layers": 3})
    with pytest.raises(ModelLoadError, match=r"9 in its weight files are not part of the model"):
        stream(fewer)
    truncated = _copy(tiny_llama_dir, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ModelLoadError, match=f"weight file {truncated / 'model.safetensors'} is damaged"):
        open_checkpoint(str(truncated))
    shaped = dict(weights, **{"model.layers.1.mlp.down_proj.weight": torch.zeros(32, 32)})
    with pytest.raises(ModelLoadError, match=r"\[32, 32\] stored, \[32, 64\] expected"):
        stream(_copy(tiny_llama_dir, tmp_path / "shape", shaped))
    weights["model.layers.3.self_attn.k_proj.weight"][1, 1] = float("nan")
    nan = LayerStream(open_checkpoint(str(_copy(tiny_llama_dir, tmp_path / "nan", weights))), "cpu")
    with pytest.raises(ModelLoadError, match=r"model\.layers\.3\.self_attn\.k_proj\.weight holds 1 NaN"):
        nan.one_pass(torch.tensor([[1, 2, 3]]))


def test_a_manifest_catches_a_damaged_cache_entry(tiny_llama_dir, tmp_path, weights):
    entry = _copy(tiny_llama_dir, tmp_path / "entry")
    assert manifest_problem(entry) is None  # written before manifests: judged by its headers
    write_manifest(entry)
    assert (entry / MANIFEST).is_file() and manifest_problem(entry) is None
    save_file({k: v for k, v in weights.items() if not k.startswith(LAYER_2)}, entry / "model.safetensors")
    assert "holds" in manifest_problem(entry)  # a whole file, but not what was written
    data = (tiny_llama_dir / "model.safetensors").read_bytes()
    (entry / "model.safetensors").write_bytes(data[:1000])
    assert manifest_problem(entry).startswith("model.safetensors truncated")
    (entry / "model.safetensors").unlink()
    assert manifest_problem(entry) == "model.safetensors missing"
    (entry / "config.json").unlink()
    assert manifest_problem(entry) == "config.json is missing"


def test_names_are_grouped_by_layer():
    layer = [f"model.layers.11.{t}" for t in ("mlp.up_proj.weight", "mlp.down_proj.weight")]
    assert grouped(layer) == "model.layers.11.*"
    assert grouped(["model.layers.11.mlp.down_proj.weight"]) == "model.layers.11.mlp.down_proj.weight"
    many = [f"model.layers.{n}.{t}" for n in range(30, 40) for t in ("a.weight", "b.weight")]
    assert grouped(many + ["model.norm.weight"]) == "model.layers.{30..39}.*, model.norm.weight"
    assert grouped([f"model.layers.{n}.a" for n in (2, 3, 7)] + ["model.layers.9.b", "x", "y"]) == \
        "model.layers.{2..3,7}.a, model.layers.9.b, x and 1 more groups"
    check_complete({"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set()}, "m")


# ----------------------------------------------------------------------------- NaN past load

# A NaN in a tensor other than a down projection is not looked for at load (that would read every
# weight once more); a pass that it turns NaN is refused, and only then is the weight found. The
# NaN sits in v_proj: in q_proj or k_proj, CPU SDPA's causal kernel zeroes the NaN scores' row
# instead of passing the NaN on (torch 2.13), so no output shows it.
V_PROJ = "model.layers.1.self_attn.v_proj.weight"
IDS = torch.tensor([[1, 2, 3, 4]])


def _nan_in_v_proj(tiny_llama_dir, tmp_path, weights) -> Path:
    weights[V_PROJ][3, 3] = float("nan")
    return _copy(tiny_llama_dir, tmp_path / "nan-v", weights)


def _nan_in_memory(model: torch.nn.Module) -> None:
    """A NaN written after the load (a notebook's model changed in memory): only a pass can show it."""
    with torch.no_grad():
        model.get_parameter(V_PROJ)[3, 3] = float("nan")


def test_detection_refuses_a_pass_a_nan_weight_makes_nan_and_names_it(tiny_llama_dir, tmp_path, weights):
    from superweight.find.detect import detect
    from superweight.find.stream import detect_streamed

    named = rf"^{V_PROJ.replace('.', chr(92) + '.')} holds 1 NaN or infinite values: the checkpoint is corrupt"
    loaded = load_model(str(tiny_llama_dir), device="cpu")
    _nan_in_memory(loaded.model)
    with pytest.raises(ModelLoadError, match=named):
        detect(loaded.model, IDS, iterations=1)
    broken = _nan_in_v_proj(tiny_llama_dir, tmp_path, weights)  # from the file: refused as its layer is read
    with pytest.raises(ModelLoadError, match=named):
        detect_streamed(open_checkpoint(str(broken)), IDS, iterations=1)


def test_evaluation_refuses_the_model_as_given_scoring_nan(tiny_llama_dir, tmp_path, weights):
    from conftest import DATA_DIR
    from superweight.measure.configurations import Configuration, run_configurations

    loaded = load_model(str(tiny_llama_dir), device="cpu")
    _nan_in_memory(loaded.model)
    with pytest.raises(ModelLoadError, match=rf"^{V_PROJ.replace('.', chr(92) + '.')} holds 1 NaN"):
        run_configurations(loaded.model, loaded.tokenizer, [Configuration("original")], ["wikitext"],
                           data_dir=str(DATA_DIR), limit=1, max_length=16)


def test_a_pass_that_overflows_without_a_nan_weight_gets_the_dtype_advice(tiny_llama_dir, tmp_path, weights):
    from superweight.find.detect import detect

    # Every weight finite in float16 (< 65504), but the attention's output is not.
    gains = {"input_layernorm.weight": 1e3, "o_proj.weight": 3e4}
    weights = {name: tensor * next((g for end, g in gains.items() if name.endswith(end)), 1.0)
               for name, tensor in weights.items()}
    loud = load_model(str(_copy(tiny_llama_dir, tmp_path / "loud", weights)), device="cpu", dtype="float16")
    with pytest.raises(ModelLoadError, match=r"^the residual stream leaving decoder layer 3 is NaN or infinite "
                                             r"though no weight holds one: its forward pass overflows in float16; "
                                             r"run with --dtype bfloat16 or --dtype float32"):
        detect(loud.model, IDS, iterations=1)


def test_a_nan_metric_of_an_ablated_configuration_is_shown_as_nan_and_written_as_text():
    from superweight.measure.configurations import summary_table
    from superweight.measure.metrics import plain

    runs = {"original": {"results": {"wikitext": {"word_perplexity": 20.5, "word_perplexity_stderr": "N/A"}}},
            "scaled x1000": {"results": {"wikitext": {"word_perplexity": plain(float("nan")),
                                                      "word_perplexity_stderr": "N/A"}}}}
    assert runs["scaled x1000"]["results"]["wikitext"]["word_perplexity"] == "nan"  # JSON has no NaN
    table = summary_table(runs)
    assert table.rows[1] == ["scaled x1000", "nan"]
    assert table.to_dict()["rows"][1]["values"] == [None]
    json.dumps(table.to_dict(), allow_nan=False)
