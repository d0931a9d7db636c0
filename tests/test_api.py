"""The library's command functions (`superweight.detect_model`, ...), called as a notebook would: plain
arguments in, a result object out, progress through a reporter, bad input as a project exception."""

import json
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file

import superweight as api
from superweight.coords import SuperWeight, read_coords
from superweight.errors import SuperweightError, UsageError

from conftest import DATA_DIR, build_word_tokenizer
from synthetic import VOCAB, plant_super_weight, tiny_model

PLANTED = SuperWeight(1, 7, 13)
WEIGHT = "model.layers.1.mlp.down_proj.weight"
QUICK = dict(data_dir=str(DATA_DIR), limit=1, max_length=64)


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    """A tiny Llama directory whose [1, 7, 13] is a genuine super weight."""
    model = tiny_model("llama")
    plant_super_weight(model, 1, 7, 13, input_spike=100.0, weight=10.0)
    path = tmp_path_factory.mktemp("planted-llama")
    model.save_pretrained(path, safe_serialization=True)
    build_word_tokenizer([f"w{i}" for i in range(VOCAB - 3)]).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERWEIGHT_CACHE", str(tmp_path / "cache"))


class Recorder(api.Reporter):
    """Keeps what a command reports."""

    def __init__(self):
        self.messages, self.stages = [], {}

    def say(self, message):
        self.messages.append(message)

    @contextmanager
    def bars(self):
        yield lambda stage, done, total: self.stages.__setitem__(stage, (done, total))


def test_detect_model_finds_the_planted_weight_and_writes_its_coordinates(planted_dir, tmp_path):
    recorder = Recorder()
    result = api.detect_model(str(planted_dir), out=tmp_path / "c.yaml", reporter=recorder)
    assert [w.key for w in result.super_weights] == [PLANTED.key]
    written, meta = read_coords(tmp_path / "c.yaml")
    assert [w.key for w in written] == [PLANTED.key]
    assert meta["model_type"] == "llama" and meta["model"] == str(planted_dir.resolve())  # found from anywhere
    document = result.to_dict()
    assert document["coordinates_file"] == str(tmp_path / "c.yaml") and document["verification"] is None
    assert any(m.startswith(f"loaded {planted_dir}") for m in recorder.messages)


def test_detect_model_bad_input_raises_before_anything_is_written(planted_dir, tmp_path):
    with pytest.raises(UsageError, match=r"--iterations \(iterations=\) must be at least 1"):
        api.detect_model(str(planted_dir), iterations=0, out=tmp_path / "c.yaml")
    with pytest.raises(SuperweightError, match="inside"):
        api.detect_model(str(planted_dir), out=planted_dir / "c.yaml")
    assert not (tmp_path / "c.yaml").exists() and not (planted_dir / "c.yaml").exists()


def test_ablate_model_zeroes_the_weight_and_saves_the_model(planted_dir, tmp_path):
    result = api.ablate_model(str(planted_dir), coord=["1,7,13"], out=tmp_path / "ablated")
    assert (result.changed, result.mode, result.out) == (1, "zero", tmp_path / "ablated")
    assert load_file(tmp_path / "ablated" / "model.safetensors")[WEIGHT][7, 13] == 0
    assert load_file(planted_dir / "model.safetensors")[WEIGHT][7, 13] != 0
    assert result.to_dict()["ablation"]["coordinates"] == [{"layer": 1, "row": 7, "col": 13}]
    result = api.ablate_model(str(planted_dir), coord=["1,7,13"], factor=2, out=tmp_path / "x2")
    assert (result.mode, result.factor) == ("scale", 2.0)


def test_evaluate_model_with_an_ablation_compares_it_with_the_original(planted_dir, tmp_path):
    recorder = Recorder()
    result = api.evaluate_model(str(planted_dir), coord=["1,7,13"], task=["wikitext"], output=tmp_path / "r.json",
                                reporter=recorder, **QUICK)
    zeroed = result.runs["weight [1, 7, 13] zeroed"]["results"]["wikitext"]["word_perplexity"]
    original = api.evaluate_model(str(planted_dir), task=["wikitext"], **QUICK)
    assert list(original.runs) == ["original"]
    assert zeroed != original.runs["original"]["results"]["wikitext"]["word_perplexity"]
    written = json.loads((tmp_path / "r.json").read_text())  # lm-eval's layout: results at the top
    assert written == result.document and written["results"] == result.runs["weight [1, 7, 13] zeroed"]["results"]
    assert written["n-samples"] == result.runs["weight [1, 7, 13] zeroed"]["n_samples"] and "n_samples" not in written
    assert [run["name"] for run in result.to_dict()["configurations"]] == ["weight [1, 7, 13] zeroed"]
    stage = "weight [1, 7, 13] zeroed: wikitext"
    assert recorder.stages[stage][0] == recorder.stages[stage][1]
    assert result.table().columns[0] == "configuration"


def test_evaluate_model_refuses_compare_without_coordinates(planted_dir):
    with pytest.raises(UsageError, match=r"need --coords \(coords=\) FILE"):
        api.evaluate_model(str(planted_dir), compare=True, **QUICK)


def test_run_study_writes_the_report_and_reuses_the_cache(planted_dir, tmp_path):
    options = dict(coord=["1,7,13"], task="wikitext", grid="0,1", top=5, out=tmp_path / "study", **QUICK)
    result = api.run_study(str(planted_dir), command="sw study example", **options)
    assert result.report == tmp_path / "study" / "REPORT.md" and result.report.is_file()
    document = result.to_dict()
    assert document["table"] == result.table.to_dict()
    assert all(isinstance(v, float) for row in document["table"]["rows"] for v in row["values"])
    assert [row[0] for row in result.table.rows][:2] == ["original", "weight [1, 7, 13] zeroed"]  # as sw eval names it
    assert document["meta"]["command"] == "sw study example" and result.meta["evaluations"]["total"] == 5 + 2
    with pytest.raises(UsageError, match="exists and is not empty"):
        api.run_study(str(planted_dir), **options)
    again = api.run_study(str(planted_dir), force=True, **options)
    assert again.meta["evaluations"]["from_cache"] == again.meta["evaluations"]["total"]
    assert again.table.rows == result.table.rows


def test_run_study_without_coordinates_says_once_which_weights_it_acts_on(planted_dir, tmp_path):
    """The study verifies every candidate, then narrows them by --select: one note says which, and
    none claims it acts on every candidate."""
    notes = []
    recorder = Recorder()
    recorder.note = notes.append
    api.run_study(str(planted_dir), task="wikitext", grid="0,1", top=5, select="all", out=tmp_path / "study",
                  reporter=recorder, **QUICK)
    acting = [n for n in notes if "act on" in n or "acting on" in n]
    assert acting == ["Table 1 and the sweep act on the only candidate of the detection (--select all): [1, 7, 13]"]


@pytest.mark.parametrize("roles,acted_on", [
    ("super, inert", ["[1, 7, 13]", "[2, 5, 9]"]),  # the file's super weight (by its role), and --coord's
    (None, ["[1, 7, 13]", "[1, 3, 4]", "[2, 5, 9]"]),  # no roles recorded: every candidate, as every command takes them
])
def test_run_study_narrows_given_coordinates_as_every_command_does(planted_dir, tmp_path, roles, acted_on):
    """--coords with --coord: the file's candidates narrowed by --select by the roles the file
    records (not every candidate, not re-measured roles), --coord's as given; the same weights
    `evaluate_model` acts on."""
    path = tmp_path / "c.yaml"
    marks = roles.split(", ") if roles else [None, None]
    api.write_coords(path, [SuperWeight(1, 7, 13, role=marks[0]), SuperWeight(1, 3, 4, role=marks[1])])
    result = api.run_study(str(planted_dir), coords=path, coord=["2,5,9"], task="wikitext", grid="0,1", top=5,
                           out=tmp_path / "study", **QUICK)
    assert [w.label() for w in result.super_weights] == acted_on
    evaluated = api.evaluate_model(str(planted_dir), coords=path, coord=["2,5,9"], **QUICK)
    assert list(evaluated.runs) == [f"{len(acted_on)} weights zeroed"] == [result.table.rows[1][0]]


def test_quantize_model_compares_naive_and_aware_rtn(planted_dir, tmp_path):
    result = api.quantize_model(str(planted_dir), coord=["1,7,13"], block_size=[64], task="wikitext",
                                out=tmp_path / "w4", **QUICK)
    assert [row["block_size"] for row in result.rows] == [64] and result.activation_rows == []
    assert result.to_dict()["super_weights"][0] | {"layer": 1, "row": 7, "col": 13} == result.to_dict()["super_weights"][0]
    assert {"unquantized", "naive, block 64", "aware, block 64"} == {row[0] for row in result.weight_table().rows}
    settings = json.loads((tmp_path / "w4" / "superweight_quantization.json").read_text())
    assert (settings["bits"], settings["block_size"]) == (4, 64)
    with pytest.raises(UsageError, match=r"--block-size \(block_size=\) must be a positive integer, got 'x'"):
        api.quantize_model(str(planted_dir), block_size=["x"], **QUICK)


def test_generate_text_continues_each_prompt_under_each_configuration(planted_dir):
    result = api.generate_text(str(planted_dir), coord=["1,7,13"], prompt="w10 w11 w12", max_new_tokens=2)
    assert result.prompts == ["w10 w11 w12"]
    assert [g.configuration for g in result.generations] == [c.name for c in result.configurations]
    assert [c.name for c in result.configurations][:2] == ["original", "weight [1, 7, 13] zeroed"]
    assert result.to_dict()["decoding"] == "greedy"


def test_generate_text_without_coordinates_reports_its_detection_and_verification(planted_dir):
    """Detecting and verifying take minutes on a real model (2 on SmolLM2's CPU): stderr must not
    stay silent through them, as it did when only the commands with stages showed them."""
    class Statuses(api.Reporter):
        def __init__(self):
            self.statuses = []

        @contextmanager
        def status(self, message):
            self.statuses.append(message)
            yield lambda text: None

    reporter = Statuses()
    with pytest.raises(SuperweightError, match="holds no super weights"):  # the random model's weight is inert
        api.generate_text(str(planted_dir), prompt="w10 w11 w12", max_new_tokens=1, reporter=reporter)
    assert "detecting and verifying super weights" in reporter.statuses
    api.generate_text(str(planted_dir), select="all", prompt="w10 w11 w12", max_new_tokens=1, reporter=reporter)
    assert "detecting super weights" in reporter.statuses


def test_export_names_writes_the_matrix_names(tiny_llama_dir, tmp_path):
    coords_file = tmp_path / "c.yaml"
    coords_file.write_text("super_weights:\n  - {layer: 1, row: 3, col: 5}\n")
    result = api.export_names(coords_file, to="bitsandbytes", model=str(tiny_llama_dir), out=tmp_path / "skip.json")
    assert result.export.modules == ["model.layers.1.mlp.down_proj"]
    assert (tmp_path / "skip.json").read_text() == result.content
    assert result.to_dict()["out"] == str(tmp_path / "skip.json")


@pytest.mark.parametrize("command", ["detect", "ablate", "export"])
def test_ranks_other_than_0_get_no_result_and_write_nothing(planted_dir, tmp_path, monkeypatch, command):
    from superweight import distributed

    coords = tmp_path / "c-in.yaml"
    coords.write_text("super_weights:\n  - {layer: 1, row: 7, col: 13}\n")
    # rank 1 of 2, with every collective answered as if rank 0 had reached it too
    monkeypatch.setattr(distributed, "_current", distributed.Ranks(rank=1, world_size=2))
    monkeypatch.setattr(distributed, "exchange", lambda payload: [payload, payload])
    call = {"detect": lambda: api.detect_model(str(planted_dir), out=tmp_path / "c.yaml"),
            "ablate": lambda: api.ablate_model(str(planted_dir), coord=["1,7,13"], out=tmp_path / "m"),
            "export": lambda: api.export_names(coords, to="bitsandbytes", model=str(planted_dir),
                                               out=tmp_path / "skip.json")}[command]
    assert call() is None
    assert sorted(tmp_path.iterdir()) == [coords]



def test_the_loading_options_travel_as_one_object(planted_dir, tmp_path):
    result = api.detect_model(str(planted_dir), out=tmp_path / "c.yaml",
                              options=api.LoadOptions(dtype="float16", device="cpu"))
    assert result.model["dtype"] == "float16"
    with pytest.raises(UsageError, match="--device-map"):
        api.evaluate_model(str(planted_dir), options=api.LoadOptions(device_map="everywhere"), **QUICK)


def test_a_real_quantizer_without_coordinates_keeps_what_select_names(planted_dir, monkeypatch):
    """It detected and kept every candidate, ignoring --select; now it narrows them as every command
    does (the quantizer itself is not run here: its tools are not installed on every machine)."""
    import superweight.commands.prepare as prepare
    from superweight.commands.quantize_real import quantize_with
    from superweight.edit import real_quantizers
    from superweight.measure import real_quantized

    asked, kept = [], []
    narrow = prepare.detected
    monkeypatch.setattr(prepare, "detected",
                        lambda reporter, loaded, select: asked.append(select) or narrow(reporter, loaded, select="all"))
    monkeypatch.setattr(real_quantizers, "find_tools", lambda quantizer, path: None)
    monkeypatch.setattr(real_quantized, "compare", lambda folder, weights, *args, **kwargs: kept.extend(weights) or {})
    quantize_with(str(planted_dir), quantizer="quanto", select="set", task="wikitext", data_dir=str(DATA_DIR), limit=1)
    assert asked == ["set"] and [w.label() for w in kept] == ["[1, 7, 13]"]


def test_a_command_that_detects_on_a_folder_sw_ablate_wrote_measures_no_roles_there(planted_dir, tmp_path):
    """Roles measured on an ablated model would call what is left of it "super"; as `sw detect
    --verify` does, a command that detects on the folder as it is (here `sw quantize` without
    coordinates: it quantizes the folder it is given) names the folder as ablated and measures no
    roles on it. (`sw generate` and `sw study` put the record's values back and detect in the original.)"""
    api.ablate_model(str(planted_dir), coord=["1,7,13"], mode="scale", factor="0.5", out=tmp_path / "halved")
    reporter = Recorder()
    reporter.note = reporter.say
    api.quantize_model(str(tmp_path / "halved"), block_size=[64], task="wikitext", data_dir=str(DATA_DIR), limit=1,
                       max_length=64, reporter=reporter)
    assert any("is already ablated (ablated by superweight: weight [1, 7, 13] scaled x0.5" in m
               for m in reporter.messages), reporter.messages
    assert any(m.startswith("acting on the only candidate of the detection: verification gave no roles")
               for m in reporter.messages), reporter.messages
