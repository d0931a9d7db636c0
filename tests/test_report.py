"""Comparison with published coordinates, tables and plots."""

from superweight.coords import SuperWeight
from superweight.find.detect import detect
from superweight.report.detection import check_known, super_weight_table
from superweight.report.plots import plot_activations
from synthetic import PROMPT_IDS, one_thread_per_module, plant_super_weight, tiny_model  # noqa: F401


def test_known_check_verdicts():
    exact = [SuperWeight(2, 3968, 7003)]
    assert check_known(exact, "llama-7b").verdict == "agrees"
    assert check_known(exact, None, "huggyllama/llama-7b").verdict == "agrees"  # found by hub id
    other = check_known([SuperWeight(2, 1, 1)], "llama-7b")
    assert other.verdict == "differs" and other.missing == [(2, 3968, 7003)] and other.extra == [(2, 1, 1)]
    partly = check_known([SuperWeight(2, 2231, 2278)], "llama-13b")
    assert partly.verdict == "partly agrees" and partly.missing == [(2, 2231, 6939)]
    assert "not found: [2, 2231, 6939]" in partly.summary()
    assert check_known(exact, None, "some/unknown-model") is None


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
