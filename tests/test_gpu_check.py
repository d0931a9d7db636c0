"""scripts/gpu_check.sh, the device check, as far as a machine without a GPU can check it quickly:
the script parses, lists its steps, its setup step finds the data and the model on the CPU, and its
summary fails the check when a step or a number is wrong. The whole dry run
(`bash scripts/gpu_check.sh --cpu-dry-run`, several minutes) is run by hand."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

from conftest import DATA_DIR, REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"


def load_report():
    spec = importlib.util.spec_from_file_location("gpu_check_report", REPO / "scripts" / "gpu_check_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_parses_and_lists_its_steps():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    steps = subprocess.run(["bash", SCRIPT, "--list-steps"], capture_output=True, text=True, check=True).stdout.split()
    assert steps == ["setup", "cuda_tier", "bench_gpu", "compare_lm_eval", "torchrun_eval"]
    wrong = subprocess.run(["bash", SCRIPT, "--no-such-option"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "unknown option" in wrong.stderr
    wrong = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env={**os.environ, "GPU_CHECK_ONLY": "bench"})
    assert wrong.returncode == 2 and "GPU_CHECK_ONLY: no step 'bench'" in wrong.stderr


def test_the_setup_step_finds_the_data_and_the_model_on_the_cpu(smollm2, gguf_cache, tmp_path):
    """The dry run's first step alone (GPU_CHECK_ONLY=setup): the step functions run in child shells,
    so what they read must be exported (the data's default place is found from REPO)."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_CHECK_ONLY": "setup", "SUPERWEIGHT_CACHE": str(gguf_cache),
           "GPU_CHECK_KEEP": str(tmp_path / "keep")}
    env.pop("SUPERWEIGHT_DATA", None)
    if DATA_DIR.resolve() != (REPO.parent / "shared" / "data").resolve():
        env["SUPERWEIGHT_DATA"] = str(DATA_DIR)
    done = subprocess.run(["bash", SCRIPT, "--cpu-dry-run"], capture_output=True, text=True, env=env, timeout=300)
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert done.returncode == 0, log
    document = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert document["ok"] and document["failed"] == []
    assert document["not_run"] == ["cuda_tier", "bench_gpu", "compare_lm_eval", "torchrun_eval"]
    assert [s["status"] for s in document["steps"]] == ["ok"] + ["not run: GPU_CHECK_ONLY"] * 4
    assert "SmolLM2 cached:" in log and "\ndata: " in log
    assert "the steps asked for passed (not run: cuda_tier, bench_gpu, compare_lm_eval, torchrun_eval)" in done.stdout


def test_the_tests_deselected_here_find_their_fixtures():
    """The cuda and quantizers tiers never run on this machine, so a fixture they name that no
    conftest or module of theirs provides would first fail on the GPU (the CUDA tier's tiny model
    lived in test_half_precision.py, out of test_cuda.py's reach). pytest --setup-plan resolves every
    fixture of those tests and runs nothing."""
    planned = subprocess.run([sys.executable, "-m", "pytest", "-q", "--setup-plan", "-p", "no:cacheprovider",
                              "-m", "cuda or quantizers", "tests/"], cwd=REPO, capture_output=True, text=True,
                             env={**os.environ, "SUPERWEIGHT_TEST_SELECT_ALL": "1"}, timeout=300)
    assert planned.returncode == 0, planned.stdout[-3000:]
    tests = re.findall(r"^\s+(tests/\S+) \(fixtures used: ([^)]*)\)", planned.stdout, re.M)
    assert len(tests) >= 9, planned.stdout[-3000:]  # 6 cuda + 3 quantizers today
    fixtures = dict(tests)
    assert "byte_llama_dir" in fixtures["tests/test_cuda.py::test_every_path_on_the_gpu_matches_the_cpu[bfloat16-offload]"]


def write_steps(work, rows):
    (work / "steps.tsv").write_text("".join(f"{name}\t{status}\t{seconds}\t{budget}\n" for name, status, seconds, budget in rows))


COMPARE = {"piqa": {"docs": 6, "ours": {"acc": 0.5, "acc_norm": 0.5}, "lm_eval": {"acc": 0.5, "acc_norm": 0.5},
                    "our_seconds": [1.0, 2.0, 3.0], "lm_eval_seconds": [4.0, 4.0, 4.0], "lm_eval_batch_size": 4}}


def test_summary_passes_when_every_step_passed_and_numbers_agree(tmp_path):
    write_steps(tmp_path, [("setup", "ok", 1.5, 90), ("compare_lm_eval", "ok", 3.0, 150)])
    (tmp_path / "compare_lm_eval.json").write_text(json.dumps(COMPARE))
    assert load_report().summary(tmp_path, tmp_path) == 0
    document = json.loads((tmp_path / "gpu_check.json").read_text())
    assert document["ok"] and document["seconds"] == 4.5
    assert document["figures"]["compare_lm_eval"]["piqa"]["speed_ratio"] == 2.0
    assert document["goals"]["every task >= 1.5x lm-eval HF"] == {"worst": 2.0, "met": True}


def test_summary_fails_on_a_failed_step_or_numbers_unlike_lm_evals(tmp_path):
    write_steps(tmp_path, [("setup", "ok", 1.0, 90), ("cuda_tier", "failed: over its 150 s budget", 150.0, 150),
                           ("compare_lm_eval", "ok", 3.0, 150)])
    differing = json.loads(json.dumps(COMPARE))
    differing["piqa"]["ours"]["acc"] = 0.6
    (tmp_path / "compare_lm_eval.json").write_text(json.dumps(differing))
    assert load_report().summary(tmp_path, tmp_path) == 1
    document = json.loads((tmp_path / "gpu_check.json").read_text())
    assert document["failed"] == ["cuda_tier", "compare_lm_eval"]
    assert document["figures"]["compare_lm_eval_unequal"] == ["piqa acc: ours 0.6, lm-eval 0.5"]


def test_perplexities_agree_to_a_relative_tolerance_accuracies_exactly():
    report = load_report()
    assert report.numbers_equal(30.7133, 30.7133 * (1 + 5e-6), "word_perplexity")
    assert not report.numbers_equal(30.7133, 30.72, "word_perplexity")
    assert not report.numbers_equal(0.5, 0.5 + 1e-9, "acc")
