"""Issue 21.1: every number a table shows carries its standard error; report.json and the library
hold numbers; where --limit leaves a difference smaller than its error, the output says so."""

import json

from conftest import DATA_DIR
from test_cli import invoke

from superweight.measure.configurations import summary_table
from superweight.report.study import write_report


def run(acc, acc_stderr, perplexity, kind="unchanged"):
    return {"results": {"wikitext": {"word_perplexity": perplexity, "word_perplexity_stderr": "N/A"},
                        "piqa": {"acc": acc, "acc_stderr": acc_stderr, "acc_norm": acc, "acc_norm_stderr": "N/A"}},
            "ablation": {"kind": kind}}


ZEROED = "super weight [11, 507, 1229] zeroed"
RUNS = {"original": run(0.6, 0.2449, 30.5), ZEROED: run(0.8, 0.2, 1.3e7, "ablated")}


def test_the_table_holds_numbers_with_their_errors_and_shows_them_as_lm_eval_does():
    table = summary_table(RUNS)
    assert table.columns == ["configuration", "wikitext word_perplexity", "piqa acc", "piqa acc_norm"]
    assert table.names == ["original", ZEROED] and table.kinds == ["unchanged", "ablated"]
    assert table.values[0] == [30.5, 0.6, 0.6] and table.stderrs[0] == [None, 0.2449, None]
    assert table.rows[0] == ["original", "30.500", "0.6000 ± 0.2449", "0.6000"]
    document = table.to_dict()
    assert document["rows"][1] == {"configuration": ZEROED, "kind": "ablated", "values": [1.3e7, 0.8, 0.8],
                                   "stderrs": [None, 0.2, None]}
    json.dumps(document)  # numbers and nulls only


def test_a_difference_within_its_error_is_noted_with_the_limit():
    table = summary_table(RUNS)
    assert table.limit_notes(None) == []
    assert table.limit_notes("--limit 5") == [
        "with --limit 5, these differ from original by less than their standard error:", f"- piqa acc: {ZEROED}"]
    far = summary_table({"original": run(0.9, 0.01, 30.0), "zeroed": run(0.3, 0.01, 90.0)})
    assert far.limit_notes("--limit 5") == []


def test_the_average_accuracy_carries_the_error_of_a_mean_of_tasks():
    runs = {"original": {"results": {"piqa": {"acc": 0.5, "acc_stderr": 0.3},
                                     "arc_easy": {"acc": 0.7, "acc_stderr": 0.4}}}}
    table = summary_table(runs)
    assert table.columns[-1] == "avg acc"
    assert table.values[0][-1] == 0.6 and abs(table.stderrs[0][-1] - 0.25) < 1e-12
    assert table.rows[0][-1] == "0.6000 ± 0.2500"


def test_report_json_holds_numbers_and_report_md_shows_the_errors(tmp_path):
    write_report(tmp_path / "study", table=summary_table(RUNS), meta={"limit": 5})
    document = json.loads((tmp_path / "study" / "report.json").read_text())
    assert document["table"]["rows"][0]["values"] == [30.5, 0.6, 0.6]
    assert document["table"]["rows"][0]["stderrs"][1] == 0.2449
    report = (tmp_path / "study" / "REPORT.md").read_text()
    assert "| original | 30.5 | 0.6 ± 0.2449 | 0.6 |" in report
    assert "Note: with --limit 5, these differ from original by less than their standard error:\n\n- piqa acc: " \
        f"{ZEROED}\n" in report
    assert "1.3e+07" in report


def test_report_md_explains_the_errors_only_where_it_shows_one(tmp_path):
    """With one document per task (`--limit 1`) no metric has a standard error: REPORT.md then does
    not explain a ± that its Table 1 does not show."""
    one = {"original": run(1.0, "N/A", 30.5), ZEROED: run(0.0, "N/A", 1.3e7, "ablated")}
    write_report(tmp_path / "one", table=summary_table(one), meta={"limit": 1})
    assert "±" not in (tmp_path / "one" / "REPORT.md").read_text()
    write_report(tmp_path / "five", table=summary_table(RUNS), meta={"limit": 5})
    assert "± is the standard error over the documents read" in (tmp_path / "five" / "REPORT.md").read_text()


def test_sw_eval_compare_prints_errors_and_the_limit_note(tiny_llama_dir, tmp_path):
    coords = tmp_path / "coords.yaml"
    coords.write_text("super_weights:\n  - {layer: 1, row: 3, col: 5}\n")
    result = invoke("eval", tiny_llama_dir, "-q", "--coords", coords, "--compare", "--task", "piqa", "--limit", "4",
                    "--max-length", "40", "--data-dir", DATA_DIR)
    assert result.exit_code == 0, result.output
    assert "±" in result.output
    document = json.loads(invoke("eval", tiny_llama_dir, "-q", "--coords", coords, "--compare", "--task", "piqa",
                                 "--limit", "4", "--max-length", "40", "--data-dir", DATA_DIR, "--json").output)
    from superweight.measure.configurations import summary_table as table_of

    table = table_of({run["name"]: run for run in document["configurations"]})
    notes = table.limit_notes("--limit 4")
    assert notes[0] == "with --limit 4, these differ from original by less than their standard error:"
    assert notes[1].startswith("- piqa acc: ")
    assert f"note: {notes[0]}" in result.output
    for note in notes[1:]:
        assert f"  {note}" in result.output
