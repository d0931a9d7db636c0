"""Every command's `--json` output and exit code on SmolLM2 stay what they were when this file's
golden outputs were captured (tests/golden/), except timings, versions and temporary paths.

The golden files were first written by the code before the package was regrouped into stages
(HEAD 5205329), and the move was checked against them; they were re-captured once since, for the
intended changes of issue #20 (roles and attribution in `--verify`, the registry's per-source
`known` field) and #21 (numbers in reports); three keys were added since: `ablate`'s
`ablation.name` and each `eval` configuration's `kind` (one name, and `kind` found the same way,
in every command), and the study's `meta.model.superweight_ablation` (as in `sw eval`'s JSON). A change that alters what a user sees fails here (numbers: beyond float32 noise across CPUs, `RELATIVE`). To
re-capture after an intended change of output: `SW_UPDATE_GOLDEN=1 pytest tests/test_json_contract.py`,
and say why in the commit.
"""

import json
import math
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
        changed = _differences(json.loads(json.dumps(value)), expected)
        assert not changed, f"`sw {name}` --json output changed: " + "; ".join(changed[:10])


# float32 on another CPU sums in another order: the same code on an AMD EPYC moved the golden values
# by up to 3e-5 (relative) from those captured on the machine before, and a bootstrap standard error
# (a value of a few resamples' spread) by 1.4e-3. Any change of what the code computes moves more.
RELATIVE = 1e-4
RELATIVE_STDERR = 1e-2


def _differences(value, expected, path: str = "") -> list[str]:
    """Where `value` differs from `expected`: keys, lengths, types and strings exactly; numbers
    within RELATIVE (RELATIVE_STDERR for a standard error)."""
    if isinstance(expected, dict) and isinstance(value, dict):
        keys = sorted(set(value) | set(expected))
        return [f"{path}/{key}: {'new' if key not in expected else 'missing'}" for key in keys
                if (key in value) != (key in expected)] + \
            [d for key in keys if key in value and key in expected for d in _differences(value[key], expected[key], f"{path}/{key}")]
    if isinstance(expected, list) and isinstance(value, list):
        if len(value) != len(expected):
            return [f"{path}: {len(value)} items, not {len(expected)}"]
        return [d for i, (v, e) in enumerate(zip(value, expected)) for d in _differences(v, e, f"{path}[{i}]")]
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (value, expected))
    if numbers and (isinstance(value, float) or isinstance(expected, float)):
        tolerance = RELATIVE_STDERR if "stderr" in path else RELATIVE
        return [] if math.isclose(value, expected, rel_tol=tolerance, abs_tol=1e-12) else [f"{path}: {value} != {expected}"]
    return [] if value == expected and type(value) is type(expected) else [f"{path}: {value!r} != {expected!r}"]


def test_golden_comparison_tells_a_changed_value_from_float_noise():
    golden = {"layers": [{"share": 0.730183, "token": 0}], "stderr": 4.62313, "name": "x"}
    assert _differences({"layers": [{"share": 0.730184, "token": 0}], "stderr": 4.61652, "name": "x"}, golden) == []
    assert _differences({"layers": [{"share": 0.7311, "token": 0}], "stderr": 4.62313, "name": "x"}, golden) \
        == ["/layers[0]/share: 0.7311 != 0.730183"]
    assert _differences({"layers": [{"share": 0.730183, "token": 1}], "stderr": 4.8, "name": "y", "new": 1}, golden) \
        == ["/new: new", "/layers[0]/token: 1 != 0", "/name: 'y' != 'x'", "/stderr: 4.8 != 4.62313"]
    assert _differences({"layers": [], "stderr": 4.62313, "name": "x"}, golden) == ["/layers: 0 items, not 1"]
