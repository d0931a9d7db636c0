"""sw quantize --quantizer: bad input refused in one line before any work (no quantizer needed),
and, where the quantizers are installed (marker `quantizers`), the hand-off read back from each
quantizer's own output."""

import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from superweight.cli import app
from superweight.edit import real_quantizers as rq
from superweight.errors import MissingDependencyError, UsageError

runner = CliRunner()


def one_line_error(args, *fragments):
    result = runner.invoke(app, list(map(str, args)))
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def python_without_packages(tmp_path):
    """A 'Python' in which every import probe fails: a quantizer that is not installed."""
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\nexit 1\n")
    python.chmod(0o755)
    return python


@pytest.mark.parametrize("quantizer,install", [("llm-compressor", "pip install llmcompressor"),
                                               ("quanto", "pip install optimum-quanto"),
                                               ("bitsandbytes", "pip install bitsandbytes")])
def test_a_python_quantizer_not_installed_is_one_line_saying_how(tiny_llama_dir, tmp_path, monkeypatch,
                                                                  python_without_packages, quantizer, install):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SUPERWEIGHT_QUANTIZER_PYTHON", str(python_without_packages.parent.parent))
    before = sorted(p.name for p in tmp_path.iterdir())
    one_line_error(["quantize", tiny_llama_dir, "--coord", "1,2,3", "--quantizer", quantizer], install)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_llama_cpp_not_set_up_or_without_its_programs(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("SUPERWEIGHT_LLAMA_CPP", raising=False)
    one_line_error(["quantize", tiny_llama_dir, "--coord", "1,2,3", "--quantizer", "llama.cpp"],
                   "SUPERWEIGHT_LLAMA_CPP", "scripts/quantizers/setup.sh")
    (tmp_path / "llama-quantize").write_text("")
    one_line_error(["quantize", tiny_llama_dir, "--coord", "1,2,3", "--quantizer", "llama.cpp",
                    "--quantizer-path", tmp_path], "has no llama-perplexity")


@pytest.mark.parametrize("quantizer,scheme,listed", [("llama.cpp", "Q4_K_X", "Q4_K_M"),
                                                      ("llm-compressor", "W5A16", "W4A16-g64"),
                                                      ("quanto", "qint3", "qint4-axis"),
                                                      ("bitsandbytes", "int4", "nf4")])
def test_an_unknown_width_for_the_quantizer_is_refused_before_looking_for_it(tiny_llama_dir, quantizer, scheme,
                                                                            listed, monkeypatch):
    monkeypatch.delenv("SUPERWEIGHT_LLAMA_CPP", raising=False)  # the scheme is checked first
    one_line_error(["quantize", tiny_llama_dir, "--coord", "1,2,3", "--quantizer", quantizer, "--scheme", scheme],
                   f"{quantizer} has no scheme '{scheme}'", listed)


def test_an_unknown_quantizer_is_refused():
    with pytest.raises(UsageError, match="--quantizer must be one of rtn, llama.cpp"):
        rq.parse_scheme("gptq", None)


def test_schemes_parse_to_the_quantizers_settings():
    assert rq.parse_scheme("llm-compressor", "W4A16-g64") == {"name": "W4A16-g64", "bits": 4, "group": 64}
    assert rq.parse_scheme("llm-compressor", None)["group"] is None  # per channel
    assert rq.parse_scheme("quanto", "qint8")["per_axis"] and not rq.parse_scheme("quanto", "qint4")["per_axis"]
    assert rq.parse_scheme("llama.cpp", "q3_k_s")["type"] == "Q3_K_S"


def test_llm_compressor_groups_that_do_not_divide_the_columns_are_refused_before_any_work(tiny_llama_dir):
    # tiny Llama: hidden 32, intermediate 64; groups of 64 do not divide the 32-column matrices
    with pytest.raises(rq.QuantizerError, match=r"cannot quantize model\.layers\.0\.\S+ in groups of 64: its 32 "
                                                r"columns are not a multiple of 64.*W4A16-g32"):
        rq.check_model_fits("llm-compressor", rq.parse_scheme("llm-compressor", "W4A16-g64"), tiny_llama_dir, ["lm_head"])
    rq.check_model_fits("llm-compressor", rq.parse_scheme("llm-compressor", "W4A16-g32"), tiny_llama_dir, ["lm_head"])


def test_a_model_the_converter_rejects_is_its_own_message_on_one_line(tmp_path):
    converter = tmp_path / "convert_hf_to_gguf.py"
    converter.write_text("import sys\nprint('INFO: loading', file=sys.stderr)\n"
                         "raise SystemExit(\"NotImplementedError: Architecture 'FooForCausalLM' not supported!\")\n")
    tools = rq.QuantizerTools("llama.cpp", sys.executable, tmp_path, converter)
    with pytest.raises(rq.QuantizerError) as error:
        rq.run_worker(tools, {"job": "convert", "converter": str(converter), "model_dir": str(tmp_path),
                              "out": str(tmp_path / "out.gguf")})
    assert "\n" not in str(error.value)
    assert str(error.value).startswith("llama.cpp cannot quantize this model: RuntimeError: convert_hf_to_gguf.py: "
                                       "NotImplementedError: Architecture 'FooForCausalLM' not supported!")
    assert not (tmp_path / "out.gguf").exists()


# ----------------------------------------------------------------------------- the hand-off, read back

SMOLLM2_COORDS = ["2,507,90", "11,507,1229"]  # two of sw detect's five: layers 2 and 11
KEPT = ["model.layers.2.mlp.down_proj", "model.layers.11.mlp.down_proj"]


def measured(quantizer, scheme, gguf_cache):
    from superweight.commands.quantize_real import quantize_with

    return quantize_with("smollm2-135m", quantizer=quantizer, scheme=scheme, coord=SMOLLM2_COORDS,
                         data_dir=os.environ.get("SUPERWEIGHT_DATA", "/work/shared/data"), limit=1,
                         max_length=128).document


@pytest.mark.quantizers
def test_llama_quantize_keeps_exactly_the_named_tensors_at_f16(gguf_cache):
    document = measured("llama.cpp", "Q4_0", gguf_cache)
    naive, protected = document["runs"]["naive"]["tensor_types"], document["runs"]["protected"]["tensor_types"]
    named = ["blk.2.ffn_down.weight", "blk.11.ffn_down.weight"]
    assert document["gguf_tensors"] == named
    assert {protected[n] for n in named} == {"F16"} and {naive[n] for n in named} == {"Q4_0"}
    assert {n for n in naive if naive[n] != protected[n]} == set(named)  # Q4_0: nothing else moves
    assert document["runs"]["protected"]["read_back"]["ok"]


@pytest.mark.quantizers
def test_llm_compressor_saves_exactly_the_recipes_ignore_list(gguf_cache):
    document = measured("llm-compressor", "W4A16-g64", gguf_cache)
    for mode, keep in (("naive", ["lm_head"]), ("protected", ["lm_head", *KEPT])):
        run = document["runs"][mode]
        assert sorted(run["saved_ignore"]) == sorted(keep)
        assert sorted(run["unquantized_linear"]) == sorted(keep)
        assert run["read_back"]["ok"]


@pytest.mark.quantizers
def test_quanto_excludes_exactly_the_named_modules(gguf_cache):
    document = measured("quanto", "qint4-axis", gguf_cache)
    assert sorted(document["runs"]["protected"]["unquantized_linear"]) == sorted(["lm_head", *KEPT])
    assert document["runs"]["naive"]["unquantized_linear"] == ["lm_head"]
    # protected: the super weight is its original value; naive: per-row int4 moves it
    original = document["original_values"]["11,507,1229"]
    assert document["runs"]["protected"]["values"]["11,507,1229"] == pytest.approx(original)
