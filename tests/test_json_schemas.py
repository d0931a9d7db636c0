"""Issue 21.4: each command's `--json` has one documented shape, docs/json/<command>.schema.json
(JSON Schema 2020-12), whatever the options; real outputs of the tiny model are validated here."""

import json
import os
from pathlib import Path

import jsonschema
import pytest

from conftest import DATA_DIR
from test_cli import invoke

SCHEMAS = Path(__file__).resolve().parents[1] / "docs" / "json"
COMMANDS = ("detect", "ablate", "eval", "generate", "export", "quantize", "study", "known")
QUICK = ("--data-dir", DATA_DIR, "--limit", "1", "--max-length", "40", "-q")  # piqa's first continuation: 36 tokens


def schema(command: str) -> dict:
    document = json.loads((SCHEMAS / f"{command}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(document)
    return document


def validated(command: str, *args) -> dict:
    result = invoke(command, *args, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    if os.environ.get("SW_DUMP_JSON"):  # to look at while writing a schema
        Path(os.environ["SW_DUMP_JSON"]).mkdir(exist_ok=True)
        (Path(os.environ["SW_DUMP_JSON"]) / f"{command}-{len(list(Path(os.environ['SW_DUMP_JSON']).iterdir()))}.json"
         ).write_text(json.dumps(document, indent=1))
    jsonschema.validate(document, schema(command))
    return document


@pytest.fixture
def coords(tmp_path):
    path = tmp_path / "coords.yaml"
    path.write_text("super_weights:\n  - {layer: 1, row: 3, col: 5}\n")
    return path


def test_every_command_has_a_schema():
    assert sorted(p.name for p in SCHEMAS.glob("*.schema.json")) == sorted(f"{c}.schema.json" for c in COMMANDS)
    for command in COMMANDS:
        assert schema(command)["title"].startswith(f"sw {command} --json")


def test_detect(tiny_llama_dir, tmp_path):
    validated("detect", tiny_llama_dir, "-q", "--out", tmp_path / "c.yaml")
    validated("detect", tiny_llama_dir, "-q", "--verify", "--out", tmp_path / "v.yaml")


def test_ablate(tiny_llama_dir, tmp_path):
    validated("ablate", tiny_llama_dir, "-q", "--coord", "1,3,5", "--out", tmp_path / "ablated")
    validated("ablate", tiny_llama_dir, "-q", "--coord", "1,3,5", "--factor", "2", "--out", tmp_path / "scaled")


def test_eval_single_and_compare_have_one_shape(tiny_llama_dir, coords):
    single = validated("eval", tiny_llama_dir, *QUICK, "--task", "piqa")
    compare = validated("eval", tiny_llama_dir, *QUICK, "--task", "piqa", "--coords", coords, "--compare")
    assert [c["name"] for c in single["configurations"]] == ["original"]
    assert len(compare["configurations"]) == 4
    assert set(single) == set(compare)
    # Scripts key on each configuration's `kind`, at the top of it, as in `sw generate --json`.
    assert [c["kind"] for c in single["configurations"]] == ["unchanged"]
    assert [c["kind"] for c in compare["configurations"]] == ["unchanged", "ablated", "restored", "control"]
    assert all(c["kind"] == c["ablation"]["kind"] for c in compare["configurations"])


def test_generate(tiny_llama_dir, coords):
    document = validated("generate", tiny_llama_dir, "-q", "--coords", coords, "--max-new-tokens", "2")
    assert [c["kind"] for c in document["configurations"]] == ["unchanged", "ablated", "restored", "control"]
    kinds = {c["name"]: c["kind"] for c in document["configurations"]}
    assert [g["kind"] for g in document["generations"]] == [kinds[g["configuration"]] for g in document["generations"]]


def test_export(tiny_llama_dir, tmp_path):
    from superweight.coords import SuperWeight, write_coords

    coords = write_coords(tmp_path / "c.yaml", [SuperWeight(1, 3, 5)], model=str(tiny_llama_dir))
    for to in ("llama.cpp", "bitsandbytes", "llm-compressor"):
        validated("export", coords, "--to", to, "-q")


def test_quantize(tiny_llama_dir):
    validated("quantize", tiny_llama_dir, *QUICK, "--coord", "1,3,5", "--task", "wikitext", "--block-size", "64")


def test_study(tiny_llama_dir, tmp_path):
    document = validated("study", tiny_llama_dir, *QUICK, "--coord", "1,3,5", "--task", "wikitext", "--task", "piqa",
                         "--grid", "0,1", "--top", "3", "--out", tmp_path / "study")
    assert all(isinstance(v, float) for row in document["table"]["rows"] for v in row["values"])
    assert {row["kind"] for row in document["table"]["rows"]} == {"unchanged", "ablated", "restored", "control"}
    kinds = {row["configuration"]: row["kind"] for row in document["table"]["rows"]}
    assert [g["kind"] for g in document["generations"]] == [kinds[g["configuration"]] for g in document["generations"]]


def test_known():
    validated("known")
    validated("known", "smollm2-135m")


@pytest.mark.integration
def test_detect_on_the_default_model_with_its_registry_entry(smollm2, tmp_path):
    document = validated("detect", "-q", "--verify", "--out", tmp_path / "c.yaml")
    assert document["super_weights"] and document["known"]["entries"]
