"""lm-evaluation-harness's own evaluator on the model as configured here, in memory.

Any task lm-eval knows, or one of a user's task YAMLs (`include`), runs through lm-eval's
`simple_evaluate` on the loaded model wrapped in lm-eval's `HFLM`. Nothing is saved: the weights
ablated in place and the restoration hooks act on every forward pass lm-eval makes. The results
come back in the layout `evaluate.evaluate` returns (task -> metric -> value, `_stderr` beside),
marked with the lm-eval version that computed them.

lm-eval is an optional extra (`pip install 'superweight[harness]'`); it is imported only here.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import DataError, MissingDependencyError, UsageError, first_line
from ..model.placement import execution_device
from .limits import check_max_length
from ..versions import package_version
from .metrics import BOOTSTRAP_RESAMPLES, plain

INSTALL_HINT = "pip install 'superweight[harness]'"
CPU_BATCH_SIZE = 16  # lm-eval's "auto" probes batches of max_length tokens: minutes on a CPU


@dataclass(frozen=True)
class HarnessTasks:
    """lm-eval task (or group, or tag) names, and folders of extra task YAMLs."""

    names: tuple[str, ...]
    include: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        return {"computed_by": f"lm-eval {lm_eval_version()}", "tasks": list(self.names),
                "include": list(self.include)}


def lm_eval_version() -> str | None:
    return package_version("lm_eval", "lm-eval")


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MissingDependencyError(f"--harness needs lm-evaluation-harness, which is not installed; "
                                     f"install it with: {INSTALL_HINT}") from None
    # lm-eval logs every step at INFO, and warns that a model object ignores its loading options.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return TaskManager


def check_harness_tasks(tasks: HarnessTasks, builtin: Sequence[str] = ()) -> None:
    """Fail now, before a model loads: lm-eval missing, an include folder or a task unknown, a
    task also among the `builtin` ones (the results would collide), or one whose data lm-eval
    cannot read."""
    if not tasks.names:
        raise UsageError("--harness-include adds task YAMLs for --harness; name the task(s) with --harness TASK")
    both = [name for name in tasks.names if name in builtin]
    if both:
        raise UsageError(f"{', '.join(both)} given both as --task and --harness; their results would share a "
                         "name: run them in two commands")
    TaskManager = _import_lm_eval()
    from lm_eval.tasks import get_task_dict

    for folder in tasks.include:
        if not Path(folder).is_dir():
            raise UsageError(f"--harness-include {folder} is not a directory of lm-eval task YAMLs")
    manager = TaskManager(include_path=list(tasks.include) or None)
    unknown = [name for name in tasks.names if name not in manager.all_tasks]
    if unknown:
        raise UsageError(f"unknown lm-eval task {', '.join(unknown)}; `lm-eval ls tasks` lists them"
                         + ("" if tasks.include else ", --harness-include DIR adds your own YAMLs"))
    try:
        with _quiet_output():
            get_task_dict(list(tasks.names), manager)
    except Exception as e:  # lm-eval and datasets raise anything from OSError to ValueError here
        raise DataError(f"lm-eval could not load {', '.join(tasks.names)}: {type(e).__name__}: {first_line(e)}") from None


@contextmanager
def _quiet_output() -> Iterator[None]:
    """lm-eval's and datasets' tqdm bars, and the "fatal: not a git repository" of the `git describe`
    lm-eval runs, would interleave with the caller's own progress on stderr, and lm-eval prints
    "bootstrapping for stddev" on stdout, where results go: all of it goes nowhere."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        with redirect_stderr(io.StringIO()), redirect_stdout(io.StringIO()):
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _metric_name(key: str) -> str:
    """lm-eval's "acc,none" -> "acc"; a filtered metric keeps its filter: "exact_match,strict-match"."""
    metric, _, filter_name = key.partition(",")
    return metric if filter_name in ("", "none") else key


def evaluate_harness(model, tokenizer, tasks: HarnessTasks, *, limit: int | None = None,
                     batch_size: int | str = "auto", max_length: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Run lm-eval's `simple_evaluate` on `model` as it is now; returns `evaluate`'s layout.

    `batch_size` "auto" is lm-eval's own search on accelerators and 16 on CPUs. lm-eval's seeds
    are all `seed`; perplexity-like metrics bootstrap their stderr with as many resamples as the
    built-in tasks (lm-eval's command line default is 100000; the metric values do not depend on it).
    """
    TaskManager = _import_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    check_max_length(model, tokenizer, max_length)
    device = execution_device(model.get_input_embeddings())
    if batch_size == "auto" and device.type == "cpu":
        batch_size = CPU_BATCH_SIZE
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    # HFLM sends inputs to `model.device`, the first parameter's: "meta" when accelerate offloaded
    # it. Inputs belong where the embeddings run.
    lm._device = device
    was_training = model.training
    model.eval()
    try:
        with _quiet_output():
            out = simple_evaluate(model=lm, tasks=list(tasks.names),
                                  task_manager=TaskManager(include_path=list(tasks.include) or None),
                                  limit=limit, bootstrap_iters=BOOTSTRAP_RESAMPLES, log_samples=False,
                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed)
    finally:
        model.train(was_training)
    results = {
        task: {_metric_name(key): plain(value) for key, value in metrics.items() if "," in key}
        for task, metrics in out["results"].items()
    }
    return {
        "results": results,
        "n_samples": {task: dict(counts) for task, counts in out.get("n-samples", {}).items()},
        "harness": {**tasks.describe(), "results": list(results), "batch_size": batch_size, "max_length": lm.max_length,
                    "num_fewshot": {task: n for task, n in out.get("n-shot", {}).items()}},
    }
