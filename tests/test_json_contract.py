"""Every command's `--json` output and exit code on SmolLM2 stay what they were when this file's
golden outputs were captured (tests/golden/), except timings, versions and temporary paths.

The golden files were first written by the code before the package was regrouped into stages
(HEAD 5205329), and the move was checked against them; they were re-captured once since, for the
intended changes of issue #20 (roles and attribution in `--verify`, the registry's per-source
`known` field) and #21 (numbers in reports); three keys were added since: `ablate`'s
`ablation.name` and each `eval` configuration's `kind` (one name, and `kind` found the same way,
in every command), and the study's `meta.model.superweight_ablation` (as in `sw eval`'s JSON). A change that alters what a user sees fails here. To
re-capture after an intended change of output: `SW_UPDATE_GOLDEN=1 pytest tests/test_json_contract.py`,
and say why in the commit.
"""

import json
import os
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from superweight.cli import app

pytestmark = pytest.mark.integration

GOLDEN = Path(__file__).parent / "golden"
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
# Keys whose values change from run to run or release to release, not with what the code computes.
# `from_cache` counts the evaluations a study found in its cache: it depends on what earlier runs left
# there, not on the code.
VOLATILE = re.compile(r"(seconds|elapsed|duration|timing|time_|_time|version|date|timestamp|started|finished|from_cache)",
                      re.IGNORECASE)


def _commands(tmp: Path) -> dict[str, list[str]]:
    coords = ["--coord", "11,507,1229", "--coord", "11,507,1487"]
    data = ["--data-dir", str(DATA_DIR)]
    return {
        "detect": ["detect", "--out", str(tmp / "detect.yaml")],
        "detect_verify": ["detect", "--verify", "--out", str(tmp / "verify.yaml")],
        "ablate": ["ablate", *coords, "--out", str(tmp / "ablated")],
        "eval": ["eval", "--task", "wikitext", "--task", "piqa", "--limit", "2", "--max-length", "256", *coords, *data],
        "eval_compare": ["eval", "--task", "arc_easy", "--limit", "3", "--compare", *coords, *data],
        "generate": ["generate", "--max-new-tokens", "4", *coords],
        "export": ["export", str(tmp / "detect.yaml"), "--to", "llama.cpp"],
        "quantize": ["quantize", "--limit", "1", "--max-length", "128", "--block-size", "4096", *coords, *data,
                     "--out", str(tmp / "quantized")],
        "study": ["study", "--limit", "2", "--max-length", "128", "--grid", "0,1", *coords, *data,
                  "--out", str(tmp / "study")],
    }


def _normalised(value, tmp: Path):
    if isinstance(value, dict):
        return {key: _normalised(item, tmp) for key, item in value.items() if not VOLATILE.search(key)}
    if isinstance(value, list):
        return [_normalised(item, tmp) for item in value]
    if isinstance(value, str):
        return (value.replace(str(tmp), "<tmp>").replace(os.environ.get("SUPERWEIGHT_CACHE", "\0"), "<cache>")
                .replace(sys.prefix, "<venv>"))
    if isinstance(value, float):
        return float(f"{value:.6g}")  # bit-level float noise across BLAS builds is not a change of output
    return value


def _run_all(tmp: Path) -> dict[str, dict]:
    runner = CliRunner()
    captured = {}
    for name, args in _commands(tmp).items():
        result = runner.invoke(app, [args[0], "-q", "--json", *args[1:]])
        stdout = result.stdout if hasattr(result, "stdout") else result.output
        try:
            document = json.loads(stdout)
        except json.JSONDecodeError:
            pytest.fail(f"{name}: not JSON (exit {result.exit_code}): {result.output[-2000:]}")
        captured[name] = {"exit_code": result.exit_code, "json": _normalised(document, tmp)}
    return captured


def test_json_outputs_and_exit_codes_match_the_golden_files(gguf_cache, tmp_path):
    captured = _run_all(tmp_path)
    if os.environ.get("SW_UPDATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        for name, value in captured.items():
            (GOLDEN / f"{name}.json").write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    for name, value in captured.items():
        expected = json.loads((GOLDEN / f"{name}.json").read_text())
        assert json.loads(json.dumps(value)) == expected, f"`sw {name}` --json output changed"
