"""`sw eval`: perplexity and zero-shot accuracy, of the model as given, ablated in memory, or in
the paper's Table 1 layout."""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..brief_repr import BriefRepr
from ..versions import __version__
from ..coords import DEFAULT_SELECTION, check_selection, requested
from ..distributed import main_proceeds
from ..errors import UsageError
from ..files import atomic_write_text, output_file
from ..measure.configurations import SummaryTable, check_control, comparison_configurations, parse_factor, \
    run_configurations, single_configuration, summary_table
from ..measure.harness import HarnessTasks, check_harness_tasks
from ..model.options import LoadOptions
from ..measure.limits import check_limits
from .prepare import Coords, Model, ablated_folder, batch_size_option, check_outputs, configuration_progress, \
    model_source, ready_model, recorded_coordinates, tasks_with_data
from .reporter import Reporter


@dataclass(repr=False)
class EvaluationResult(BriefRepr):
    """The metrics of every evaluated configuration, and the document `--output` holds."""

    runs: dict[str, dict[str, Any]]  # configuration name -> lm-eval layout results of its tasks
    document: dict[str, Any]  # the `--output` file: lm-eval's layout (see `output_document`)
    output: Optional[Path]
    harness_computed_by: Optional[str] = None  # with harness tasks: who computed their columns
    limit: Optional[int] = None  # --limit where it left some documents out, else None

    @property
    def spec(self) -> str:
        return self.document["model"]["spec"]

    def to_dict(self) -> dict[str, Any]:
        """The `sw eval --json` document, one shape whatever the options (docs/json/eval.schema.json):
        {"model", "tool", "configurations": [{"name", "kind", "ablation", "results", "n_samples", ...}]},
        a single run being a list of one; each entry is `runs[name]` with its name and kind first
        (`kind` where `sw generate --json` has it, at the top of each configuration)."""
        return {"model": self.document["model"], "tool": self.document["tool"],
                "configurations": [{"name": name, "kind": run["ablation"]["kind"], **run}
                                   for name, run in self.runs.items()]}

    def table(self) -> SummaryTable:
        """Configurations by metric, each value with its standard error."""
        return summary_table(self.runs)

    def notes(self) -> list[str]:
        """Where `--limit` leaves a difference between configurations smaller than its error."""
        return self.table().limit_notes(None if self.limit is None else f"--limit {self.limit}")


def output_document(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The `--output` file in lm-eval's own layout (`results`, `n-samples`, `config` at the top, as
    lm-eval writes them: its key is `n-samples`, where `--json` and `runs` say `n_samples`) for one
    configuration; with several, {"configurations": {name: that}}."""
    files = {name: {("n-samples" if key == "n_samples" else key): value for key, value in run.items()}
             for name, run in runs.items()}
    if len(files) == 1:
        return next(iter(files.values()))
    return {"configurations": files}


def evaluate_model(model: Model = None, *, task: Optional[list[str]] = None, force: bool = False,
                   harness: Optional[list[str]] = None, harness_include: Optional[list[Path]] = None,
                   coords: Coords = None, coord: Optional[list[str]] = None, select: str = DEFAULT_SELECTION, mode: Optional[str] = None,
                   factor: Optional[str] = None, control: Optional[str] = None, top: Optional[int] = None,
                   restore_activation: bool = False, compare: bool = False, data_dir: Optional[str] = None,
                   limit: Optional[int] = None, batch_size: int | str = "auto", max_length: Optional[int] = None,
                   seed: int = 0, output: Optional[Path] = None, options: Optional[LoadOptions] = None,
                   reporter: Optional[Reporter] = None) -> Optional[EvaluationResult]:
    """`sw eval`: perplexity and zero-shot accuracy, of the model as given or ablated in memory
    (`coords`/`coord`), or of the paper's Table 1 layout (`compare`); `output` gets the results.
    A model given in memory is evaluated as it is now, and left so: each ablation is undone."""
    reporter = reporter or Reporter()
    check_selection(select)
    factor = None if factor is None else str(factor)
    output = output_file(output)
    if isinstance(task, str):
        task = [task]
    if compare and (mode not in (None, "zero") or factor is not None):
        raise UsageError("--compare evaluates the paper's zeroing layout; drop --mode/--factor, or drop --compare")
    how, value = parse_factor(factor, mode)
    if mode is None and factor is not None:
        reporter.say(f"--factor {factor} given: scaling the weights (--mode scale)")
    check_control(control, top)
    check_limits(limit, max_length)
    batch = batch_size_option(batch_size)
    names = tasks_with_data(task or ["wikitext"], data_dir) if task or not harness else []
    lm_eval_tasks = None
    if harness or harness_include:
        lm_eval_tasks = HarnessTasks(tuple(harness or ()), tuple(map(str, harness_include or ())))
        check_harness_tasks(lm_eval_tasks, builtin=names)
    weights = requested(coords, coord, select, say=reporter.note)
    source = model_source(model, options)
    check_outputs(source, files=(output,), force=force, coords=coords)
    with ExitStack() as recorded:  # a folder's recorded values, put back for the evaluation only
        # Without coordinates, --compare, --restore-activation and --control on a folder `sw ablate`
        # wrote act on the weights its record holds, in the original model its record puts back: the
        # rows are the original and the folder's own ablation, as `sw eval MODEL --compare --coords`
        # gives them. A lone row that acts on weights (no --compare: no first row to say what the
        # model is) acts in that original too, so that it is what its name says, not the folder's
        # zeros and then its own; where the record holds no original values, its name says so.
        from_record = not weights and (compare or restore_activation or control)
        lone_row = not compare
        folder = ablated_folder(reporter, source, None if from_record or lone_row else weights,
                                compare or from_record or bool(weights), recorded)
        if from_record:
            weights = recorded_coordinates(reporter, source, folder)
            if weights and how == "zero" and not control and folder.record.get("mode") == "scale":
                reporter.note("the folder's ablation scaled these weights; these rows zero them (the paper's "
                              f"layout); `sw eval {source.spec}` alone evaluates the folder as written")
        if (compare or restore_activation or control) and not weights:
            raise UsageError("--compare, --restore-activation and --control need --coords FILE or --coord L,R,C "
                             "(on a folder `sw ablate` wrote, they take its record's)")
        unchanged = folder.name
        on_top_of = folder.name if folder.record is not None and folder.put_back is None else None
        loaded, weights = ready_model(reporter, model, options, source, weights, coords, put_back=folder.put_back)
        if compare:
            configurations = comparison_configurations(loaded.model, weights, control=control, seed=seed, top=top,
                                                       unchanged=unchanged)
        else:
            configurations = [single_configuration(loaded.model, weights, mode=how, factor=value,
                                                   restore_activation=restore_activation, control=control,
                                                   seed=seed, top=top, unchanged=unchanged, on_top_of=on_top_of)]
        with reporter.bars() as bar:
            on_start, on_progress = configuration_progress(bar)
            runs = run_configurations(
                loaded.model, loaded.tokenizer, configurations, names, on_start=on_start, data_dir=data_dir,
                limit=limit, batch_size=batch, max_length=max_length, seed=seed, progress=on_progress,
                harness=lm_eval_tasks)
    if not main_proceeds():  # every rank got here: rank 0 writes and prints
        return None
    document = output_document(runs)
    document["model"] = {"spec": source.spec, "location": source.location, "kind": source.kind,
                         "dtype": loaded.dtype, "superweight_ablation": folder.record}
    document["tool"] = f"superweight {__version__}"
    if output:
        atomic_write_text(output, json.dumps(document, indent=2) + "\n")
    # A --limit at or past every task's size read every document: no "first N documents", no --limit note.
    cut = any(count["effective"] < count["original"] for run in runs.values()
              for count in run.get("n_samples", {}).values())
    return EvaluationResult(runs=runs, document=document, output=output,
                            harness_computed_by=lm_eval_tasks.describe()["computed_by"] if lm_eval_tasks else None,
                            limit=limit if cut else None)
