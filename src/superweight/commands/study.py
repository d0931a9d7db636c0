"""`sw study`: the paper's analysis of one model (Table 1, the scale sweep, the stop-word shift,
the activation profile, generations), written as a report; cached evaluations are not run again."""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..brief_repr import BriefRepr
from ..versions import __version__
from ..coords import select_weights, DEFAULT_SELECTION, UNVERIFIABLE, SuperWeight, check_selection, requested
from ..distributed import main_proceeds, on_main
from ..edit.validate import CheckedCoords
from ..errors import UsageError
from ..find.detect import DEFAULT_PROMPT, encode_prompt
from ..measure import generate as generation
from ..measure.configurations import SummaryTable, summary_table
from ..measure.verify import labelled, verify
from ..model.load import LoadedModel, model_fingerprint
from ..model.source import ModelSource, cache_root
from ..model.options import LoadOptions
from ..model.placement import execution_device
from ..measure import study_runs
from ..measure.activation_profile import activation_profile
from ..measure.stop_words import cached_stop_word_shift, load_stop_words
from ..report import study as analysis
from ..measure.limits import check_limits
from .prepare import Coords, FolderAsGiven, Model, NamedAfterModel, ablated_folder, batch_size_option, check_outputs, \
    configuration_progress, detected, model_source, no_original_values, ready_model, step, tasks_with_data
from .reporter import Reporter


DEFAULT_OUT = NamedAfterModel("-study")  # `sw study`'s --out when none is given


@dataclass(repr=False)
class StudyResult(BriefRepr):
    """The paper's analysis of one model, as written to `out` (REPORT.md, report.json, plots)."""

    out: Path
    table: SummaryTable  # Table 1's configurations by metric
    super_weights: list[SuperWeight]
    runs: dict[str, dict[str, Any]]  # configuration name -> results (Table 1 and the scale sweep)
    meta: dict[str, Any]  # model, tasks, limit, seed, grid, evaluations (total, from_cache), seconds

    @property
    def report(self) -> Path:
        return self.out / analysis.REPORT_FILE

    @property
    def json_path(self) -> Path:
        return self.out / analysis.JSON_FILE

    def notes(self) -> list[str]:
        """Where reading only some documents leaves a difference in Table 1 smaller than its error."""
        return self.table.limit_notes(analysis.table_reading(self.meta))

    def to_dict(self) -> dict[str, Any]:
        """report.json, as written."""
        return json.loads(self.json_path.read_text(encoding="utf-8"))


def weights_digest(model: torch.nn.Module) -> str:
    """The values of every parameter in memory (offloaded ones by name and shape): a model given
    in memory may have been changed since it was read, so its name alone cannot key the cache."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(f"{name}{tuple(parameter.shape)}{parameter.dtype}".encode())
        if parameter.device.type != "meta":
            digest.update(parameter.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def recorded_folder(reporter: Reporter, source: ModelSource, stack: ExitStack) -> FolderAsGiven:
    """The model as given, for a study: for a folder written by `sw ablate`, every value its record
    holds is put back in memory while `stack` is open. Every part of a study compares with the
    original model (Table 1, the sweep's x1, the stop-word shift, the roles), so a record holding no
    original values to put back (a control's, an unreadable one) is refused rather than studied as
    "original"."""
    folder = ablated_folder(reporter, source, None, True, stack)
    if folder.record and folder.put_back is None:
        raise no_original_values(source, folder, "a study compares every row with the original model; study the "
                                 "original model instead")
    return folder


def run_study(model: Model = None, *, coords: Coords = None, coord: Optional[list[str]] = None, select: str = DEFAULT_SELECTION,
              task: list[str] | str = ("all",), limit: Optional[int | str] = None, top: Optional[int] = None,
              grid: Optional[str] = None, stop_words: Optional[Path] = None, out: Path | NamedAfterModel,
              force: bool = False, data_dir: Optional[str] = None, batch_size: int | str = "auto",
              max_length: Optional[int] = None, seed: int = 0, options: Optional[LoadOptions] = None,
              command: Optional[str] = None, reporter: Optional[Reporter] = None) -> Optional[StudyResult]:
    """`sw study`: Table 1, the scale sweep, the stop-word shift, the activation profile and
    generations, written to the folder `out` (required: the report is the result; `sw study` passes
    DEFAULT_OUT, ./<model>-study); cached evaluations are not run again.
    `limit`: documents per task, or "all"; without it a CPU run reads `study.CPU_LIMIT` documents of
    each zero-shot task and `study.CPU_WIKITEXT_LIMIT` of wikitext, an accelerator run all of them.
    `command` is recorded in the report as the command line that asked for it."""
    reporter = reporter or Reporter()
    check_selection(select)
    if out is None or str(out) == "":
        raise UsageError("--out names the folder the report is written to; give one (sw study writes ./<model>-study)")
    started = time.perf_counter()
    factors = study_runs.parse_grid(grid)
    limit = study_runs.parse_limit(limit)
    check_limits(None if limit == study_runs.ALL_DOCUMENTS else limit, max_length)
    batch = batch_size_option(batch_size)
    if top is not None and top <= 0:
        raise UsageError(f"--top must be a positive number of weights, got {top}")
    names = tasks_with_data(list(task) if not isinstance(task, str) else task, data_dir,
                            also=("wikitext",))  # the stop-word shift reads wikitext
    words = load_stop_words(stop_words)
    source = model_source(model, options)
    out_dir = out.path(source) if isinstance(out, NamedAfterModel) else Path(out)
    check_outputs(source, directory=out_dir, force=force, coords=coords)
    # Given coordinates are narrowed as every command narrows them (README: Vocabulary), by the
    # roles the file records; the verification below measures all of them for the report.
    acting = requested(coords, coord, select, say=lambda line: reporter.note(
        "Table 1 and the sweep act on " + line.removeprefix("acting on ")))
    with ExitStack() as recorded:  # a folder's recorded values, put back for the study only
        folder = recorded_folder(reporter, source, recorded)
        unchanged = folder.name
        loaded, weights = ready_model(reporter, model, options, source, requested(coords, coord, "all"), coords,
                                      put_back=folder.put_back)
        model_key = model_fingerprint(loaded)
        if isinstance(model, LoadedModel):
            model_key = json.dumps([model_key, weights_digest(loaded.model)])
        if folder.values:  # the same files, other values: never the folder's cached results as they are
            model_key = json.dumps([model_key, {"recorded values put back": folder.values}])
        cache = study_runs.EvaluationCache(cache_root((options or LoadOptions()).cache_dir) / "evaluations")
        prompt_ids = encode_prompt(loaded.tokenizer, DEFAULT_PROMPT)
        on_cpu = execution_device(loaded.model).type == "cpu"
        cpu_budget = limit is None and on_cpu
        limits = study_runs.task_limits(names, limit, on_cpu)
        documents = study_runs.documents_note(limits)
        if cpu_budget:
            reporter.note(f"reading {documents} ({study_runs.CPU_BUDGET_NOTE})")
        with reporter.bars() as bar:
            if not weights:
                weights = detected(reporter, loaded, bar, select="all", announce=False)  # verified and narrowed below
            verification = None
            if weights:
                verification = step(bar, "measuring each weight's effect",
                                    lambda: on_main(lambda: verify(loaded.model, loaded.tokenizer, weights)))
                weights = labelled(weights, verification)
            if acting:  # as given, and named as every command names them; the report gives the measured roles
                weights = CheckedCoords(loaded.model, acting)  # checked with the file's every entry
            else:  # detected here: narrowed by the roles just measured, as `detected` narrows them
                selection = select_weights(weights, select, "the detection", UNVERIFIABLE)
                reporter.note("Table 1 and the sweep act on " + selection.reason + ": "
                              + ", ".join(w.label() for w in selection.weights))
                weights = selection.weights
            table_configurations = study_runs.study_configurations(loaded.model, weights, top=top, seed=seed,
                                                                   unchanged=unchanged)
            sweep = study_runs.scale_sweep_configurations(weights, factors, unchanged=unchanged)
            on_start, on_progress = configuration_progress(bar)
            runs = study_runs.run_cached(
                cache, model_key, loaded.model, loaded.tokenizer, table_configurations + sweep, names,
                on_start=on_start, progress=on_progress, data_dir=data_dir, limit=limits,
                batch_size=batch, max_length=max_length, seed=seed)
            shift, shift_cached = on_main(lambda: cached_stop_word_shift(
                cache, model_key, loaded.model, loaded.tokenizer, weights, words, data_dir=data_dir,
                limit=study_runs.task_limits(["wikitext"], limit, on_cpu)["wikitext"],  # read even when not a task
                max_length=max_length, progress=lambda done, total: bar("stop-word shift", done, total)))
            if shift_cached:
                bar("stop-word shift (from the cache)", 1, 1)
            profile = step(bar, "activation profile",
                           lambda: activation_profile(loaded.model, prompt_ids, weights))
            generations = step(bar, "generations", lambda: on_main(
                lambda: generation.generate(loaded.model, loaded.tokenizer, table_configurations)))
            if not main_proceeds():  # every rank got here: rank 0 writes and prints
                return None
            table = summary_table({c.name: runs[c.name] for c in table_configurations})
            cached = sum(len(runs[c.name]["cached_tasks"]) for c in table_configurations + sweep)
            meta = {"command": command,
                    "model": {"spec": source.spec, "location": source.location, "dtype": loaded.dtype,
                              "device": str(execution_device(loaded.model)),
                              "superweight_ablation": folder.record},  # as in sw eval's JSON
                    "tasks": names, "limit": limit, "documents": limits, "documents_note": documents,
                    "cpu_budget": cpu_budget, "seed": seed, "grid": factors,
                    "evaluations": {"total": len(names) * len(table_configurations + sweep), "from_cache": cached},
                    "seconds": round(time.perf_counter() - started, 1), "tool": f"superweight {__version__}"}
            step(bar, f"writing {out_dir}", lambda: analysis.write_report(
                out_dir, force=force, super_weights=weights, table=table, sweep_rows=study_runs.sweep_rows(runs, sweep),
                stop_words=shift, profile=profile, meta=meta, verification=verification, generations=generations))
    # A plain list: the CheckedCoords above hold the model weakly, which pickle (and a notebook's
    # saved results) cannot carry.
    return StudyResult(out=out_dir, table=table, super_weights=list(weights), runs=runs, meta=meta)
