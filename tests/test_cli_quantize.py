"""`sw quantize` through the CLI on a tiny local model."""

import json

import pytest
from safetensors.torch import load_file

from conftest import DATA_DIR
from test_cli import assert_one_line_error, invoke


def test_quantize_sweep_json_and_saved_model(tiny_llama_dir, tmp_path):
    out = tmp_path / "w4"
    result = invoke("quantize", tiny_llama_dir, "-q", "--json", "--coord", "1,3,5", "--block-size", "256",
                    "--data-dir", DATA_DIR, "--limit", "1", "--max-length", "64", "--out", out,
                    "--plot", tmp_path / "rtn.png")
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    (row,) = document["weights"]
    assert row["block_size"] == 256 and row["naive_perplexity"] > 0 and row["aware_perplexity"] > 0
    original = load_file(tiny_llama_dir / "model.safetensors")
    quantized = load_file(out / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    assert quantized[name][3, 5] == original[name][3, 5]  # the super weight is kept exactly
    assert len(set(quantized[name][4:8].flatten().tolist())) <= 16  # rows 4-7 are one 256-element block: 16 levels
    assert len(set(original[name][4:8].flatten().tolist())) > 16
    assert json.loads((out / "superweight_quantization.json").read_text())["block_size"] == 256
    assert (tmp_path / "rtn.png").read_bytes()[:4] == b"\x89PNG"


def test_quantize_auto_z_reports_and_saves_the_thresholds_it_chose(tiny_llama_dir, tmp_path):
    out = tmp_path / "w4"
    result = invoke("quantize", tiny_llama_dir, "-q", "--json", "--coord", "1,3,5", "--block-size", "256", "--z", "auto",
                    "--data-dir", DATA_DIR, "--limit", "1", "--max-length", "64", "--out", out)
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    (row,) = document["weights"]
    assert document["z"] == row["z"] == "auto"
    assert sum(row["chosen_z"].values()) == 4 * 7  # every decoder matrix of the tiny Llama got one
    saved = json.loads((out / "superweight_quantization.json").read_text())
    assert saved["z"] == "auto" and saved["chosen_z"] == row["chosen_z"]


@pytest.mark.parametrize("args,fragment", [
    (["--bits", "9"], "bits"),
    (["--bits", "1"], "bits"),
    (["--block-size", "abc"], "--block-size"),
    (["--block-size", "-5"], "block size"),
    (["--z", "0"], "z"),
    (["--z", "abc"], "--z must be a positive number or auto"),
    (["--task", "nosuchtask"], "nosuchtask"),
    (["--out", "somewhere"], "exactly one --block-size"),
    (["--batch-size", "0"], "--batch-size must be a positive integer or auto"),
])
def test_bad_quantize_options(tiny_llama_dir, tmp_path, args, fragment):
    assert_one_line_error(invoke("quantize", tiny_llama_dir, "-q", "--coord", "1,3,5", "--data-dir", DATA_DIR, *args),
                          fragment)


@pytest.mark.parametrize("args,fragments", [
    (["--scheme", "Q4_K_M"], ("--scheme only applies to a real quantizer", "--quantizer rtn")),
    (["--quantizer-path", "/opt/llama.cpp"], ("--quantizer-path only applies to a real quantizer",)),
    (["--activation-bits", "4"], ("--activation-bits 4", "add --activations")),
    (["--quantizer", "quanto", "--bits", "8"], ("--bits only applies to --quantizer rtn", "--scheme")),
    (["--quantizer", "llama.cpp", "--block-size", "64"], ("--block-size only applies to --quantizer rtn",)),
    (["--quantizer", "bitsandbytes", "--activations"], ("--activations only applies to --quantizer rtn",)),
    (["--quantizer", "quanto", "--plot", "q.png"], ("--plot only applies to --quantizer rtn",)),
    (["--plot", "rtn.txt"], ("--plot rtn.txt", "cannot write .txt")),
    (["--quantizer", "llama.cpp", "--dtype", "bfloat16"], ("--dtype does not apply to a real quantizer",)),
    (["--quantizer", "quanto", "--device-map", "auto"], ("--device-map does not apply to a real quantizer",)),
    (["--quantizer", "llama.cpp", "--batch-size", "4"], ("--batch-size does not apply to --quantizer llama.cpp",)),
    (["--batch-size", "zero"], ("--batch-size must be a positive integer or auto, got 'zero'",)),
])
def test_quantize_options_that_would_be_ignored_or_fail_late_are_usage_errors(tiny_llama_dir, tmp_path, monkeypatch,
                                                                               args, fragments):
    """Accepted and ignored before (--scheme with rtn, --activation-bits without --activations, rtn's
    options with a real quantizer), or refused only after the whole evaluation (a --plot format
    matplotlib cannot write): each is one line and exit 2 before the model loads."""
    import superweight.model.options as options_module

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(options_module, "load_model", no_load)
    monkeypatch.chdir(tmp_path)
    result = invoke("quantize", tiny_llama_dir, "-q", "--coord", "1,3,5", "--data-dir", DATA_DIR, "--limit", "1", *args)
    assert_one_line_error(result, *fragments)
    assert result.exit_code == 2 and list(tmp_path.iterdir()) == []


def test_the_batch_size_reaches_every_evaluation(tiny_llama_dir, monkeypatch):
    """--batch-size as sw eval's: each evaluation of the sweep (unquantized, per block size naive and
    aware, per activation width naive and aware) runs at it."""
    import superweight.measure.quantized as quantized

    seen = []
    evaluate = quantized.evaluate

    def spy(*args, **kwargs):
        seen.append(kwargs["batch_size"])
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(quantized, "evaluate", spy)
    result = invoke("quantize", tiny_llama_dir, "-q", "--json", "--coord", "1,3,5", "--block-size", "256",
                    "--activations", "--batch-size", "3", "--data-dir", DATA_DIR, "--limit", "1", "--max-length", "64")
    assert result.exit_code == 0, result.output
    assert seen == [3] * 5


def test_quantize_unwritable_out(tiny_llama_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(invoke("quantize", tiny_llama_dir, "-q", "--coord", "1,3,5", "--data-dir", DATA_DIR,
                                 "--block-size", "64", "--out", blocker / "out"), "cannot write")


def test_quantize_shows_a_bar_for_every_stage(tiny_llama_dir, tmp_path):
    result = invoke("quantize", tiny_llama_dir, "--json", "--block-size", "256", "--data-dir", DATA_DIR,
                    "--limit", "1", "--max-length", "64")
    assert result.exit_code == 0, result.output
    for stage in ("detecting and verifying super weights", "unquantized: wikitext", "INT4 naive, block 256: quantizing",
                  "INT4 naive, block 256: wikitext", "INT4 aware (z=9), block 256: quantizing",
                  "INT4 aware (z=9), block 256: wikitext"):
        assert stage in result.stderr, (stage, result.stderr)
    json.loads(result.stdout)  # the bars stay off stdout
    quiet = invoke("quantize", tiny_llama_dir, "-q", "--json", "--coord", "1,3,5", "--block-size", "256",
                   "--activations", "--data-dir", DATA_DIR, "--limit", "1", "--max-length", "64")
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.output


def test_activations_on_a_mixture_of_experts_model_are_refused_before_the_weight_sweep(monkeypatch):
    """--activations cannot run on fused experts: said at once, not after the whole weight sweep."""
    import superweight.commands.quantize as command
    from superweight import quantize_model, wrap
    from superweight.errors import UsageError
    from conftest import PROMPT_WORDS, build_word_tokenizer
    from synthetic import tiny_model

    def no_sweep(*args, **kwargs):
        raise AssertionError("the weight sweep ran")

    monkeypatch.setattr(command, "weight_quantization_sweep", no_sweep)
    loaded = wrap(tiny_model("mixtral"), build_word_tokenizer(PROMPT_WORDS))
    with pytest.raises(UsageError, match="drop --activations"):
        quantize_model(loaded, coord=["1,3,5,0"], activations=True, block_size=[64], data_dir=DATA_DIR, limit=1)


def test_activations_on_a_mixture_of_experts_checkpoint_are_refused_before_the_load(tmp_path, monkeypatch):
    """A large MoE model loads for minutes: its config says there are fused experts, so --activations
    is refused before any weight is read."""
    import superweight.commands.prepare as prepare
    from superweight import quantize_model
    from superweight.errors import UsageError
    from synthetic import tiny_model

    tiny_model("mixtral").save_pretrained(tmp_path / "moe", safe_serialization=True)

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(prepare, "load", no_load)
    with pytest.raises(UsageError, match="drop --activations"):
        quantize_model(str(tmp_path / "moe"), coord=["1,3,5,0"], activations=True, block_size=[64],
                       data_dir=DATA_DIR, limit=1)


def test_activations_and_coordinates_read_the_config_once_before_the_load(tiny_llama_dir, monkeypatch):
    """--activations checks the config for fused experts and the coordinates check their ranges
    against it: one read serves both (with the hub online, each read asks the hub)."""
    import superweight.commands.prepare as prepare
    import superweight.edit.validate as validate
    from superweight import quantize_model

    reads = []
    read_config = validate.read_config

    def counted(*args, **kwargs):
        reads.append(args[1])
        return read_config(*args, **kwargs)

    class Loading(Exception):
        pass

    def no_load(*args, **kwargs):
        raise Loading

    monkeypatch.setattr(validate, "read_config", counted)
    monkeypatch.setattr(prepare, "load", no_load)
    with pytest.raises(Loading):
        quantize_model(str(tiny_llama_dir), coord=["1,3,5"], activations=True, block_size=[64],
                       data_dir=DATA_DIR, limit=1)
    assert reads == [str(tiny_llama_dir)]
