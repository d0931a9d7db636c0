"""A new user's first hour (issue 13): options that must not silently do something else, outputs
with ordinary file modes, and output that scripts can read."""

import json
import os
import stat
from pathlib import Path

import pytest

from conftest import DATA_DIR, PLANTED
from test_cli import assert_one_line_error, invoke


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def coords_file(tmp_path):
    path = tmp_path / "coords.yaml"
    path.write_text("super_weights:\n  - {layer: 1, row: 3, col: 5}\n")
    return path


# ----------------------------------------------------------------------------- point 11: file modes


def test_library_outputs_get_the_umask_mode(tmp_path):
    from superweight.files import atomic_directory, atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "f").write_bytes(b"y")
            os.chmod(tmp / "sub" / "f", 0o600)  # as safetensors and mkstemp create files
    finally:
        os.umask(old)
    assert mode(tmp_path / "a.txt") == 0o640
    assert mode(tmp_path / "d") == 0o750 and mode(tmp_path / "d" / "sub") == 0o750
    assert mode(tmp_path / "d" / "sub" / "f") == 0o640


def test_cli_outputs_are_0644_under_umask_022(tiny_llama_dir, coords_file, tmp_path, umask_022):
    result = invoke("detect", tiny_llama_dir, "-q", "--out", tmp_path / "c.yaml", "--plot", tmp_path / "p.png")
    assert result.exit_code == 0, result.output
    result = invoke("ablate", tiny_llama_dir, "-q", "--coords", coords_file, "--out", tmp_path / "ablated")
    assert result.exit_code == 0, result.output
    result = invoke("eval", tiny_llama_dir, "-q", "--data-dir", DATA_DIR, "--limit", "1", "--max-length", "32",
                    "--output", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    for name in ("c.yaml", "p.png", "r.json", "ablated/model.safetensors", "ablated/superweight_ablation.json"):
        assert mode(tmp_path / name) == 0o644, name
    assert mode(tmp_path / "ablated") == 0o755


# ----------------------------------------------------------------------------- point 12: output paths


def test_an_existing_directory_as_output_file_is_refused_before_the_work(tiny_llama_dir, tmp_path):
    (tmp_path / "existing").mkdir()
    line = assert_one_line_error(invoke("detect", tiny_llama_dir, "-q", "--out", tmp_path / "existing"),
                                 "is a directory")
    assert "IsADirectoryError" not in line
    assert list((tmp_path / "existing").iterdir()) == [] and not list(tmp_path.glob(".*"))
    # a folder holding the model: the same mistake, not "replacing it would delete the model directory"
    line = assert_one_line_error(invoke("detect", tiny_llama_dir, "-q", "--out", tiny_llama_dir.parent),
                                 "is a directory", "give a file name")
    assert "delete" not in line


@pytest.mark.parametrize("force", [(), ("--force",)], ids=["plain", "force"])
def test_an_existing_file_as_output_folder_is_refused_before_the_model_loads(tiny_llama_dir, tmp_path, force):
    (tmp_path / "notes.txt").write_text("mine")
    result = invoke("ablate", tiny_llama_dir, "--coord", "1,3,5", "--out", tmp_path / "notes.txt", *force)
    assert_one_line_error(result, "notes.txt exists and is not a directory; choose another --out")
    assert result.exit_code == 2 and "loaded" not in result.output
    assert (tmp_path / "notes.txt").read_text() == "mine" and sorted(tmp_path.iterdir()) == [tmp_path / "notes.txt"]


@pytest.mark.parametrize("command, option", [("detect", "--out"), ("detect", "--plot"), ("eval", "--output"),
                                             ("export", "--out"), ("quantize", "--plot")])
def test_a_file_output_ending_in_a_slash_is_refused_not_written_as_a_file(tiny_llama_dir, tmp_path, command, option):
    """pathlib drops the '/': `--out results/` wrote a file named 'results'."""
    from superweight.coords import SuperWeight, write_coords

    coords = write_coords(tmp_path / "c.yaml", [SuperWeight(1, 3, 5)], model=str(tiny_llama_dir), model_type="llama")
    args = {"detect": (tiny_llama_dir,), "eval": (tiny_llama_dir, "--coords", coords, "-t", "piqa"),
            "export": (coords, "--to", "bitsandbytes"), "quantize": (tiny_llama_dir, "--coords", coords, "-t", "piqa")}
    target = f"{tmp_path / 'results'}/"
    result = invoke(command, *args[command], "--data-dir", DATA_DIR, option, target) if command in ("eval", "quantize") \
        else invoke(command, *args[command], option, target)
    assert_one_line_error(result, f"{target} ends in '/', so it names a folder, but this output is a file")
    assert result.exit_code == 2 and "loaded" not in result.output
    assert not (tmp_path / "results").exists()


def test_a_missing_output_folder_is_refused_not_created(tiny_llama_dir, tmp_path):
    target = tmp_path / "no" / "such" / "x.yaml"
    result = invoke("detect", tiny_llama_dir, "-q", "--out", target)
    assert_one_line_error(result, "does not exist", "mkdir -p")
    assert result.exit_code == 2  # a bad --out: a usage error, as an existing one without --force is
    assert not (tmp_path / "no").exists()
    result = invoke("ablate", tiny_llama_dir, "-q", "--coord", "1,3,5", "--out", tmp_path / "no" / "model")
    assert_one_line_error(result, "does not exist")
    assert result.exit_code == 2
    assert not (tmp_path / "no").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no one can create a file")
@pytest.mark.parametrize("command, out", [("detect", "c.yaml"), ("ablate", "model"), ("export", "skip.json")])
def test_an_output_folder_where_no_file_can_be_created_is_refused_before_the_work(tiny_llama_dir, tmp_path, command,
                                                                                  out):
    """os.access says /proc (like a read-only mount, for root) is writable; the write then failed
    after the model had loaded, as 'FileNotFoundError: ... /proc/.c.yaml.xxxx.tmp'."""
    from superweight.coords import SuperWeight, write_coords

    coords = write_coords(tmp_path / "c.yaml", [SuperWeight(1, 3, 5)], model=str(tiny_llama_dir), model_type="llama")
    args = {"detect": (tiny_llama_dir,), "ablate": (tiny_llama_dir, "--coord", "1,3,5"),
            "export": (coords, "--to", "bitsandbytes")}
    result = invoke(command, *args[command], "--out", f"/proc/{out}")
    assert_one_line_error(result, "cannot write to /proc (", "choose another output path")
    assert result.exit_code == 2 and "loaded" not in result.output


# ----------------------------------------------------------------------------- point 1: options that need another


def test_factor_alone_implies_scale_and_says_so(tiny_llama_dir, coords_file, tmp_path):
    from safetensors.torch import load_file

    result = invoke("ablate", tiny_llama_dir, "--coords", coords_file, "--factor", "2", "--out", tmp_path / "x2")
    assert result.exit_code == 0, result.output
    assert "--mode scale" in result.output
    record = json.loads((tmp_path / "x2" / "superweight_ablation.json").read_text())
    assert record["mode"] == "scale" and record["factor"] == 2.0
    name = "model.layers.1.mlp.down_proj.weight"
    assert load_file(tmp_path / "x2" / "model.safetensors")[name][3, 5] == 2 * load_file(
        tiny_llama_dir / "model.safetensors")[name][3, 5]
    result = invoke("eval", tiny_llama_dir, "-q", "--json", "--coords", coords_file, "--factor", "2",
                    "--data-dir", DATA_DIR, "--limit", "1", "--max-length", "32")
    assert result.exit_code == 0, result.output
    [run] = json.loads(result.output)["configurations"]
    ablation = run["ablation"]
    assert ablation["mode"] == "scale" and ablation["factor"] == 2.0 and ablation["name"] == "weight [1, 3, 5] scaled x2"


@pytest.mark.parametrize("args,fragments", [
    (["--mode", "zero", "--factor", "2"], ("--mode zero", "--factor 2")),
    (["--top", "5"], ("--top 5", "--control outliers")),
    (["--control", "random", "--top", "5"], ("--top 5", "--control outliers")),
    (["--control", "bogus"], ("unknown --control 'bogus'",)),
    (["--control", "outliers", "--top", "0"], ("--top must be a positive",)),
])
@pytest.mark.parametrize("command", ["ablate", "eval"])
def test_options_that_would_be_ignored_are_usage_errors_before_the_model_loads(tmp_path, coords_file, command,
                                                                                 args, fragments):
    missing_model = tmp_path / "no-model-here"  # checked before the model is even looked for
    extra = ["--out", tmp_path / "out"] if command == "ablate" else ["--data-dir", DATA_DIR]
    result = invoke(command, missing_model, "--coords", coords_file, *args, *extra)
    assert_one_line_error(result, *fragments)
    assert result.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_compare_with_top_needs_the_outlier_control(tmp_path, coords_file):
    result = invoke("eval", tmp_path / "no-model", "--coords", coords_file, "--compare", "--top", "5",
                    "--data-dir", DATA_DIR)
    assert_one_line_error(result, "--control outliers")


# ----------------------------------------------------------------------------- point 4: an empty coordinates file


@pytest.mark.parametrize("command", ["ablate", "eval", "study", "quantize"])
def test_an_empty_coordinates_file_says_so(tiny_llama_dir, tmp_path, command):
    empty = tmp_path / "empty.yaml"
    empty.write_text("model: tiny\nsuper_weights: []\n")
    extra = {"ablate": ["--out", tmp_path / "out"], "study": ["--out", tmp_path / "out"]}.get(command, [])
    result = invoke(command, tiny_llama_dir, "-q", "--coords", empty, "--data-dir", DATA_DIR, "--limit", "1",
                    *extra) if command != "ablate" else invoke(command, tiny_llama_dir, "-q", "--coords", empty, *extra)
    assert_one_line_error(result, str(empty), "holds no super weights")
    assert not (tmp_path / "out").exists()


def test_export_of_an_empty_coordinates_file_says_so_without_offering_an_option_it_lacks(tiny_llama_dir, tmp_path):
    """README: a file that holds no super weights is refused by every command (sw export too), in
    words that fit it: export has no --coord, so "give at least one LAYER,ROW,COL" would mislead."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("model: tiny\nsuper_weights: []\n")
    result = invoke("export", empty, "--to", "llama.cpp", "--model", tiny_llama_dir, "-q", "--out", tmp_path / "t.txt")
    assert_one_line_error(result, str(empty), "holds no super weights")
    assert "LAYER,ROW,COL" not in result.output and "--coord" not in result.output
    assert not (tmp_path / "t.txt").exists()


def test_a_bad_coord_value_is_a_usage_error(tmp_path):
    result = invoke("ablate", tmp_path / "no-model", "--coord", "1,2", "--out", tmp_path / "out")
    assert_one_line_error(result, "LAYER,ROW,COL")
    assert result.exit_code == 2
    result = invoke("ablate", tmp_path / "no-model", "--coords", tmp_path / "none.yaml", "--out", tmp_path / "out")
    assert_one_line_error(result, "coordinates file not found")
    assert result.exit_code == 2
    result = invoke("ablate", tmp_path / "no-model", "--coords", tmp_path, "--out", tmp_path / "out")
    assert_one_line_error(result, f"{tmp_path} is a folder, not a coordinates file")  # was "... not found"
    assert result.exit_code == 2


def test_a_file_of_a_model_folder_given_as_model_names_the_folder(tiny_llama_dir):
    for name in ("config.json", "model.safetensors"):  # was "model path not found", of a file that is there
        assert_one_line_error(invoke("detect", tiny_llama_dir / name, "-q"),
                              f"{tiny_llama_dir / name} is a file, not a model directory or a .gguf file; give the "
                              f"folder that holds config.json and the weights ({tiny_llama_dir})")


def test_missing_data_names_the_data_dir_option(tiny_llama_dir, monkeypatch):
    monkeypatch.delenv("SUPERWEIGHT_DATA", raising=False)
    line = assert_one_line_error(invoke("eval", tiny_llama_dir, "-q", "--limit", "1"), "--data-dir", "SUPERWEIGHT_DATA")
    assert "data_dir" not in line


# ----------------------------------------------------------------------------- point 13: piped output


def test_piped_output_never_wraps(tiny_llama_dir, coords_file, tmp_path):
    result = invoke("detect", tiny_llama_dir, "-q", "--out", tmp_path / "c.yaml")  # the tiny model has none
    assert result.exit_code == 0, result.output
    assert ("no layer writes a super activation under the current rule (README: How detection decides; "
            "see --min-spike, --min-concentration, --min-share)") in result.output.splitlines()
    result = invoke("eval", tiny_llama_dir, "-q", "--coords", coords_file, "--compare", "--task", "all",
                    "--limit", "1", "--max-length", "40", "--data-dir", DATA_DIR)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("│")]
    assert len(rows) == 4  # one line per configuration, however wide the table
    assert any("zeroed + activation restored" in row and "winogrande" not in row for row in rows)
    assert len({len(line) for line in result.output.splitlines()[1:]}) == 1  # the whole table, no wrapped cells


# ----------------------------------------------------------------------------- point 15: the small ones


def test_short_help_and_global_options(tiny_llama_dir, tmp_path):
    result = invoke("-h")
    assert result.exit_code == 0 and "Commands" in result.output and "--quiet" in result.output
    assert invoke("eval", "-h").exit_code == 0
    result = invoke("--quiet", "detect", tiny_llama_dir, "--out", tmp_path / "c.yaml")
    assert result.exit_code == 0, result.output
    assert "loaded" not in result.output and "coordinates written" in result.output
    result = invoke("--debug", "detect", tmp_path / "missing.gguf")
    assert result.exception is not None and not isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("command", ["detect", "ablate", "eval", "quantize", "study"])
def test_help_names_values_not_python_types(command):
    text = invoke(command, "--help").output
    for python_type in ("<list[", "<str>", "<path>", "<int>"):
        assert python_type not in text.replace("MODEL <str>", ""), (command, python_type)


def test_ablate_seed_help_is_about_the_random_control():
    text = " ".join(invoke("ablate", "--help").output.split())
    assert "Seed for --control random" in text and "bootstrap" not in text


@pytest.mark.parametrize("task", ["PIQA", "piqa,arc_easy", "Piqa, ARC_EASY"])
def test_task_names_ignore_case_and_split_on_commas(tiny_llama_dir, task):
    result = invoke("eval", tiny_llama_dir, "-q", "--json", "--task", task, "--limit", "1", "--max-length", "40",
                    "--data-dir", DATA_DIR)
    assert result.exit_code == 0, result.output
    expected = ["piqa"] if task == "PIQA" else ["piqa", "arc_easy"]
    [run] = json.loads(result.output)["configurations"]
    assert list(run["results"]) == expected


def test_one_document_is_singular(tiny_llama_dir):
    result = invoke("eval", tiny_llama_dir, "-q", "--limit", "1", "--max-length", "32", "--data-dir", DATA_DIR)
    assert result.exit_code == 0, result.output
    assert "first document of each task" in result.output and "first 1 documents" not in result.output


@pytest.mark.parametrize("command,args,fragment", [
    ("quantize", ["--block-size", "abc"], "got 'abc'"),
    ("quantize", ["--block-size", "64", "--block-size", "x1"], "got 'x1'"),
    ("eval", ["--max-length", "1"], "--max-length"),
    ("study", ["--max-length", "0"], "--max-length"),
    ("quantize", ["--max-length", "-3"], "--max-length"),
])
def test_bad_option_values_exit_2_before_the_model_loads(tmp_path, command, args, fragment):
    result = invoke(command, tmp_path / "no-model-here", "--data-dir", DATA_DIR, *args)
    line = assert_one_line_error(result, fragment)
    assert result.exit_code == 2 and "[" not in line


# ----------------------------------------------------------------------------- point 3: an ablated directory


def test_eval_of_an_ablated_directory_says_what_it_is(tiny_llama_dir, tmp_path):
    out = tmp_path / "no-sw"
    result = invoke("ablate", tiny_llama_dir, "-q", "--coord", "1,3,5", "--coord", "2,4,6", "--out", out)
    assert result.exit_code == 0, result.output
    assert "2 weights zeroed; model written to" in result.output  # given by --coord: nothing measured
    label = f"ablated by superweight: 2 weights zeroed (source {tiny_llama_dir})"
    options = ["-q", "--limit", "1", "--max-length", "32", "--data-dir", DATA_DIR]
    result = invoke("eval", out, *options)
    assert result.exit_code == 0, result.output
    assert label in result.output and "original" not in result.output
    document = json.loads(invoke("eval", out, "--json", *options).output)
    assert [run["name"] for run in document["configurations"]] == [label]
    assert document["configurations"][0]["ablation"]["name"] == label
    assert document["model"]["superweight_ablation"]["coordinates"] == [{"layer": 1, "row": 3, "col": 5},
                                                                         {"layer": 2, "row": 4, "col": 6}]
    [run] = json.loads(invoke("eval", tiny_llama_dir, "--json", *options).output)["configurations"]
    assert run["ablation"]["name"] == "original"


@pytest.mark.parametrize("extra, name", [((), "2 candidates zeroed"),
                                         (("--control", "random"), "2 random weights zeroed"),
                                         (("--mode", "scale", "--factor", "2"), "2 candidates scaled x2")])
def test_eval_names_an_ablated_folder_as_ablate_did(tiny_llama_dir, tmp_path, extra, name):
    """A detection's coordinates without roles are candidates, not super weights; a control is a
    control: the row of `sw eval` on the folder says what `sw ablate` printed, from its record."""
    coords = tmp_path / "c.yaml"  # as `sw detect` without --verify writes them: an iteration, no role
    coords.write_text("super_weights:\n  - {layer: 1, row: 3, col: 5, iteration: 0}\n"
                      "  - {layer: 2, row: 4, col: 6, iteration: 1}\n")
    out = tmp_path / "no-sw"
    result = invoke("ablate", tiny_llama_dir, "-q", "--coords", coords, *extra, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"{name}; model written to" in result.output
    assert json.loads((out / "superweight_ablation.json").read_text())["name"] == name
    result = invoke("eval", out, "-q", "--json", "--limit", "1", "--max-length", "32", "--data-dir", DATA_DIR)
    assert result.exit_code == 0, result.output
    [run] = json.loads(result.output)["configurations"]
    assert run["name"] == f"ablated by superweight: {name} (source {tiny_llama_dir})"


def test_restore_activation_on_an_ablated_directory_works_from_its_record(tiny_llama_dir, tmp_path):
    """The folder's weights are zero, but its superweight_ablation.json holds every original value:
    zeroed-and-restored on the folder equals zeroed-and-restored on the original model."""
    out = tmp_path / "no-sw"
    coords = ["--coord", "1,3,5", "--coord", "2,4,6"]
    assert invoke("ablate", tiny_llama_dir, "-q", *coords, "--out", out).exit_code == 0
    options = ["-q", "--json", "--limit", "1", "--max-length", "32", "--data-dir", DATA_DIR, "--restore-activation", *coords]
    from_folder = invoke("eval", out, *options)
    assert from_folder.exit_code == 0, from_folder.output
    from_original = invoke("eval", tiny_llama_dir, *options)
    assert from_original.exit_code == 0, from_original.output
    ppl = [json.loads(r.output)["configurations"][0]["results"]["wikitext"]["word_perplexity"]
           for r in (from_folder, from_original)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-6)


@pytest.mark.parametrize("command, extra", [
    ("eval", ("--compare", "--limit", "1", "--max-length", "32", "--data-dir", DATA_DIR)),
    ("generate", ("--prompt", "Apple Inc. is", "--max-new-tokens", "3"))])
def test_compare_on_an_ablated_directory_is_the_original_zeroed_and_restored(tiny_llama_dir, tmp_path, command,
                                                                              extra):
    """`--compare` (and `sw generate`, which always compares) on a folder `sw ablate` wrote: its record's
    original values are put back, so the rows are what they say, as on the original model; not the
    folder three times under the names "original", "zeroed" and "restored"."""
    out = tmp_path / "no-sw"
    coords = ["--coord", "1,3,5", "--coord", "2,4,6"]
    assert invoke("ablate", tiny_llama_dir, "-q", *coords, "--out", out).exit_code == 0
    documents = []
    for model in (out, tiny_llama_dir):
        result = invoke(command, model, "-q", "--json", *coords, *extra)
        assert result.exit_code == 0, result.output
        documents.append(json.loads(result.output))
    from_folder, from_original = documents
    assert from_folder["configurations"][0]["name"] == "original (the folder's recorded values put back in memory)"
    assert [c["name"] for c in from_folder["configurations"][1:]] == [c["name"] for c in from_original["configurations"][1:]]
    if command == "eval":
        ppl = [[c["results"]["wikitext"]["word_perplexity"] for c in d["configurations"]] for d in documents]
        assert ppl[0] == pytest.approx(ppl[1], rel=1e-6)
    else:
        assert [g["text"] for g in from_folder["generations"]] == [g["text"] for g in from_original["generations"]]


def ablated_with_roles(model_dir, tmp_path, *extra) -> tuple[Path, Path]:
    """A folder `sw ablate` wrote from a `sw detect --verify` file (an iteration and a role per
    weight), and that file."""
    tmp_path.mkdir(exist_ok=True)
    coords = tmp_path / "verified.yaml"
    coords.write_text("super_weights:\n  - {layer: 1, row: 3, col: 5, iteration: 0, role: super}\n"
                      "  - {layer: 2, row: 4, col: 6, iteration: 1, role: joint}\n")
    out = tmp_path / "no-sw"
    result = invoke("ablate", model_dir, "-q", "--coords", coords, "--select", "set", *extra, "--out", out)
    assert result.exit_code == 0, result.output
    return out, coords


@pytest.mark.parametrize("flag", ["--compare", "--restore-activation", "--control random"])
def test_compare_without_coordinates_on_an_ablated_directory_takes_its_record(tiny_llama_dir, tmp_path, flag):
    """`sw eval DIR --compare` (or --restore-activation) without coordinates, on a folder `sw ablate`
    wrote: its record's weights, in the original its record puts back; the rows, their kinds and
    numbers are those of `sw eval MODEL --compare --coords` with the file the folder was ablated
    from, named by the roles the record keeps; the ablated row is the folder as written."""
    out, coords = ablated_with_roles(tiny_llama_dir, tmp_path)
    options = ["--json", "--limit", "1", "--max-length", "32", "--data-dir", DATA_DIR, *flag.split(), "--select", "set"]
    result = invoke("eval", out, *options)
    assert result.exit_code == 0, result.output
    assert "no coordinates given: acting on the weights" in result.stderr and "[1, 3, 5], [2, 4, 6]" in result.stderr
    from_folder = json.loads(result.stdout)
    from_original = json.loads(invoke("eval", tiny_llama_dir, *options, "--coords", coords).stdout)
    names = [c["name"] for c in from_folder["configurations"]]
    assert [c["kind"] for c in from_folder["configurations"]] == [c["kind"] for c in from_original["configurations"]]
    ppl = [[c["results"]["wikitext"]["word_perplexity"] for c in d["configurations"]] for d in (from_folder, from_original)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-6)
    if flag == "--restore-activation":
        assert names == ["2 super weights zeroed + activation restored"]
        return
    if flag == "--control random":  # its random weights zeroed in the original, not on top of the folder's zeros
        assert names == ["2 random weights zeroed"]
        given = json.loads(invoke("eval", out, *options, "--coords", coords).stdout)["configurations"]
        assert given[0]["results"] == from_original["configurations"][0]["results"]
        control = tmp_path / "random"
        assert invoke("ablate", tiny_llama_dir, "-q", "--coord", "1,3,5", "--control", "random", "--out",
                      control).exit_code == 0
        [on_control] = json.loads(invoke("eval", control, *options, "--coords", coords).stdout)["configurations"]
        assert on_control["name"].startswith("ablated by superweight: 1 random weight zeroed") and \
            on_control["name"].endswith(", then 2 random weights zeroed")  # no original values: on top, and said
        return
    assert names[0] == "original (the folder's recorded values put back in memory)"
    assert names[1:] == [c["name"] for c in from_original["configurations"]][1:]
    assert names[1:3] == ["2 super weights zeroed", "2 super weights zeroed + activation restored"]
    assert from_folder["model"]["superweight_ablation"]["name"] == "2 super weights zeroed"
    [as_written] = json.loads(invoke("eval", out, *options[:-3]).stdout)["configurations"]
    assert ppl[0][1] == pytest.approx(as_written["results"]["wikitext"]["word_perplexity"], rel=1e-6)


def test_an_ablated_directory_is_not_ablated_again(tiny_llama_dir, tmp_path):
    """The second folder's record would hold only its own weights: `sw eval --compare` on it would put
    back those alone and call the result the original. Refused in one line before the load."""
    out = tmp_path / "no-sw"
    assert invoke("ablate", tiny_llama_dir, "-q", "--coord", "1,3,5", "--out", out).exit_code == 0
    result = invoke("ablate", out, "-q", "--coord", "2,4,6", "--out", tmp_path / "twice")
    assert_one_line_error(result, "is ablated by superweight: weight [1, 3, 5] zeroed",
                          "ablate the original model with every weight at once")
    assert result.exit_code == 2 and not (tmp_path / "twice").exists()


def test_a_lone_row_on_an_ablated_directory_is_what_its_name_says(tiny_llama_dir, tmp_path):
    """`sw eval DIR --coords FILE` on a folder ablated with the whole set (both weights zeroed), acting
    on the super weight alone (default --select super): the row "super weight [1, 3, 5] zeroed" is the
    original with that one weight zeroed, as on the original model, not the folder's two zeros."""
    out, coords = ablated_with_roles(tiny_llama_dir, tmp_path)
    options = ["--json", "--limit", "1", "--max-length", "32", "--data-dir", DATA_DIR, "--coords", coords]
    runs = []
    for model in (out, tiny_llama_dir):
        result = invoke("eval", model, *options)
        assert result.exit_code == 0, result.output
        [run] = json.loads(result.stdout)["configurations"]
        runs.append(run)
    assert runs[0]["name"] == runs[1]["name"] == "super weight [1, 3, 5] zeroed"
    assert runs[0]["results"] == runs[1]["results"]
    [as_written] = json.loads(invoke("eval", out, *options[:-2]).stdout)["configurations"]
    assert as_written["results"] != runs[0]["results"]  # the folder's own two zeros differ from one


def test_compare_on_an_ablated_directory_without_coordinates_or_originals(tiny_llama_dir, tmp_path):
    """A record written before it kept roles names the rows by coordinates; a scaled folder is compared
    in the zeroing layout (said in a note); a control's record has no original values to put back,
    and a model that is no such folder has no record: both are refused in one line."""
    options = ["--json", "--limit", "1", "--max-length", "32", "--data-dir", DATA_DIR, "--compare"]
    out, coords = ablated_with_roles(tiny_llama_dir, tmp_path / "old")
    record = json.loads((out / "superweight_ablation.json").read_text())
    record["coordinates"] = [{k: c[k] for k in ("layer", "row", "col")} for c in record["coordinates"]]
    (out / "superweight_ablation.json").write_text(json.dumps(record))
    names = [c["name"] for c in json.loads(invoke("eval", out, *options).stdout)["configurations"]]
    assert names[1:3] == ["2 weights zeroed", "2 weights zeroed + activation restored"]
    out, coords = ablated_with_roles(tiny_llama_dir, tmp_path / "scaled", "--factor", "3")
    result = invoke("eval", out, *options)
    assert result.exit_code == 0, result.output
    assert "scaled these weights; these rows zero them" in result.stderr
    from_original = json.loads(invoke("eval", tiny_llama_dir, *options, "--coords", coords, "--select", "set").stdout)
    assert [[c["name"], c["results"]] for c in json.loads(result.stdout)["configurations"][1:]] == \
        [[c["name"], c["results"]] for c in from_original["configurations"][1:]]
    control = tmp_path / "random"
    assert invoke("ablate", tiny_llama_dir, "-q", "--coord", "1,3,5", "--control", "random", "--out", control).exit_code == 0
    assert_one_line_error(invoke("eval", control, *options), "holds no original values of super weights to put back",
                          "give --coords FILE")
    assert_one_line_error(invoke("eval", tiny_llama_dir, *options), "--compare, --restore-activation and --control "
                          "need --coords FILE or --coord L,R,C")


def test_restore_activation_from_a_record_uses_the_spike_the_coordinates_recorded(byte_llama_dir, tmp_path):
    """The record keeps each weight's recorded output spike, so the super activation is restored
    above the same threshold as with the coordinates file the folder was ablated with (here 0.1 x
    20000: the planted spike of ~1000 is left zeroed; the default floor of 100 would restore it)."""
    layer, row, col = PLANTED.split(",")
    coords = tmp_path / "c.yaml"
    coords.write_text(f"super_weights:\n  - {{layer: {layer}, row: {row}, col: {col}, output_spike: 20000.0}}\n")
    out = tmp_path / "no-sw"
    assert invoke("ablate", byte_llama_dir, "-q", "--coords", coords, "--out", out).exit_code == 0
    assert json.loads((out / "superweight_ablation.json").read_text())["coordinates"][0]["output_spike"] == 20000.0
    options = ["-q", "--json", "--limit", "1", "--max-length", "32", "--data-dir", DATA_DIR, "--restore-activation"]
    ppl = [json.loads(invoke("eval", *args, *options).stdout)["configurations"][0]["results"]["wikitext"]["word_perplexity"]
           for args in ((out,), (byte_llama_dir, "--coords", coords), (out, "--coord", PLANTED))]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-6)
    assert ppl[2] != pytest.approx(ppl[1], rel=1e-3)  # restored above the floor: another number


def test_eval_compare_and_study_of_an_ablated_directory_tell_one_story(byte_llama_dir, tmp_path):
    """`sw eval DIR --compare` and `sw study DIR`, both without coordinates, on a folder `sw ablate`
    wrote: the same original (the record put back), the same weight zeroed, restored and random
    control, the same numbers."""
    out = tmp_path / "no-sw"
    assert invoke("ablate", byte_llama_dir, "-q", "--coord", PLANTED, "--out", out).exit_code == 0
    quick = ["--data-dir", DATA_DIR, "--task", "wikitext", "--limit", "1", "--max-length", "32", "-q", "--json"]
    result = invoke("eval", out, *quick, "--compare")
    assert result.exit_code == 0, result.output
    evaluated = {c["kind"]: c["results"]["wikitext"]["word_perplexity"] for c in json.loads(result.stdout)["configurations"]}
    result = invoke("study", out, *quick, "--grid", "1", "--top", "1", "--out", tmp_path / "study")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["table"]["rows"]
    studied = {row["kind"]: row["values"][0] for row in rows if "outliers" not in row["configuration"]}
    assert studied == pytest.approx(evaluated, rel=1e-6)
    assert evaluated["ablated"] != pytest.approx(evaluated["unchanged"], rel=1e-3)


def test_generate_without_coordinates_on_an_ablated_directory_detects_in_the_original(byte_llama_dir, tmp_path):
    """`sw generate` on a folder `sw ablate` wrote, without coordinates: as `sw study`, the record's
    values are put back and the super weights detected and verified there, so the rows are the
    original and its super weight zeroed, named and decoded as on the original model (before,
    detection ran on the ablated folder, verification refused it as already ablated, and the
    folder's leftover candidates were zeroed under an "ablated by superweight" first row)."""
    out = tmp_path / "no-sw"
    assert invoke("ablate", byte_llama_dir, "-q", "--coord", PLANTED, "--out", out).exit_code == 0
    documents = []
    for model in (out, byte_llama_dir):
        result = invoke("generate", model, "-q", "--json", "--prompt", "Apple Inc. is", "--max-new-tokens", "3")
        assert result.exit_code == 0, result.output
        documents.append(json.loads(result.output))
    from_folder, from_original = documents
    names = [c["name"] for c in from_folder["configurations"]]
    assert names[0] == "original (the folder's recorded values put back in memory)"
    assert names[1:] == [c["name"] for c in from_original["configurations"]][1:]
    assert [g["text"] for g in from_folder["generations"]] == [g["text"] for g in from_original["generations"]]


def test_study_on_an_ablated_directory_is_the_original_zeroed_and_restored(tiny_llama_dir, tmp_path, monkeypatch):
    """`sw study` on a folder `sw ablate` wrote: every value its record holds is put back (also of
    a weight the study does not act on), so Table 1 and the sweep are those of the original model,
    the first row named so; and the folder's own cached results, keyed by the same files, are not
    taken for the original's."""
    from superweight.coords import SuperWeight
    from superweight.edit.ablate import ablated_name
    from superweight.measure.configurations import Configuration
    from superweight.measure.study_runs import EvaluationCache
    from superweight.model.load import model_fingerprint
    from superweight.model.options import LoadOptions

    cache = tmp_path / "cache"
    monkeypatch.setenv("SUPERWEIGHT_CACHE", str(cache))
    out = tmp_path / "no-sw"
    assert invoke("ablate", tiny_llama_dir, "-q", "--coord", "1,3,5", "--coord", "2,4,6", "--out", out).exit_code == 0
    quick = ["--data-dir", DATA_DIR, "--task", "wikitext", "--limit", "1", "--max-length", "32", "--grid", "0,1",
             "--top", "5", "--coord", "1,3,5", "-q", "--json"]
    # what a study of the folder as it is left in the cache: its 'original' is the ablated folder
    as_it_is = model_fingerprint(LoadOptions().load(str(out)))
    stale = {"results": {"word_perplexity": 12345.0}, "n_samples": 1, "data_sha256": {}, "config": None}
    EvaluationCache(cache / "evaluations").put(EvaluationCache.key(as_it_is, Configuration("original"), "wikitext",
                                                                   1, 32), stale)
    documents = []
    for model in (out, tiny_llama_dir):
        result = invoke("study", model, *quick, "--out", tmp_path / f"study-{model.name}")
        assert result.exit_code == 0, result.output
        documents.append(json.loads(result.output))
    from_folder, from_original = documents
    names = [row["configuration"] for row in from_folder["table"]["rows"]]
    assert names[0] == "original (the folder's recorded values put back in memory)"
    assert names[1:] == [row["configuration"] for row in from_original["table"]["rows"]][1:]
    assert names[1] == ablated_name([SuperWeight(1, 3, 5)])
    assert from_folder["meta"]["evaluations"]["from_cache"] == 2  # the sweep's x0 and x1; not the stale entry
    # what the folder is, as sw eval's JSON says it, and in the report's model lines
    assert from_folder["meta"]["model"]["superweight_ablation"]["name"] == ablated_name([SuperWeight(1, 3, 5),
                                                                                         SuperWeight(2, 4, 6)])
    assert from_original["meta"]["model"]["superweight_ablation"] is None
    report = (tmp_path / f"study-{out.name}" / "REPORT.md").read_text()
    assert "- The folder is ablated by superweight: " in report and "put back in memory" in report
    values = [[row["values"][0] for row in d["table"]["rows"]] for d in documents]
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    assert [r["perplexity"] for r in from_folder["sweep"]] == pytest.approx(
        [r["perplexity"] for r in from_original["sweep"]], rel=1e-6)
    assert from_folder["stop_words"]["stop_mass_original"] == pytest.approx(
        from_original["stop_words"]["stop_mass_original"], rel=1e-6)


def test_study_refuses_an_ablated_directory_whose_record_holds_no_original_to_put_back(tiny_llama_dir, tmp_path):
    """A control's record puts back no values: a study of that folder would call it the original."""
    out = tmp_path / "random"
    assert invoke("ablate", tiny_llama_dir, "-q", "--coord", "1,3,5", "--control", "random", "--out", out).exit_code == 0
    assert_one_line_error(invoke("study", out, "-q", "--data-dir", DATA_DIR, "--task", "wikitext", "--limit", "1",
                                 "--coord", "1,3,5", "--out", tmp_path / "study"),
                          "holds no original values of super weights to put back", "study the original model")


def test_a_wrapped_ablated_folder_is_left_ablated_after_its_record_was_used(tiny_llama_dir, tmp_path):
    """The recorded original values are put back for the command only: a model in memory, read
    from a folder `sw ablate` wrote, holds its ablated values again afterwards, even on an error."""
    import torch
    import transformers

    import superweight

    out = tmp_path / "no-sw"
    assert invoke("ablate", tiny_llama_dir, "-q", "--coord", "1,3,5", "--out", out).exit_code == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    loaded = superweight.wrap(model, transformers.AutoTokenizer.from_pretrained(out))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quick = dict(coord=["1,3,5"], task=["wikitext"], limit=1, max_length=32, data_dir=str(DATA_DIR))
    superweight.evaluate_model(loaded, restore_activation=True, **quick)
    superweight.evaluate_model(loaded, compare=True, **quick)
    superweight.generate_text(loaded, coord=["1,3,5"], prompt="Apple", max_new_tokens=1)
    superweight.run_study(loaded, coord=["1,3,5"], task=["wikitext"], limit=1, max_length=32, grid="1", top=1,
                          data_dir=str(DATA_DIR), out=tmp_path / "study")

    class Interrupted(superweight.Reporter):  # the evaluation stops after the values were put back
        def bars(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        superweight.evaluate_model(loaded, compare=True, reporter=Interrupted(), **quick)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_restore_activation_refuses_a_folder_changed_after_its_record(tiny_llama_dir, tmp_path):
    """A weight that no longer holds what the record says the ablation left means the record no
    longer tells the folder's story: refused, never written over with the recorded original."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "no-sw"
    assert invoke("ablate", tiny_llama_dir, "-q", "--coord", "1,3,5", "--out", out).exit_code == 0
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = 7.0
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    options = ["-q", "--limit", "1", "--max-length", "32", "--data-dir", DATA_DIR, "--restore-activation"]
    assert_one_line_error(invoke("eval", out, *options, "--coord", "1,3,5"),
                          "records the weight as 0 after the ablation, but this model holds 7", "ablate the original")


def test_describe_recorded_ablation():
    from superweight.edit.save import describe_recorded_ablation

    record = {"source": {"spec": "m"}, "name": "5 candidates zeroed", "coordinates": [{}] * 5, "mode": "zero",
              "factor": 0.0, "control": None}
    assert describe_recorded_ablation(record) == "ablated by superweight: 5 candidates zeroed (source m)"
    # Records written before they kept a name (nor roles) are named from coordinates and control.
    coordinates = [{"layer": 1, "row": 3, "col": 5}, {"layer": 2, "row": 4, "col": 6}]
    old = {"source": {"spec": "m"}, "coordinates": coordinates, "mode": "zero", "factor": 0.0, "control": None}
    assert describe_recorded_ablation(old) == "ablated by superweight: 2 weights zeroed (source m)"
    old = {"source": {"spec": "m"}, "coordinates": coordinates[:1], "mode": "zero", "factor": 0.0,
           "control": {"kind": "random", "seed": 0}}
    assert describe_recorded_ablation(old) == "ablated by superweight: 1 random weight zeroed (source m)"
    old = {"source": {"spec": "m"}, "coordinates": [{}] * 7, "mode": "scale", "factor": 2.5,
           "control": {"kind": "outliers", "top": 7}}
    assert describe_recorded_ablation(old) == "ablated by superweight: other 7 outliers scaled x2.5 (source m)"
    assert "unreadable" in describe_recorded_ablation({"unreadable": "x"})


# ----------------------------------------------------------------------------- point 14: a study without wikitext


def png_width(path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")


def test_a_sweep_without_wikitext_has_no_empty_perplexity_panel_or_column(tmp_path):
    from superweight.report.study import SWEEP_PLOT, write_report

    accuracy_only = [{"factor": 0.0, "perplexity": None, "avg_acc": 0.0},
                     {"factor": 1.0, "perplexity": None, "avg_acc": 1.0}]
    write_report(tmp_path / "acc", sweep_rows=accuracy_only)
    report = (tmp_path / "acc" / "REPORT.md").read_text()
    assert "perplexity" not in report
    assert "| 0 | 0 |" in report and "| 1 | 1 |" in report  # 4 significant digits, as in Table 1
    both = [dict(r, perplexity=10.0 + r["factor"]) for r in accuracy_only]
    write_report(tmp_path / "both", sweep_rows=both)
    assert "| 0 | 10 | 0 |" in (tmp_path / "both" / "REPORT.md").read_text()
    assert png_width(tmp_path / "acc" / SWEEP_PLOT) < 0.6 * png_width(tmp_path / "both" / SWEEP_PLOT)  # one panel


# ----------------------------------------------------------------------------- point 2: quantize reports every task


def test_quantize_reports_the_accuracy_of_a_task_without_perplexity(tiny_llama_dir, tmp_path):
    options = ["-q", "--coord", "1,3,5", "--task", "piqa", "--block-size", "64", "--data-dir", DATA_DIR,
               "--limit", "2", "--max-length", "40"]
    result = invoke("quantize", tiny_llama_dir, "--json", *options, "--plot", tmp_path / "rtn.png")
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    (row,) = document["weights"]
    for scheme in ("naive", "aware"):
        assert 0 <= row[scheme]["piqa"]["acc"] <= 1 and "acc_norm" in row[scheme]["piqa"]
    assert 0 <= document["unquantized"]["piqa"]["acc"] <= 1
    assert png_width(tmp_path / "rtn.png") > 1000  # a panel for acc and one for acc_norm
    result = invoke("quantize", tiny_llama_dir, *options)
    assert result.exit_code == 0, result.output
    assert "piqa acc" in result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.startswith("│")}
    assert set(rows) == {"unquantized", "naive, block 64", "aware, block 64"}
    assert all(f"{row[s]['piqa']['acc']:.4f}" in rows[f"{s}, block 64"] for s in ("naive", "aware"))


def test_quantize_says_when_it_quantizes_an_ablated_folder(tiny_llama_dir, tmp_path):
    """A folder `sw ablate` wrote is quantized as written: its 'unquantized' row is that folder, which
    stderr and the JSON's model.superweight_ablation say, as sw eval's do."""
    out = tmp_path / "no-sw"
    assert invoke("ablate", tiny_llama_dir, "-q", "--coord", "1,3,5", "--out", out).exit_code == 0
    options = ["--json", "--coord", "1,3,5", "--block-size", "64", "--data-dir", DATA_DIR, "--limit", "1",
               "--max-length", "32"]
    result = invoke("quantize", out, *options)
    assert result.exit_code == 0, result.output
    assert "is ablated by superweight: weight [1, 3, 5] zeroed" in result.stderr
    assert "'unquantized' is this folder, not the original model" in result.stderr
    assert json.loads(result.stdout)["model"]["superweight_ablation"]["coordinates"][0]["layer"] == 1
    plain = invoke("quantize", tiny_llama_dir, *options)
    assert "ablated" not in plain.stderr and json.loads(plain.stdout)["model"]["superweight_ablation"] is None


@pytest.mark.parametrize("command", ["ablate", "eval", "study", "quantize"])
def test_out_of_range_coordinates_fail_before_the_weights_load(tiny_llama_dir, tmp_path, monkeypatch, command):
    import superweight.model.load

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(superweight.model.load, "load_model", no_load)
    extra = ["--out", tmp_path / "out"] if command in ("ablate", "study") else ["--data-dir", DATA_DIR]
    if command == "study":
        extra += ["--data-dir", DATA_DIR]
    result = invoke(command, tiny_llama_dir, "-q", "--coord", "1,3,64", *extra)  # 64 input channels: 0..63
    assert_one_line_error(result, "col 64 is out of range")
    assert not (tmp_path / "out").exists()


def test_unknown_device_fails_before_the_load(tiny_llama_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_load)
    result = invoke("detect", tiny_llama_dir, "-q", "--device", "bogus")
    assert_one_line_error(result, "unknown --device 'bogus'")
    assert result.exit_code == 2


def test_a_typed_coordinate_out_of_range_is_not_blamed_on_a_file(tiny_llama_dir, tmp_path):
    """--coord L,R,C names no file: "was the file made for another model?" misled."""
    result = invoke("ablate", tiny_llama_dir, "--coord", "99,1,1", "--out", tmp_path / "out", "-q")
    assert_one_line_error(result, "layer 99 is out of range", "made for another model")
    assert "the file" not in result.output
