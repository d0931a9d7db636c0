"""Half precision on every path: bfloat16 and float16 against float32, through the CLI.

Every command a user runs (detect, --stream, --verify, ablate --out, eval on every built-in task
zeroed and with --restore-activation, --harness, generate, quantize, study) runs once per dtype on
a tiny Llama with a planted super weight and a byte-level tokenizer (so every task's text is real
tokens, not <unk>), and once more on the real SmolLM2 for detection, where the activations are
realistically large (24,000 in the residual stream). The results are compared with float32's
within the tolerances below (README, "Half precision").

The same runs, on `cuda:0` and with part of the model offloaded (`--device-map auto
--max-memory`), are compared with the CPU's in tests/test_cuda.py.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import DATA_DIR, PLANTED
from superweight.cli import app

HALF = ("bfloat16", "float16")
LIMIT, MAX_LENGTH = "4", "256"

# Every perplexity-like metric (word / byte perplexity, bits per byte, lambada's perplexity,
# --verify's perplexities) is compared as its logarithm, the mean negative log-likelihood per
# token (or word, byte): absolute tolerance against float32 below, in nats. The log-softmax is
# taken in float32 and the sums in float64 whatever the dtype, so what is left is the weights' and
# the activations' rounding (bfloat16 keeps 8 significant bits, float16 11). Measured on the tiny
# model (its losses are large, 40-67 nats per token) at --max-length 256: at most 0.034 (bfloat16) and
# 0.020 (float16) (scripts/half_precision_gap.py). --max-length is 256, not less: a continuation
# longer than it is refused (piqa's are up to 167 byte tokens), and the model reads 256 positions.
# A log-softmax taken in bfloat16 moves such a loss by ~0.2 nats and fails.
NLL_ATOL = {"float32": 1e-6, "bfloat16": 0.06, "float16": 0.04}
# Accuracies: at most one document of the LIMIT may change its answer (a near tie between two
# choices can flip under rounding); on these runs none did.
ACCURACY_ATOL = 1 / int(LIMIT) + 1e-9
# WinoGrande scores one continuation after two contexts that differ by one word; on the random
# tiny model the two log-likelihoods tie to ~1e-4, so rounding decides its accuracy (bfloat16 flips
# 3 of 4). Its accuracy is not compared here (its log-likelihood path is lambada's and piqa's).
NEAR_TIES = {"winogrande"}
# lm-eval's HF backend (`--harness`) takes the log-softmax in the model's dtype: in bfloat16 a
# continuation's log-likelihood keeps 8 significant bits (float16: 11), so its mean negative
# log-likelihood, log(perplexity), is compared, relative. Measured on the tiny model: 1.5e-3 / 5e-4.
HARNESS_NLL_RTOL = {"float32": 1e-5, "bfloat16": 5e-3, "float16": 2e-3}


def invoke(*args) -> dict:
    """`sw ARGS -q --json` through Typer's runner; the parsed JSON (exit 0 asserted)."""
    args = [str(a) for a in args]
    result = CliRunner().invoke(app, [args[0], "-q", "--json", *args[1:]])
    assert result.exit_code == 0, result.output[-3000:]
    stdout = result.stdout if hasattr(result, "stdout") else result.output
    return json.loads(stdout)


MULTIPLE_CHOICE = "lambada_openai,piqa,arc_easy,arc_challenge,hellaswag,sciq,winogrande"


def by_name(document: dict) -> dict:
    """`sw eval --json`'s configurations (a list), by name."""
    return {run["name"]: run for run in document["configurations"]}


def run_every_path(model_dir: Path, dtype: str, placement: list[str], out: Path, harness_tasks: Path | None,
                   stream: bool = True, quantize: bool = True) -> dict[str, dict]:
    """Every command on the tiny model in `dtype`, placed by `placement` (e.g. --device cuda:0);
    the JSON of each, keyed by a short name. Outputs go under `out`. Every built-in task runs with
    --compare (original, zeroed, zeroed + activation restored, random control); wikitext on one
    document (a byte tokenizer makes its 5,663 characters as many tokens), the others on LIMIT."""
    out.mkdir(parents=True, exist_ok=True)
    common = ["--dtype", dtype, *placement]
    coord = ["--coord", PLANTED]
    data = ["--data-dir", DATA_DIR, "--max-length", MAX_LENGTH]
    runs = {
        "detect": invoke("detect", model_dir, *common, "--out", out / "detect.yaml"),
        "verify": invoke("detect", model_dir, *common, "--verify", "--out", out / "verify.yaml"),
        "ablate": invoke("ablate", model_dir, *common, *coord, "--out", out / "ablated"),
        "eval_choice": invoke("eval", model_dir, *common, *coord, "--compare", "--task", MULTIPLE_CHOICE,
                              "--limit", LIMIT, *data),
        "eval_wikitext": invoke("eval", model_dir, *common, *coord, "--compare", "--task", "wikitext",
                                "--limit", "1", *data),
        "generate": invoke("generate", model_dir, *common, *coord, "--prompt", "Apple Inc. is",
                           "--max-new-tokens", "6"),
        "study": invoke("study", model_dir, *common, *coord, "--task", "lambada_openai,piqa", "--grid", "0,1",
                        "--limit", "2", *data, "--out", out / "study"),
    }
    if harness_tasks is not None:  # lm-eval's lambada on the restored model, beside the built-in one
        runs["harness"] = invoke("eval", model_dir, *common, *coord, "--restore-activation", "--task",
                                 "lambada_openai", "--harness", "sw_lambada_openai", "--harness-include",
                                 harness_tasks, "--limit", LIMIT, *data)
    if stream:
        runs["stream"] = invoke("detect", model_dir, *common, "--stream", "--out", out / "stream.yaml")
    if quantize:
        runs["quantize"] = invoke("quantize", model_dir, *common, *coord, "--block-size", "64", "--limit", "1",
                                  *data)
    return runs


# ----------------------------------------------------------------------------- comparisons

def coordinates(document: dict) -> list[tuple]:
    return sorted((w["layer"], w["row"], w["col"]) for w in document["super_weights"])


def close_in_log(value: float, reference: float, dtype: str) -> bool:
    """Perplexity-like numbers compared as log(value), the mean negative log-likelihood."""
    if value == reference:
        return True
    return value > 0 and reference > 0 and abs(math.log(value) - math.log(reference)) <= NLL_ATOL[dtype]


MISMATCHES: list[str] = []  # collected over one comparison, so a failure lists every metric out of bounds


def assert_metrics_close(got: dict, expected: dict, dtype: str, where: str) -> None:
    """Each task's metrics (lm-eval's layout: task -> metric -> value) within the tolerances."""
    assert got.keys() == expected.keys(), where
    for task, metrics in expected.items():
        for metric, value in metrics.items():
            if "stderr" in metric or not isinstance(value, float):
                continue
            mine = got[task][metric]
            label = f"{where}: {task} {metric} {dtype} {mine!r} vs float32 {value!r}"
            if metric.startswith("acc"):
                if task not in NEAR_TIES and abs(mine - value) > ACCURACY_ATOL:
                    MISMATCHES.append(label)
            elif not (math.isfinite(mine) and close_in_log(mine, value, dtype)):
                MISMATCHES.append(label)


def compare_runs(got: dict[str, dict], reference: dict[str, dict], dtype: str, expect_dtype: str | None = None) -> None:
    """Every path of `got` (run in `dtype`) against `reference` (float32, or the CPU's)."""
    MISMATCHES.clear()
    # Detection: the same coordinates, full and streamed; --verify the same labels.
    for name in ("detect", "verify", "stream"):
        if name in got:
            assert coordinates(got[name]) == coordinates(reference["detect"]), name
    labels = {(w["layer"], w["row"], w["col"]): w.get("role") for w in got["verify"]["super_weights"]}
    assert labels == {(w["layer"], w["row"], w["col"]): w.get("role") for w in reference["verify"]["super_weights"]}
    for key in ("perplexity", "all_zeroed", "restored"):
        value, expected = got["verify"]["verification"][key], reference["verify"]["verification"][key]
        if value is None and expected is None:  # a model verification names broken is not measured further
            assert got["verify"]["verification"]["broken"] and reference["verify"]["verification"]["broken"]
            continue
        assert close_in_log(value, expected, dtype), f"--verify {key}: {value} vs {expected}"
    # Ablation: the weight zeroed, the file's dtype recorded.
    ablation = got["ablate"]["ablation"]
    assert ablation["new_values"] == [0.0] and ablation["dtype"] == (expect_dtype or dtype)
    assert ablation["original_values"] == pytest.approx(reference["ablate"]["ablation"]["original_values"], rel=1e-2)
    # Evaluation: every built-in task zeroed and restored, and lm-eval's own numbers.
    for name in ("eval_choice", "eval_wikitext"):
        configurations = by_name(got[name])
        expected_runs = by_name(reference[name])
        assert list(configurations) == list(expected_runs)
        for row, result in configurations.items():
            assert result["config"]["model_dtype"] == (expect_dtype or dtype)
            assert_metrics_close(result["results"], expected_runs[row]["results"], dtype,
                                 f"{name} {row}")
    if "harness" in got:  # lm-eval's number against float32's built-in one (equal in float32: test_harness)
        expected = next(run for run in by_name(reference["eval_choice"]).values()
                        if run["ablation"]["kind"] == "restored")["results"]["lambada_openai"]
        harness = got["harness"]["configurations"][0]["results"]  # one run: a list of one
        ours, theirs = harness["lambada_openai"], harness["sw_lambada_openai"]
        assert_metrics_close({"lambada_openai": ours}, {"lambada_openai": expected}, dtype, "harness, built-in")
        assert abs(theirs["acc"] - expected["acc"]) <= ACCURACY_ATOL
        # lm-eval rounds each log-likelihood: compare the mean negative log-likelihood, log(perplexity).
        assert math.log(theirs["perplexity"]) == pytest.approx(math.log(expected["perplexity"]),
                                                               rel=HARNESS_NLL_RTOL[dtype])
    # Generation: the same greedy tokens as float32 where the model is intact (original, restored,
    # control); the zeroed model's head is near-uniform, where any rounding changes the argmax.
    def kept(document):
        zeroed = {c["name"] for c in document["configurations"] if c["kind"] == "ablated"}
        return [g["token_ids"] for g in document["generations"] if g["configuration"] not in zeroed]

    assert kept(got["generate"]) == kept(reference["generate"])
    assert all(len(g["token_ids"]) == 6 for g in got["generate"]["generations"])
    # Quantization: the unquantized baseline and each block size's naive and aware rows.
    if "quantize" in got:
        assert_metrics_close(got["quantize"]["unquantized"], reference["quantize"]["unquantized"], dtype, "quantize")
        for mine, theirs in zip(got["quantize"]["weights"], reference["quantize"]["weights"], strict=True):
            for side in ("naive", "aware"):
                assert_metrics_close(mine[side], theirs[side], dtype, f"quantize {side} {mine['block_size']}")
    # The study: its Table 1 and sweep through the same comparisons.
    assert_study_close(got["study"], reference["study"], dtype)
    assert not MISMATCHES, "\n".join(MISMATCHES)


def _numbers(value, path=""):
    """(path, float) for every float inside a JSON value, dicts and lists walked in order."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}[{i}]")
    elif isinstance(value, float):
        yield path, value


def assert_study_close(got: dict, expected: dict, dtype: str) -> None:
    assert coordinates(got) == coordinates(expected)
    for section in ("table", "sweep"):
        mine, theirs = list(_numbers(got[section])), list(_numbers(expected[section]))
        assert [p for p, _ in mine] == [p for p, _ in theirs], section
        for (path, value), (_, reference) in zip(mine, theirs):
            if "stderr" in path:
                continue
            label = f"study {section}{path}: {dtype} {value!r} vs float32 {reference!r}"
            if "acc" in path.rsplit(".", 1)[-1]:
                if abs(value - reference) > ACCURACY_ATOL:
                    MISMATCHES.append(label)
            elif not close_in_log(value, reference, dtype):
                MISMATCHES.append(label)


# ----------------------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def own_cache(tmp_path_factory):
    """The study's evaluation cache in a folder of this module's, so every run computes."""
    previous = os.environ.get("SUPERWEIGHT_CACHE")
    os.environ["SUPERWEIGHT_CACHE"] = str(tmp_path_factory.mktemp("half-cache"))
    yield
    if previous is None:
        os.environ.pop("SUPERWEIGHT_CACHE", None)
    else:
        os.environ["SUPERWEIGHT_CACHE"] = previous


@pytest.fixture(scope="module")
def float32_runs(byte_llama_dir, tmp_path_factory, own_cache):
    return run_every_path(byte_llama_dir, "float32", ["--device", "cpu"], tmp_path_factory.mktemp("float32"), None)


@pytest.mark.parametrize("dtype", HALF)
def test_every_path_in_half_precision_matches_float32(dtype, byte_llama_dir, harness_tasks, float32_runs,
                                                      tmp_path, own_cache):
    runs = run_every_path(byte_llama_dir, dtype, ["--device", "cpu"], tmp_path, harness_tasks)
    if os.environ.get("SW_KEEP_RUNS"):  # to inspect the numbers behind the tolerances
        for name, document in {**runs, **{f"{k}-float32": v for k, v in float32_runs.items()}}.items():
            (Path(os.environ["SW_KEEP_RUNS"]) / f"{name}-{dtype}.json").write_text(json.dumps(document, indent=1))
    compare_runs(runs, float32_runs, dtype)
    # The saved ablated model keeps the dtype, holds the zero, and is otherwise the loaded weights.
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "ablated" / "model.safetensors")
    original = load_file(byte_llama_dir / "model.safetensors")
    layer, row, col = map(int, PLANTED.split(","))
    name = f"model.layers.{layer}.mlp.down_proj.weight"
    assert saved[name].dtype == getattr(torch, dtype) and saved[name][row, col] == 0
    expected = original[name].to(getattr(torch, dtype))
    expected[row, col] = 0
    assert torch.equal(saved[name], expected)


# SmolLM2's float32 detection (tests/golden/detect.json): the five weights and the super weight's write.
SMOLLM2_FOUND = [(1, 507, 83), (2, 507, 90), (2, 507, 430), (11, 507, 1229), (11, 507, 1487)]
SMOLLM2_SUPER_ACTIVATION = 24021.9


@pytest.mark.integration
@pytest.mark.parametrize("dtype", HALF)
def test_smollm2_detection_in_half_precision(dtype, smollm2, tmp_path):
    """SmolLM2's float32 directory read in half precision: the same five weights as float32, and
    its super activation (~24,000; float16 holds up to 65,504) within 2 % of float32's. Half
    precision is slow on a CPU (4x float32 here), so this is the one SmolLM2 run."""
    found = invoke("detect", smollm2.model.name_or_path, "--dtype", dtype, "--out", tmp_path / "c.yaml")
    assert coordinates(found) == SMOLLM2_FOUND
    spike = next(w["output_spike"] for w in found["super_weights"] if (w["layer"], w["col"]) == (11, 1229))
    assert spike == pytest.approx(SMOLLM2_SUPER_ACTIVATION, rel=0.02)
