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


# ----------------------------------------------------------------------------- readable plots (issue 21, point 3)


def _axes_of(monkeypatch, draw):
    """The axes `draw(path)` produced, kept open for inspection."""
    import matplotlib.figure

    figures = []
    original = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: (figures.append(self), original(self, *a, **k))[1])
    draw()
    return [ax for fig in figures for ax in fig.axes]


def _visible_tick_labels(ax, which="y"):
    axis = ax.yaxis if which == "y" else ax.xaxis
    low, high = sorted(ax.get_ylim() if which == "y" else ax.get_xlim())
    ax.figure.canvas.draw()
    return [t.get_text() for t, v in zip(axis.get_majorticklabels(), axis.get_majorticklocs())
            if low <= v <= high and t.get_text()]


def test_rtn_plot_has_readable_ticks_inside_one_decade_and_labelled_axes(tmp_path, monkeypatch):
    from superweight.report.plots import plot_sweep

    def row(size, naive, aware):
        return {"bits": 4, "block_size": size, "z": 9.0, "naive": {"wikitext": {"word_perplexity": naive}},
                "aware": {"wikitext": {"word_perplexity": aware}}}

    rows = [row(64, 119.8, 121.0), row(1024, 121.0, 158.9)]
    [ax] = _axes_of(monkeypatch, lambda: plot_sweep(rows, tmp_path / "rtn.png"))
    labels = _visible_tick_labels(ax)
    assert len(labels) >= 3 and all("^" not in t and "$" not in t for t in labels), labels  # 120, 130, ...
    assert "perplexity" in ax.get_ylabel() and "block size (weights" in ax.get_xlabel()
    assert _visible_tick_labels(ax, "x") == ["64", "1,024"]


def test_every_study_plot_axis_says_what_it_measures(tmp_path, monkeypatch):
    from superweight.find.hooks import LayerStats
    from superweight.measure.stop_words import StopWordShift
    from superweight.report.plots import plot_activation_profile, plot_scale_sweep, plot_stop_word_shift

    stats = [LayerStats(layer=i, input_max=10.0 ** i, output_max=2.0 ** i) for i in range(4)]
    shift = StopWordShift(0.3, 0.1, 1.0, 1.0, 10, 3, grows=[{"token": 1, "text": "a", "original": 0.1, "ablated": 0.2}],
                          shrinks=[{"token": 2, "text": "b", "original": 0.2, "ablated": 0.1}])
    sweep = [{"factor": 0.0, "perplexity": 1.3e8, "avg_acc": 0.29}, {"factor": 1.0, "perplexity": 30.7, "avg_acc": 0.48}]
    axes = _axes_of(monkeypatch, lambda: (plot_activation_profile(stats, stats, tmp_path / "a.png"),
                                          plot_scale_sweep(sweep, tmp_path / "s.png"),
                                          plot_stop_word_shift(shift, tmp_path / "w.png")))
    for ax in axes:
        assert ax.get_ylabel() and (ax.get_xlabel() or ax.get_xticklabels()), ax.get_title()
    perplexity = next(ax for ax in axes if "perplexity" in ax.get_ylabel())
    assert "1e+8" in _visible_tick_labels(perplexity) and "100" in _visible_tick_labels(perplexity)


def test_activation_plot_marks_each_weight_by_its_role(tmp_path, monkeypatch):
    import dataclasses

    from superweight.find.detect import Detection
    from superweight.find.hooks import LayerStats

    @dataclasses.dataclass(frozen=True)
    class WithRole(SuperWeight):  # SuperWeight.role is being added beside this change
        role: str | None = None

    stats = [LayerStats(layer=i, input_max=1.0 + 100 * (i == 2), output_max=1.0 + 50 * (i == 2)) for i in range(4)]
    weights = [WithRole(2, 1, 1, role="super"), WithRole(2, 1, 2, role="inert"), WithRole(1, 1, 4, role="joint"),
               SuperWeight(3, 1, 3)]
    axes = _axes_of(monkeypatch, lambda: plot_activations(Detection(weights, [stats]), tmp_path / "act.png"))
    legend = axes[0].figure.legends[0]
    texts = [t.get_text() for t in legend.get_texts()]
    # Layer 2's super and inert weights share one point: only the super star is drawn there (an inert
    # cross over it hid it); the label names both roles.
    assert [t.split(" ")[0] for t in texts] == ["super", "joint", "candidate"]
    markers = [(line.get_xdata()[0], line.get_marker()) for line in axes[0].lines if line.get_linestyle() == "None"]
    assert sorted(markers) == [(1, "*"), (2, "*"), (3, "*")]
    annotations = [c.get_text() for c in axes[0].texts]
    assert "1,1 super\n1,2 inert" in annotations and "1,3 candidate" in annotations
    # README: the found layers starred; each legend entry looks like the marker drawn (none hollow).
    def look(line):
        return line.get_marker(), line.get_markerfacecolor(), line.get_color(), line.get_markersize()

    drawn = {look(line) for ax in axes for line in ax.lines if line.get_linestyle() == "None"}
    assert {look(handle) for handle in legend.legend_handles} == drawn
    assert [look(handle)[0] for handle in legend.legend_handles] == ["*", "*", "*"]
    assert all(face == color for _, face, color, _ in drawn)
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in axes)
