"""`sw eval --harness`: lm-evaluation-harness's own evaluator on the model as configured here.

lm-eval reads the local data through task YAMLs written as scripts/compare_lm_eval.py writes them
(lm-eval's own task, its dataset swapped for a local JSON lines file), so nothing is downloaded.
"""

import json
import sys

import pytest

from conftest import DATA_DIR, REPO, lm_eval_task_folder
from test_cli import assert_one_line_error, invoke

SMOLLM2_SUPER_WEIGHTS = "super_weights:\n  - {layer: 11, row: 507, col: 1229}\n  - {layer: 11, row: 507, col: 1487}\n"
LIMIT = 8


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A folder of lm-eval task YAMLs `sw_<task>` that read /work/shared/data."""
    return lm_eval_task_folder(tmp_path_factory, ("piqa", "lambada_openai"))


@pytest.fixture
def smollm2_coords(tmp_path):
    path = tmp_path / "smollm2.yaml"
    path.write_text(SMOLLM2_SUPER_WEIGHTS)
    return path


def test_without_lm_eval_one_line_says_how_to_install(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    output = tmp_path / "results.json"
    result = invoke("eval", tiny_llama_dir, "-q", "--harness", "piqa", "--output", output)
    assert_one_line_error(result, "pip install 'superweight[harness]'")
    assert result.exit_code == 1 and not output.exists()


@pytest.mark.parametrize("args,fragment", [
    (["--harness", "no_such_task_anywhere"], "unknown lm-eval task no_such_task_anywhere"),
    (["--harness-include", "{tasks}"], "name the task(s) with --harness TASK"),
    (["--harness", "sw_piqa", "--harness-include", "{tasks}/missing"], "is not a directory"),
    (["--harness", "sw_piqa", "--harness-include", "{tasks}", "--task", "sw_piqa"], "unknown task"),
    (["--harness", "piqa", "--task", "piqa"], "run them in two commands"),
])
def test_bad_harness_options(tiny_llama_dir, task_dir, tmp_path, args, fragment):
    output = tmp_path / "results.json"
    args = [a.replace("{tasks}", str(task_dir)) for a in args]
    result = invoke("eval", tiny_llama_dir, "-q", "--data-dir", DATA_DIR, "--output", output, *args)
    assert_one_line_error(result, fragment)
    assert result.exit_code == 2 and not output.exists()


def test_a_task_whose_data_lm_eval_cannot_read_fails_before_the_model_loads(tmp_path, task_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "sw_broken.yaml").write_text((task_dir / "sw_piqa.yaml").read_text().replace(
        "task: sw_piqa", "task: sw_broken").replace(str(task_dir / "piqa.jsonl"), str(tmp_path / "none.jsonl")))
    # No such model either: the task's data is checked first.
    result = invoke("eval", tmp_path / "no-model", "-q", "--harness", "sw_broken", "--harness-include", broken)
    assert_one_line_error(result, "lm-eval could not load sw_broken")


def _metrics(results: dict) -> dict:
    """The values lm-eval computes, without the bootstrapped stderrs (their resample count is a setting)."""
    return {k: v for k, v in results.items() if not k.startswith("perplexity_stderr")}


@pytest.mark.integration
def test_harness_gives_exactly_lm_evals_own_result(smollm2, task_dir):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=smollm2.model, tokenizer=smollm2.tokenizer, batch_size=16)
    own = simple_evaluate(model=lm, tasks=["sw_piqa", "sw_lambada_openai"],
                          task_manager=TaskManager(include_path=str(task_dir)), limit=LIMIT, log_samples=False)
    result = invoke("eval", "-q", "--harness", "sw_piqa", "--harness", "sw_lambada_openai",
                    "--harness-include", task_dir, "--limit", LIMIT, "--json")
    assert result.exit_code == 0, result.output
    [document] = json.loads(result.output)["configurations"]
    for task in ("sw_piqa", "sw_lambada_openai"):
        expected = {k.split(",")[0]: v for k, v in own["results"][task].items() if "," in k}
        assert _metrics(document["results"][task]) == _metrics(expected)
        assert document["n_samples"][task] == {"original": own["n-samples"][task]["original"], "effective": LIMIT}
    assert document["harness"]["computed_by"].startswith("lm-eval 0.")
    assert document["harness"]["tasks"] == ["sw_piqa", "sw_lambada_openai"]


@pytest.mark.integration
def test_harness_sees_the_ablation_and_the_restoration_hook(smollm2, task_dir, smollm2_coords):
    """With --coords --restore-activation lm-eval's number equals the built-in task's, and differs
    from both the original's and the zeroed model's: the zeroed weights and the restoration hook
    act inside lm-eval's forward passes."""
    from superweight.edit.ablate import ablated
    from superweight.coords import read_coords
    from superweight.measure.evaluate import evaluate

    result = invoke("eval", "-q", "--data-dir", DATA_DIR, "--task", "lambada_openai", "--harness", "sw_lambada_openai",
                    "--harness-include", task_dir, "--coords", smollm2_coords, "--restore-activation",
                    "--limit", LIMIT, "--json")
    assert result.exit_code == 0, result.output
    [run] = json.loads(result.output)["configurations"]
    assert run["ablation"]["restore_activation"]
    ours, theirs = run["results"]["lambada_openai"], run["results"]["sw_lambada_openai"]
    assert theirs["acc"] == ours["acc"]
    assert theirs["perplexity"] == pytest.approx(ours["perplexity"], rel=1e-5)

    def builtin_perplexity() -> float:
        return evaluate(smollm2.model, smollm2.tokenizer, ["lambada_openai"], data_dir=str(DATA_DIR),
                        limit=LIMIT)["results"]["lambada_openai"]["perplexity"]

    original = builtin_perplexity()
    with ablated(smollm2.model, read_coords(smollm2_coords)[0]):
        zeroed = builtin_perplexity()
    assert theirs["perplexity"] != pytest.approx(original, rel=1e-3)
    assert theirs["perplexity"] != pytest.approx(zeroed, rel=1e-3)


def test_the_readme_local_task_yaml_runs_as_written(tiny_llama_dir, tmp_path):
    """README's one-file recipe (issue 21, point 13): lm-eval's lambada_openai on a local file,
    copied from the README with only its two placeholder paths filled in."""
    import re
    from pathlib import Path

    import lm_eval

    readme = (REPO / "README.md").read_text()
    recipe = re.search(r"<!-- local-task-yaml -->\n```yaml\n(.*?)```", readme, re.S).group(1)
    tasks = Path(lm_eval.__file__).parent / "tasks"
    recipe = recipe.replace("/path/to/lm_eval/tasks", str(tasks)).replace("/path/to/data", str(DATA_DIR))
    assert str(tasks) in recipe and str(DATA_DIR) in recipe  # the README's placeholders are these two
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    (folder / "my_lambada.yaml").write_text(recipe)
    command = re.search(r"HF_HUB_OFFLINE=1 sw eval (--harness my_lambada --harness-include my_tasks .*)", readme).group(1)
    args = command.split()
    args[args.index("my_tasks")] = str(folder)
    args[args.index("--limit") + 1] = "2"
    result = invoke("eval", tiny_llama_dir, "-q", "--max-length", "32", "--json", *args)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert "my_lambada" in json.dumps(document)
