"""Comparison with published coordinates, tables and plots."""

from superweight.coords import SuperWeight
from superweight.find.detect import detect
from superweight.report.detection import check_known, super_weight_table
from superweight.report.plots import plot_activations
from synthetic import PROMPT_IDS, one_thread_per_module, plant_super_weight, tiny_model  # noqa: F401


def test_known_check_verdicts():
    exact = [SuperWeight(2, 3968, 7003)]
    assert check_known(exact, "llama-7b").entries[0].verdict == "agrees"
    assert check_known(exact, None, "huggyllama/llama-7b").agrees_with == ["authors-code"]  # found by hub id
    other = check_known([SuperWeight(2, 1, 1)], "llama-7b").entries[0]
    assert other.verdict == "differs" and other.missing == [(2, 3968, 7003)] and other.extra == [(2, 1, 1)]
    partly = check_known([SuperWeight(2, 2231, 2278)], "llama-13b")
    assert partly.entries[0].verdict == "partly agrees" and partly.entries[0].missing == [(2, 2231, 6939)]
    assert "not found: [2, 2231, 6939]" in partly.summary() and partly.agrees_with == []
    assert check_known(exact, None, "some/unknown-model") is None


def test_known_check_says_which_source_it_agrees_with_entry_by_entry():
    """OLMo-1B: the authors' code puts [1764, 8041] in layer 2, paper Table 2 in layer 1."""
    code = check_known([SuperWeight(1, 1764, 1710), SuperWeight(2, 1764, 8041)], "olmo-1b")
    by_source = {e.source: e for e in code.entries}
    assert code.agrees_with == ["authors-code"]
    assert by_source["paper-table-2"].verdict == "partly agrees"
    assert by_source["paper-table-2"].missing == [(1, 1764, 8041)] and by_source["paper-table-2"].extra == [(2, 1764, 8041)]
    table = check_known([SuperWeight(1, 1764, 1710), SuperWeight(1, 1764, 8041)], "olmo-1b")
    assert table.agrees_with == ["paper-table-2"]
    assert len(code.conflicts) == 1 and "layer of [1764, 8041]" in code.conflicts[0]
    lines = code.summary().splitlines()
    assert len(lines) == 3 and "authors' code: detection agrees" in lines[0] and lines[2].startswith("known conflict")


def test_known_check_on_routed_experts():
    found = [SuperWeight(1, 940, 711, expert=68), SuperWeight(2, 940, 59, expert=92), SuperWeight(3, 940, 423, expert=82)]
    check = check_known(found, "qwen3-30b-a3b")
    assert check.agrees_with == ["super-experts-table-8"]
    wrong_expert = check_known([SuperWeight(1, 940, 711, expert=67)], None, "Qwen/Qwen3-30B-A3B").entries[0]
    assert wrong_expert.verdict == "differs" and wrong_expert.extra == [(1, 940, 711, 67)]


def test_detect_json_known_field_holds_entries_with_per_source_agreement():
    from superweight.find.detect import Detection
    from superweight.report.detection import detection_document

    weights = [SuperWeight(3, 4743, 7678)]
    document = detection_document(Detection(super_weights=weights), {"spec": "llama2-13b"},
                                  check_known(weights, "llama2-13b"))
    known = document["known"]
    assert "published" not in known and known["key"] == "llama2-13b"
    assert known["agrees_with"] == ["paper-table-2"]
    assert [(e["source"], e["agrees"]) for e in known["entries"]] == [("paper-table-2", True), ("massive-activations", False)]
    assert known["entries"][1]["super_weights"] == [[3, 4743, 8811]] and "8811" in known["conflicts"][0]


def test_table_shows_expert_column_only_for_moe():
    columns, rows = super_weight_table([SuperWeight(1, 2, 3, value=0.5, iteration=0)])
    assert "expert" not in columns and rows[0][:3] == ("1", "2", "3")
    columns, rows = super_weight_table([SuperWeight(1, 2, 3, expert=7)])
    assert columns[3] == "expert" and rows[0][3] == "7"


def test_activation_plot_is_a_png(tmp_path):
    model = tiny_model("llama")
    plant_super_weight(model, layer=1, row=7, col=13)
    detection = detect(model, PROMPT_IDS)
    assert detection.candidate_layers[0] == [1]
    path = plot_activations(detection, tmp_path / "act.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
