"""`sw ablate` and `sw eval` through the CLI: results, and one-line errors that leave nothing behind."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA_DIR
from test_cli import assert_one_line_error, invoke

WEIGHT = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture
def coords_file(tmp_path):
    path = tmp_path / "coords.yaml"
    path.write_text("super_weights:\n  - {layer: 1, row: 3, col: 5}\n")
    return path


def test_ablate_writes_a_traceable_model(tiny_llama_dir, coords_file, tmp_path):
    out = tmp_path / "ablated"
    result = invoke("ablate", tiny_llama_dir, "--coords", coords_file, "--out", out, "-q", "--json")
    assert result.exit_code == 0, result.output
    original = load_file(tiny_llama_dir / "model.safetensors")
    ablated = load_file(out / "model.safetensors")
    assert ablated[WEIGHT][3, 5] == 0 and original[WEIGHT][3, 5] != 0
    changed = [name for name in original if not torch.equal(original[name], ablated[name])]
    assert changed == [WEIGHT]
    record = json.loads((out / "superweight_ablation.json").read_text())
    assert record["coordinates"] == [{"layer": 1, "row": 3, "col": 5}]
    assert record["original_values"] == [pytest.approx(original[WEIGHT][3, 5].item())]
    assert (out / "tokenizer.json").is_file()


def test_ablate_scale_and_controls(tiny_llama_dir, coords_file, tmp_path):
    result = invoke("ablate", tiny_llama_dir, "--coord", "1,3,5", "--mode", "scale", "--factor", "2.5",
                    "--out", tmp_path / "x2", "-q")
    assert result.exit_code == 0, result.output
    original = load_file(tiny_llama_dir / "model.safetensors")[WEIGHT]
    assert load_file(tmp_path / "x2" / "model.safetensors")[WEIGHT][3, 5] == original[3, 5] * 2.5
    # named as `sw eval` names its rows: what was done to what
    assert result.stdout.strip() == f"weight [1, 3, 5] scaled x2.5; model written to {tmp_path / 'x2'}"
    result = invoke("ablate", tiny_llama_dir, "--coords", coords_file, "--control", "outliers", "--top", "7",
                    "--out", tmp_path / "outliers", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"other 7 outliers zeroed; model written to {tmp_path / 'outliers'}"
    record = json.loads((tmp_path / "outliers" / "superweight_ablation.json").read_text())
    assert len(record["coordinates"]) == 7 and record["control"]["kind"] == "outliers"
    assert {"layer": 1, "row": 3, "col": 5} not in record["coordinates"]


@pytest.mark.parametrize("text,fragment", [
    ("super_weights: [ {layer: 1", "not valid YAML"),
    ("super_weights: [{layer: 1, row: 2}]", "missing key(s) col"),
    ("super_weights: [{layer: x, row: 2, col: 3}]", "must be a non-negative integer"),
    ("super_weights: [{layer: 99, row: 2, col: 3}]", "layer"),
    ("super_weights: [{layer: 1, row: 32, col: 3}]", "row"),
    ("super_weights: [{layer: 1, row: 2, col: 64}]", "col"),
    ("super_weights: [{layer: 1, row: 2, col: 3, value: 1234.5}]", "made for another model"),  # in range, wrong weight
    # a wrong entry that --select super leaves out still makes the file wrong
    ("super_weights: [{layer: 1, row: 2, col: 3, role: super}, {layer: 1, row: 32, col: 3, role: inert}]", "row 32"),
    ("super_weights: [{layer: 1, row: 2, col: 3, role: super}, {layer: 1, row: 4, col: 3, role: inert, value: 1234.5}]",
     "made for another model"),
    ("super_weights: [{layer: 1, row: 2, col: 3}, {layer: 1, row: 2, col: 3, value: 1.0}]",
     "super_weights[1] repeats [1, 2, 3] (super_weights[0])"),
])
@pytest.mark.parametrize("command", ["ablate", "eval"])
def test_bad_coordinates(tiny_llama_dir, tmp_path, text, fragment, command):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    extra = ["--out", tmp_path / "out"] if command == "ablate" else ["--data-dir", DATA_DIR, "--limit", "2"]
    assert_one_line_error(invoke(command, tiny_llama_dir, "--coords", path, "-q", *extra), fragment)
    assert not (tmp_path / "out").exists()


def test_a_recorded_value_matches_within_half_precision_rounding(tiny_llama_dir, tmp_path):
    weight = load_file(tiny_llama_dir / "model.safetensors")[WEIGHT][2, 3].item()
    path = tmp_path / "c.yaml"
    path.write_text(f"super_weights: [{{layer: 1, row: 2, col: 3, value: {weight!r}}}]\n")
    result = invoke("ablate", tiny_llama_dir, "--coords", path, "--dtype", "bfloat16", "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert load_file(tmp_path / "out" / "model.safetensors")[WEIGHT][2, 3].item() == 0


def test_ablate_refuses_model_directory_and_non_empty_out(tiny_llama_dir, coords_file, tmp_path):
    before = sorted(p.name for p in tiny_llama_dir.iterdir())
    assert_one_line_error(invoke("ablate", tiny_llama_dir, "--coords", coords_file, "--out", tiny_llama_dir, "-q"),
                          "model directory")
    assert sorted(p.name for p in tiny_llama_dir.iterdir()) == before
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert_one_line_error(invoke("ablate", tiny_llama_dir, "--coords", coords_file, "--out", busy, "-q"),
                          "not empty", "--force")
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    result = invoke("ablate", tiny_llama_dir, "--coords", coords_file, "--out", busy, "-q", "--force")
    assert result.exit_code == 0 and (busy / "model.safetensors").is_file() and not (busy / "keep.txt").exists()


def test_an_output_never_replaces_or_enters_the_tools_own_cache(tiny_llama_dir, coords_file, tmp_path, monkeypatch):
    """--out --force on SUPERWEIGHT_CACHE (or a folder holding it) would delete the dequantised GGUF
    and the cached evaluations; a .gguf MODEL is named a file, not a directory."""
    cache = tmp_path / "parent" / "cache"
    (cache / "evaluations").mkdir(parents=True)
    monkeypatch.setenv("SUPERWEIGHT_CACHE", str(cache))
    for out, said in ((cache, "it is inside superweight's cache"), (cache / "x", "it is inside superweight's cache"),
                      (cache.parent, "it contains superweight's cache")):
        assert_one_line_error(invoke("ablate", tiny_llama_dir, "--coords", coords_file, "--out", out, "--force", "-q"),
                              said, "choose an output path elsewhere")
    assert [p.name for p in cache.iterdir()] == ["evaluations"]
    from superweight.files import refuse_inside
    from superweight.model.source import resolve

    gguf = tmp_path / "g" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    with pytest.raises(Exception, match=r"it contains the model file .*m\.gguf, which replacing it would delete"):
        refuse_inside(gguf.parent, resolve(str(gguf)).output_protected_dirs)


def test_an_output_never_replaces_an_input_of_the_command(tiny_llama_dir, coords_file, tmp_path):
    """--force replaces an earlier output, never the coordinates file (or --verify-text file) the
    command reads, nor a folder holding it: the error without --force even suggests --force."""
    text = tmp_path / "text.txt"
    text.write_text("Paris is the capital of France. " * 8)
    written = {coords_file: coords_file.read_text(), text: text.read_text()}
    data = ("--task", "wikitext", "--limit", "1", "--max-length", "64", "--data-dir", DATA_DIR)
    for args, said in (
            (("eval", tiny_llama_dir, "--coords", coords_file, *data, "--output", coords_file), "it is the coordinates file"),
            (("export", coords_file, "--to", "bitsandbytes", "--model", tiny_llama_dir, "--out", coords_file),
             "it is the coordinates file"),
            (("ablate", tiny_llama_dir, "--coords", coords_file, "--out", tmp_path), "it contains the coordinates file"),
            (("study", tiny_llama_dir, "--coords", coords_file, *data, "--out", tmp_path), "it contains the coordinates file"),
            (("quantize", tiny_llama_dir, "--coords", coords_file, *data, "--plot", tmp_path / "q.png", "--block-size", "64",
              "--out", tmp_path), "it contains the coordinates file"),
            (("detect", tiny_llama_dir, "--verify", "--verify-text", text, "--out", text), "it is the --verify-text file")):
        assert_one_line_error(invoke(*args, "--force", "-q"), said, "choose an output path elsewhere")
        assert {path: path.read_text() for path in written} == written, args[0]


def test_interrupted_ablate_leaves_nothing(tiny_llama_dir, coords_file, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    real_save = PreTrainedModel.save_pretrained

    def save_then_interrupt(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)  # a full model is on disk in the temp dir...
        raise KeyboardInterrupt  # ...when the user presses Ctrl-C

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_interrupt)
    out = tmp_path / "ablated"
    result = invoke("ablate", tiny_llama_dir, "--coords", coords_file, "--out", out, "-q")
    assert result.exit_code == 130
    assert not out.exists() and list(tmp_path.iterdir()) == [coords_file]


def test_terminated_ablate_leaves_nothing(tiny_llama_dir, coords_file, tmp_path, monkeypatch):
    import os
    import signal

    from transformers import PreTrainedModel

    from superweight import cli

    real_save = PreTrainedModel.save_pretrained

    def save_then_terminate(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # a job scheduler or `timeout` ends the run

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_terminate)
    previous = signal.signal(signal.SIGTERM, cli.terminate_on_sigterm)  # as `sw` installs it in main()
    try:
        out = tmp_path / "ablated"
        result = invoke("ablate", tiny_llama_dir, "--coords", coords_file, "--out", out, "-q")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 143
    assert not out.exists() and list(tmp_path.iterdir()) == [coords_file]


@pytest.mark.parametrize("args,fragment", [
    (["--task", "nosuchtask"], "nosuchtask"),
    (["--limit", "0"], "--limit"),
    (["--mode", "scale", "--factor", "abc"], "--factor must be a number"),
    (["--mode", "scale"], "--factor"),
    (["--batch-size", "zero"], "--batch-size"),
    (["--compare"], "--coords"),
])
def test_bad_eval_options(tiny_llama_dir, args, fragment):
    assert_one_line_error(invoke("eval", tiny_llama_dir, "-q", "--data-dir", DATA_DIR, *args), fragment)


@pytest.mark.parametrize("args,fragment", [
    (["--compare", "--mode", "scale", "--factor", "2"], "drop --mode/--factor"),
    (["--restore-activation", "--control", "random"], "drop one of them"),
    (["--output", "."], "is a directory"),
])
def test_eval_options_that_would_be_ignored_or_fail_late_are_refused(tiny_llama_dir, coords_file, args, fragment):
    assert_one_line_error(invoke("eval", tiny_llama_dir, "-q", "--data-dir", DATA_DIR, "--task", "piqa",
                                 "--limit", "1", "--coords", coords_file, *args), fragment)


def test_ablate_refuses_the_current_directory_as_out(tiny_llama_dir, coords_file, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in (".", ".."):
        result = invoke("ablate", tiny_llama_dir, "--coords", coords_file, "--out", out, "--force", "-q")
        assert_one_line_error(result, "current directory")
        assert result.exit_code == 2  # a bad --out: a usage error
    assert list(here.iterdir()) == [] and coords_file.is_file()


def test_ablate_factor_not_a_number(tiny_llama_dir, coords_file, tmp_path):
    assert_one_line_error(invoke("ablate", tiny_llama_dir, "--coords", coords_file, "--mode", "scale",
                                 "--factor", "two", "--out", tmp_path / "o", "-q"), "--factor must be a number")
    assert not (tmp_path / "o").exists()


def test_missing_data_offline_names_the_files(tiny_llama_dir, tmp_path):
    line = assert_one_line_error(invoke("eval", tiny_llama_dir, "-q", "--task", "piqa", "--data-dir", tmp_path), "piqa")
    assert "valid.jsonl" in line


def test_a_limit_past_every_tasks_size_is_not_reported_as_a_limit(tiny_llama_dir, coords_file, tmp_path):
    """piqa with 3 documents, --limit 10: all 3 are read, so the table does not say "first 10
    documents per task" and no note blames --limit for differences within their error."""
    (tmp_path / "data" / "piqa").mkdir(parents=True)
    for name in ("valid.jsonl", "valid-labels.lst"):
        lines = (DATA_DIR / "piqa" / name).read_text().splitlines(keepends=True)[:3]
        (tmp_path / "data" / "piqa" / name).write_text("".join(lines))
    args = ("eval", tiny_llama_dir, "-q", "--data-dir", tmp_path / "data", "--task", "piqa", "--max-length", "40",
            "--coords", coords_file, "--compare")
    result = invoke(*args, "--limit", "10")
    assert result.exit_code == 0, result.output
    assert "first 10 documents" not in result.output and "--limit" not in result.output
    cut = invoke(*args, "--limit", "2")
    assert "first 2 documents per task" in cut.output


def test_eval_json_layout_and_compare(tiny_llama_dir, coords_file, tmp_path):
    output = tmp_path / "results.json"
    result = invoke("eval", tiny_llama_dir, "-q", "--data-dir", DATA_DIR, "--task", "piqa", "--task", "arc_easy",
                    "--limit", "4", "--coords", coords_file, "--compare", "--json", "--output", output)
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    runs = {run["name"]: run for run in document["configurations"]}
    written = json.loads(output.read_text())  # lm-eval's layout, a file per configuration's results
    assert {name: run["results"] for name, run in written["configurations"].items()} == \
        {name: run["results"] for name, run in runs.items()}
    # lm-eval's own key is "n-samples" (--json keeps its documented "n_samples")
    assert {name: run["n-samples"] for name, run in written["configurations"].items()} == \
        {name: run["n_samples"] for name, run in runs.items()}
    assert not any("n_samples" in run for run in written["configurations"].values())
    assert [run["ablation"]["kind"] for run in runs.values()] == ["unchanged", "ablated", "restored", "control"]
    # each row named by what it zeroed: the file's one weight (no measured role), one random weight
    assert list(runs) == ["original", "weight [1, 3, 5] zeroed", "weight [1, 3, 5] zeroed + activation restored",
                          "1 random weight zeroed"]
    for run in runs.values():
        assert set(run["results"]) == {"piqa", "arc_easy"}
        assert 0 <= run["results"]["piqa"]["acc"] <= 1 and "acc_norm_stderr" in run["results"]["piqa"]
        assert run["n_samples"]["piqa"]["effective"] == 4
    assert runs["1 random weight zeroed"]["ablation"]["control"] == "random"
