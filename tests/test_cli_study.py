"""`sw study` through the CLI on a tiny local model: the report, the cache, and one-line errors."""

import json

import pytest

from conftest import DATA_DIR
from test_cli import assert_one_line_error, invoke

COORD = ("--coord", "1,3,5")
QUICK = ("--data-dir", DATA_DIR, "--limit", "1", "--max-length", "64", "-q")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERWEIGHT_CACHE", str(tmp_path / "cache"))


def test_study_writes_report_and_reuses_cached_evaluations(tiny_llama_dir, tmp_path):
    out = tmp_path / "study"
    args = ("study", tiny_llama_dir, *COORD, *QUICK, "--task", "wikitext", "--task", "piqa", "--grid", "0,1,2",
            "--top", "5", "--out", out, "--json")
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    document = json.loads(first.output)
    assert sorted(p.name for p in out.iterdir()) == ["REPORT.md", "activation_profile.png", "report.json",
                                                       "scale_sweep.png", "stop_words.png"]
    assert json.loads((out / "report.json").read_text()) == document
    rows = {row["configuration"]: row for row in document["table"]["rows"]}
    # rows named by what they zeroed, as `sw eval --coord 1,3,5` names them: a weight given by
    # coordinate is a "weight" (README: Vocabulary), whatever role the study measures for it
    assert list(rows) == ["original", "weight [1, 3, 5] zeroed", "other 5 outliers zeroed",
                          "weight [1, 3, 5] zeroed + activation restored", "1 random weight zeroed"]
    assert [row["kind"] for row in rows.values()] == ["unchanged", "ablated", "control", "restored", "control"]
    assert document["table"]["columns"][:1] == ["wikitext word_perplexity"]
    assert [r["factor"] for r in document["sweep"]] == [0.0, 1.0, 2.0]
    # s = 0 is the zeroed row and s = 1 the original: the same evaluations, not new ones
    by_factor = {r["factor"]: r["perplexity"] for r in document["sweep"]}
    assert by_factor[1.0] == pytest.approx(rows["original"]["values"][0], rel=1e-3)
    assert by_factor[0.0] == pytest.approx(rows["weight [1, 3, 5] zeroed"]["values"][0], rel=1e-3)
    evaluations = document["meta"]["evaluations"]
    assert evaluations == {"total": 2 * 8, "from_cache": 2 * 2}
    assert document["super_weights"][0] | {"layer": 1, "row": 3, "col": 5} == document["super_weights"][0]
    assert 0 < document["stop_words"]["stop_mass_original"] <= 1
    report = (out / "REPORT.md").read_text()
    for heading in ("## Super weights", "## Table 1", "## Generations", "## Scaling the weight [1, 3, 5]",
                    "## Stop-word shift", "## Activation profile"):
        assert heading in report
    # the roles were measured on the text that comes with the tool, named in words, not by its internal label
    assert "Perplexity on the sample paragraph that comes with superweight (configs/verify_text.txt) (" in report
    generations = document["generations"]
    assert [g["configuration"] for g in generations] == list(rows)  # every Table 1 row, one prompt
    assert {g["prompt"] for g in generations} == {"My favourite condiment is"}
    assert all(repr(g["text"]).replace("|", "\\|") in report for g in generations)

    second = invoke(*args[:-1], "--force", "--json")
    assert second.exit_code == 0, second.output
    again = json.loads(second.output)
    assert again["meta"]["evaluations"] == {"total": 16, "from_cache": 16}  # nothing evaluated again
    assert again["table"] == document["table"] and again["sweep"] == document["sweep"]


def test_study_table_on_stdout(tiny_llama_dir, tmp_path):
    out = tmp_path / "study"
    result = invoke("study", tiny_llama_dir, *COORD, *QUICK, "--task", "wikitext", "--grid", "0,1", "--top", "3",
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert "original" in result.output and "configuration" in result.output and f"report written to {out / 'REPORT.md'}" in result.output


@pytest.mark.parametrize("args,fragment", [
    (["--grid", "0,x,1"], "--grid"),
    (["--grid", ""], "--grid"),
    (["--task", "nosuchtask"], "nosuchtask"),
    (["--task", ""], "no task"),
    (["--limit", "0"], "--limit"),
    (["--top", "0"], "--top"),
    (["--batch-size", "many"], "--batch-size"),
])
def test_bad_study_options(tiny_llama_dir, tmp_path, args, fragment):
    out = tmp_path / "study"
    assert_one_line_error(invoke("study", tiny_llama_dir, *COORD, *QUICK, "--out", out, *args), fragment)
    assert not out.exists()


def test_study_refuses_non_empty_and_unwritable_out(tiny_llama_dir, tmp_path):
    out = tmp_path / "study"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert_one_line_error(invoke("study", tiny_llama_dir, *COORD, *QUICK, "--out", out), "not empty", "--force")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(invoke("study", tiny_llama_dir, *COORD, *QUICK, "--out", blocker / "study"), "cannot write")
    assert_one_line_error(invoke("study", tiny_llama_dir, *COORD, *QUICK, "--out", tiny_llama_dir / "study"),
                          "model")
    assert not (tiny_llama_dir / "study").exists()


def test_study_shows_every_stage_and_caches_the_stop_word_shift(tiny_llama_dir, tmp_path, monkeypatch):
    from superweight.measure import stop_words

    out = tmp_path / "study"
    args = ("study", tiny_llama_dir, *COORD, "--data-dir", DATA_DIR, "--limit", "1", "--max-length", "16",
            "--task", "wikitext", "--grid", "0,1", "--top", "3", "--out", out, "--json")
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    for stage in ("original: wikitext", "weight [1, 3, 5] zeroed: wikitext", "stop-word shift", "activation profile",
                  f"writing {out}"):
        assert stage in first.stderr, (stage, first.stderr)
    shift = json.loads(first.stdout)["stop_words"]
    assert shift["num_positions"] <= 16  # --limit 1 document, --max-length 16 tokens of it

    def no_forward_pass(*args, **kwargs):
        raise AssertionError("the stop-word shift ran again on a cached rerun")

    monkeypatch.setattr(stop_words, "_mean_next_token_probs", no_forward_pass)
    second = invoke(*args, "--force")
    assert second.exit_code == 0, second.output
    assert "stop-word shift (from the cache)" in second.stderr
    again = json.loads(second.stdout)
    assert again["stop_words"] == shift and again["meta"]["evaluations"]["from_cache"] == again["meta"]["evaluations"]["total"]


def test_cpu_study_without_limit_reads_the_cpu_budget_and_says_so(tiny_llama_dir, tmp_path, monkeypatch):
    from superweight.measure import study_runs

    monkeypatch.setattr(study_runs, "CPU_LIMIT", 3)  # the budget's shape, on a tiny scale
    monkeypatch.setattr(study_runs, "CPU_WIKITEXT_LIMIT", 1)
    out = tmp_path / "study"
    result = invoke("study", tiny_llama_dir, *COORD, "--data-dir", DATA_DIR, "--max-length", "40", "--device", "cpu",
                    "--task", "wikitext", "--task", "piqa", "--grid", "0,1", "--top", "3", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["meta"]["documents"] == {"wikitext": 1, "piqa": 3} and document["meta"]["cpu_budget"] is True
    assert "the first document of wikitext; the first 3 documents of piqa" in result.stderr
    report = (out / "REPORT.md").read_text()
    assert "Documents read: the first document of wikitext; the first 3 documents of piqa (the CPU budget" in report
    assert "--limit all reads every document" in report
    # an explicit --limit is what every task reads, on a CPU too, and the report says that instead
    again = invoke("study", tiny_llama_dir, *COORD, "--data-dir", DATA_DIR, "--max-length", "40", "--limit", "2",
                   "--task", "wikitext", "--task", "piqa", "--grid", "0,1", "--top", "3", "--out", out, "--force",
                   "--json")
    assert again.exit_code == 0, again.output
    meta = json.loads(again.stdout)["meta"]
    assert meta["documents"] == {"wikitext": 2, "piqa": 2} and meta["cpu_budget"] is False
    assert "Documents read: the first 2 documents of each task." in (out / "REPORT.md").read_text()


def test_study_limit_must_be_a_number_or_all(tiny_llama_dir, tmp_path):
    out = tmp_path / "study"
    assert_one_line_error(invoke("study", tiny_llama_dir, *COORD, "--data-dir", DATA_DIR, "--limit", "some",
                                 "--out", out), "--limit", "all")
    assert not out.exists()
