"""Issue 21, points 5, 9, 10, 12: one rule for existing outputs, tables that keep their numbers in
80 columns, help that reads alike for every command, progress that stays readable."""

import json
import re

import pytest
from typer.testing import CliRunner

from superweight.cli import app
from test_cli import assert_one_line_error, invoke

COMMANDS = ["detect", "ablate", "eval", "generate", "export", "quantize", "study", "known"]


def help_text(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    return result.output


# ----------------------------------------------------------------------------- point 10: --help


def test_top_level_help_cuts_no_summary():
    text = help_text()
    commands = text.split("Commands:")[1]
    assert "..." not in commands, commands
    for name in COMMANDS:
        assert re.search(rf"^\s+{name}\s+\S", commands, re.M), name


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_shows_metavars_each_default_once_and_whole_examples(command):
    text = help_text(command)
    raw_types = re.findall(r"<(?:str|int|float|bool|path|file|dir|list\[[^\]]*\])>", text)
    assert not raw_types, (raw_types, text)
    assert not re.search(r"\{[A-Z_]+\}", text), text  # Typer's {NAME} for a required argument
    # Each option's help, joined over its wrapped lines, says its default once.
    options = re.split(r"\n  (?=-)", text.split("Options:", 1)[1])
    for option in options:
        flat = " ".join(option.split())
        assert not ("(default" in flat and "[default:" in flat), flat
    # Every example is one whole command line.
    if "Examples:" in text:
        examples = text.split("Examples:", 1)[1].split("Arguments:")[0].split("Options:")[0]
        for line in filter(str.strip, examples.splitlines()):
            assert line.strip().startswith("sw "), (line, examples)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_names_its_values_and_says_only_what_applies_to_its_command(command):
    """Typer's generic TEXT hides the choices (`sw generate --control TEXT` beside `sw eval --control
    random|outliers`), sw export has no --coord and no detection for --select to speak of, and
    --plot writes what its suffix names."""
    text = help_text(command)
    if "--control" in text:
        assert "--control random|outliers" in text, text
    if "  --plot" in text:  # README: the plot's format is its suffix, not always PNG
        plot = " ".join(text.split("  --plot", 1)[1].split("\n  -")[0].split())
        assert "suffix" in plot and ".pdf" in plot, plot
    if command == "export":
        select = " ".join(text.split("--select", 1)[1].split("\n  -")[0].split())
        assert "--coord" not in select and "detection" not in select, select


def test_generate_seed_says_what_it_seeds():
    # generate computes no bootstrap errors: its --seed seeds the random control only
    seed = " ".join(help_text("generate").split("--seed", 1)[1].split("\n  -")[0].split())
    assert "bootstrap" not in seed, seed


@pytest.mark.parametrize("command", ["ablate", "eval"])
def test_top_is_optional_with_the_study_default(command):
    text = " ".join(help_text(command).split())
    assert "--top N With --control outliers: how many weights (default:" in text, text


def test_outlier_control_without_top_takes_the_study_count(tiny_llama_dir, tmp_path):
    from superweight.edit.ablate import outlier_control  # noqa: F401  (the count it is given is recorded)
    from superweight.measure.study_runs import default_outlier_count
    from superweight.model.load import load_model

    result = invoke("ablate", tiny_llama_dir, "--coord", "1,3,5", "--control", "outliers", "--out",
                    tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "superweight_ablation.json").read_text())
    expected = default_outlier_count(load_model(str(tiny_llama_dir)).model)
    assert record["control"]["top"] == expected, record
    assert_one_line_error(invoke("ablate", tiny_llama_dir, "--coord", "1,3,5", "--control", "outliers", "--top", "0",
                                 "--out", tmp_path / "out2"), "--top must be a positive")


# ----------------------------------------------------------------------------- point 5: existing outputs


def test_detect_keeps_an_existing_coordinates_file_without_force(tiny_llama_dir, tmp_path):
    out = tmp_path / "c.yaml"
    out.write_text("# my verified roles\n")
    assert_one_line_error(invoke("detect", tiny_llama_dir, "-q", "--out", out), "exists", "--force")
    assert out.read_text() == "# my verified roles\n"
    result = invoke("detect", tiny_llama_dir, "-q", "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert "super_weights" in out.read_text()


def test_sw_keeps_its_default_outputs_the_library_leaves_to_its_caller(tiny_llama_dir, tmp_path, monkeypatch):
    """`sw detect` without --out writes ./<model>.superweights.yaml, and `sw study` writes to
    ./<model>-study (a full one is refused before any work): the CLI passes the defaults that
    `detect_model` and `run_study` do not assume."""
    from conftest import DATA_DIR
    from superweight.commands.prepare import slug

    monkeypatch.chdir(tmp_path)
    name = slug(str(tiny_llama_dir))
    result = invoke("detect", tiny_llama_dir, "-q")
    assert result.exit_code == 0, result.output
    assert f"coordinates written to {name}.superweights.yaml" in result.output
    assert "super_weights" in (tmp_path / f"{name}.superweights.yaml").read_text()
    (tmp_path / f"{name}-study").mkdir()
    (tmp_path / f"{name}-study" / "REPORT.md").write_text("an earlier report\n")
    assert_one_line_error(invoke("study", tiny_llama_dir, "-q", "--task", "wikitext", "--data-dir", DATA_DIR),
                          f"{name}-study exists and is not empty", "--force")


def test_detect_refuses_one_file_for_both_coordinates_and_plot(tiny_llama_dir, tmp_path, monkeypatch):
    """`--out x.png --plot x.png` wrote the coordinates, then the plot over them: one output lost."""
    monkeypatch.chdir(tmp_path)
    result = invoke("detect", tiny_llama_dir, "--out", "x.png", "--plot", tmp_path / "x.png", "--force")
    assert_one_line_error(result, f"two outputs of this command are {tmp_path / 'x.png'}; give each its own file name")
    assert result.exit_code == 2 and "loaded" not in result.output and not (tmp_path / "x.png").exists()


def test_export_keeps_an_existing_file_without_force(tmp_path):
    coords = tmp_path / "c.yaml"
    coords.write_text("model: smollm2-135m\nsuper_weights:\n  - {layer: 3, row: 124, col: 405}\n")
    out = tmp_path / "skip.json"
    out.write_text("mine")
    assert_one_line_error(invoke("export", coords, "--to", "bitsandbytes", "--out", out, "-q"), "exists", "--force")
    assert out.read_text() == "mine"


# ----------------------------------------------------------------------------- point 9: 80 columns


README_ROWS = [("1", "507", "83", "-4.375", "-28.32", "186.9", "0.76", "0.66", "230.1", "0", "0", "inert"),
               ("2", "507", "90", "5.094", "63.65", "496.9", "0.94", "0.65", "723.2", "0", "0", "joint"),
               ("11", "507", "1229", "5.876", "2996", "2.402e+04", "0.99", "0.73", "2.406e+04", "0", "0", "super"),
               ("2", "507", "430", "-5.312", "-63.21", "328.3", "0.61", "1.02", "426.4", "0", "1", "joint"),
               ("11", "507", "1487", "6.066", "334.4", "2045", "0.86", "0.99", "1743", "0", "1", "inert")]


@pytest.mark.parametrize("labels", [False, True])
def test_detect_table_keeps_every_number_and_header_whole_in_80_columns(labels):
    import io

    from rich.console import Console

    from superweight.cli.options import fitted_tables

    columns = ("layer", "row", "col", "weight", "input act.", "write", "conc.", "share", "lands on", "token",
               "iter.", "role")
    rows = [r if labels else r[:-1] for r in README_ROWS]
    columns = columns if labels else columns[:-1]
    console = Console(width=80, file=io.StringIO(), record=True)
    for table in fitted_tables("Candidates of smollm2-135m (5 found)", columns, rows, (), 3, 80):
        console.print(table)
    text = console.export_text()
    assert "…" not in text, text
    assert all(len(line) <= 80 for line in text.splitlines()), text
    cells = [line.split() for line in text.splitlines()]
    for row in rows:  # each row's numbers appear whole, after its layer, row, col
        printed = [c for c in cells if c[:3] == list(row[:3])]
        assert printed and sum((c[3:] for c in printed), []) == list(row[3:]), (row, text)
    for header in columns:
        assert header in text, (header, text)


# ----------------------------------------------------------------------------- point 12: progress, share


def test_long_progress_labels_keep_their_end():
    from superweight.cli.app import keep_end

    label = "evaluating configuration 3/4, super weight [11, 507, 1229] zeroed + activation restored: piqa"
    assert keep_end(label, 30).endswith(": piqa") and len(keep_end(label, 30)) == 30
    assert keep_end("short", 30) == "short"


def test_status_piped_to_a_file_prints_each_stage_as_a_line(monkeypatch):
    import io

    from rich.console import Console

    import importlib

    cli_app = importlib.import_module("superweight.cli.app")  # the package's `app` is the Typer app

    log = io.StringIO()
    monkeypatch.setattr(cli_app, "stderr", Console(file=log, width=80))  # a file: not a terminal
    session = cli_app.Session(quiet=False, debug=False)
    with session.status("loading smollm2-135m") as update:
        update("verifying: alone zeroed [11, 507, 1229]")
        update("verifying: alone zeroed [11, 507, 1229]")
        update("verifying: " + "x" * 100 + " restored: piqa")
    with session.bars() as bar:
        for done in range(4):
            bar("evaluating: piqa", done, 3)
    lines = log.getvalue().splitlines()
    assert lines[:2] == ["loading smollm2-135m", "verifying: alone zeroed [11, 507, 1229]"], lines
    assert lines[2].endswith("restored: piqa")
    assert lines[3:] == ["evaluating: piqa: 0/3", "evaluating: piqa: 3/3"], lines


def test_detect_explains_a_share_above_one(monkeypatch):
    from superweight.cli.find import SHARE_ABOVE_ONE

    assert "share > 1" in SHARE_ABOVE_ONE and "work against it" in SHARE_ABOVE_ONE
    readme = (__import__("pathlib").Path(__file__).parents[1] / "README.md").read_text()
    how = readme.split("### How detection decides", 1)[1].split("###", 1)[0]
    assert "It can exceed 1" in how and "working against it" in how
