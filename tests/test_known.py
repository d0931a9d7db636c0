"""The registry of published coordinates, its command, and coordinates applied to another model."""

import json

import pytest

from superweight.errors import UsageError
from superweight.report.known import known_model, registry, registry_document, registry_rows
from superweight.model.identity import coordinates_mismatch
from superweight.model.source import aliases, resolve

ISSUE_20_TABLES = {  # every table issue #20 lists, with the source it comes from
    "llama2-7b": ("paper-table-2", [(1, 2533, 7890)]),
    "llama2-13b": ("paper-table-2", [(3, 4743, 7678)]),
    "llama3.2-1b": ("transcribed-table", [(1, 400, 1417), (1, 698, 1417), (1, 2029, 1417), (1, 1159, 1417)]),
    "qwen3-30b-a3b": ("super-experts-table-8", [(1, 940, 711, 68), (2, 940, 59, 92), (3, 940, 423, 82)]),
    "olmo-1b": ("authors-code", [(1, 1764, 1710), (2, 1764, 8041)]),
    "llama-7b": ("authors-code", [(2, 3968, 7003)]),
    "smollm2-135m": ("measured", [(11, 507, 1229), (2, 507, 90), (2, 507, 430)]),
}


def test_registry_holds_every_published_table_with_its_source():
    models = registry()
    for key, (source, weights) in ISSUE_20_TABLES.items():
        entries = {e.source.key: e.super_weights for e in models[key].entries}
        assert entries[source] == weights, key
    assert {e.source.key: e.super_weights for e in models["olmo-1b"].entries}["paper-table-2"] == [
        (1, 1764, 1710), (1, 1764, 8041)]


def test_known_conflicts_are_recorded_as_conflicts():
    models = registry()
    assert len(models["llama2-13b"].conflicts) == 1 and "7678" in models["llama2-13b"].conflicts[0]
    assert len(models["olmo-1b"].conflicts) == 1 and "issue #6" in models["olmo-1b"].conflicts[0]
    # a conflict is two sources that disagree: both are entries of the model
    assert set(models["llama2-13b"].sources) == {"paper-table-2", "massive-activations"}


def test_every_registered_model_has_an_alias_naming_it_and_its_hub_id():
    table = aliases()
    for key, model in registry().items():
        assert key in table and table[key].get("known") == key, key
        assert model.hub, key
        if "hub" in table[key]:
            assert table[key]["hub"] in model.hub and resolve(key).known_key == key


def test_known_model_by_alias_or_hub_id_and_an_unknown_name_fails_in_one_line():
    assert known_model("Qwen/Qwen3-30B-A3B").key == "qwen3-30b-a3b"
    assert known_model("llama2-7b").hub == ["meta-llama/Llama-2-7b-hf"]
    with pytest.raises(UsageError) as error:
        known_model("gpt-9")
    assert "\n" not in str(error.value) and "'gpt-9' is not in the registry" in str(error.value)


def test_registry_document_and_rows():
    document = json.loads(json.dumps(registry_document()))  # plain JSON
    assert set(document["sources"]) >= {"paper-table-2", "authors-code", "super-experts-table-8", "measured"}
    olmo = next(m for m in document["models"] if m["key"] == "olmo-1b")
    assert olmo["alias"] == "olmo-1b" and [e["source"] for e in olmo["entries"]] == ["authors-code", "paper-table-2"]
    assert registry_document("olmo-1b")["models"] == [olmo]
    columns, rows = registry_rows("qwen3-30b-a3b")
    assert columns[2] == "source" and rows == [("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", "Super Experts Table 8",
                                               "[1, 940, 711] expert 68; [2, 940, 59] expert 92; [3, 940, 423] expert 82", "")]
    columns, rows = registry_rows()
    assert len(rows) == sum(len(m.entries) for m in registry().values())


def test_coordinates_made_for_another_model_are_named_in_one_line():
    """The paper's issue #7: Llama-7B's coordinates applied to Llama-2-7B."""
    note = coordinates_mismatch({"model": "llama-7b", "model_type": "llama"}, resolve("llama2-7b"), "llama", "c.yaml")
    assert note and "\n" not in note
    assert note.startswith("c.yaml was made for llama-7b (llama), not for llama2-7b") and "sw detect llama2-7b" in note
    other_family = coordinates_mismatch({"model": "./my-model", "model_type": "qwen2"}, resolve("llama-7b"), "llama")
    assert other_family and "(qwen2)" in other_family and "(llama)" in other_family


def test_coordinates_for_the_same_model_by_another_name_pass(tiny_llama_dir):
    # the packaged GGUF alias and its hub id are one model
    assert coordinates_mismatch({"model": "smollm2-135m", "model_type": "llama"},
                                resolve("HuggingFaceTB/SmolLM2-135M-Instruct"), "llama") is None
    assert coordinates_mismatch({"model": "huggyllama/llama-7b"}, resolve("llama-7b"), "llama") is None
    # a local folder (e.g. written by `sw ablate`) has no hub id: compared by model_type only
    assert coordinates_mismatch({"model": "smollm2-135m", "model_type": "llama"},
                                resolve(str(tiny_llama_dir)), "llama") is None
    assert coordinates_mismatch({}, resolve("llama-7b"), "llama") is None  # an old file without fields


def test_sw_known_prints_the_registry_and_json():
    from typer.testing import CliRunner

    from superweight.cli import app

    result = CliRunner().invoke(app, ["known"])
    assert result.exit_code == 0, result.output
    for text in ("qwen3-30b-a3b", "Super Experts Table 8", "paper Table 2", "authors' code", "measured here", "8811"):
        assert text in result.output, text
    result = CliRunner().invoke(app, ["known", "llama2-13b", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert [m["key"] for m in document["models"]] == ["llama2-13b"] and len(document["models"][0]["conflicts"]) == 1


def test_sw_known_with_an_unknown_name_fails_in_one_line():
    from typer.testing import CliRunner

    from superweight.cli import app

    result = CliRunner().invoke(app, ["known", "gpt-9"])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: 'gpt-9' is not in the registry"), result.output


def test_a_coordinates_file_written_for_llama_7b_is_named_when_applied_to_llama2_7b(tmp_path):
    from superweight.coords import SuperWeight, write_coords
    from superweight.model.identity import coordinates_file_mismatch

    path = write_coords(tmp_path / "c.yaml", [SuperWeight(2, 3968, 7003)], model="llama-7b", model_type="llama")
    note = coordinates_file_mismatch(path, resolve("meta-llama/Llama-2-7b-hf"), "llama")
    assert note and note.startswith(f"{path} was made for llama-7b (llama), not for meta-llama/Llama-2-7b-hf")
    assert coordinates_file_mismatch(path, resolve("huggyllama/llama-7b"), "llama") is None
    assert coordinates_file_mismatch(None, resolve("llama-7b"), "llama") is None


def test_coordinates_made_for_another_model_are_a_warning_that_quiet_json_and_the_library_show(
        tiny_llama_dir, tmp_path, caplog):
    """The mismatch is a warning every command prints (sw export included), under --quiet and
    beside --json too, and the library logs it: it changes what the result means."""
    from superweight import generate_text
    from superweight.coords import SuperWeight, write_coords
    from test_cli import invoke

    path = write_coords(tmp_path / "c.yaml", [SuperWeight(1, 3, 5)], model="my-mistral", model_type="mistral")
    said = f"warning: {path} was made for my-mistral (mistral), not for {tiny_llama_dir} (llama)"
    generated = invoke("generate", tiny_llama_dir, "--coords", path, "--max-new-tokens", "1", "-q", "--json")
    assert generated.exit_code == 0 and json.loads(generated.stdout)
    assert generated.stderr.startswith(said), generated.stderr
    exported = invoke("export", path, "--model", tiny_llama_dir, "--to", "llm-compressor", "-q")
    assert exported.exit_code == 0 and exported.stderr.startswith(said), exported.output
    with caplog.at_level("WARNING", logger="superweight"):
        generate_text(str(tiny_llama_dir), coords=path, max_new_tokens=1)
    assert any(r.getMessage().startswith(said.removeprefix("warning: ")) for r in caplog.records), caplog.text


def test_a_coordinates_file_made_for_another_hub_model_is_told_before_the_load(tmp_path, monkeypatch):
    """The load of a large model takes minutes: a file made for another hub id is told before it
    starts, so that the user can stop it; it is told once."""
    import superweight.commands.prepare as prepare
    from superweight.commands.reporter import Reporter
    from superweight.coords import SuperWeight, write_coords

    path = write_coords(tmp_path / "c.yaml", [SuperWeight(2, 3968, 7003)], model="llama-7b", model_type="llama")
    told = []

    class Recording(Reporter):
        def warn(self, message):
            told.append(message)

    def load_refused(*args):
        raise RuntimeError("the load started")

    monkeypatch.setattr(prepare, "check_coords_before_load", lambda *args, **kwargs: False)
    monkeypatch.setattr(prepare, "load", load_refused)
    with pytest.raises(RuntimeError, match="the load started"):
        prepare.ready_model(Recording(), "meta-llama/Llama-2-7b-hf", None, resolve("meta-llama/Llama-2-7b-hf"),
                            [SuperWeight(2, 3968, 7003)], path)
    assert len(told) == 1 and told[0].startswith(f"{path} was made for llama-7b (llama), not for meta-llama/Llama-2-7b-hf")
