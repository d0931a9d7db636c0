"""`sw eval`, `sw generate` and `sw study`: measure what the super weights do."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .app import Session, stdout
from .options import (BATCH_SIZE, CONTROL_SEED, CONTROL, COORD, COORDS, DATA_DIR, DEBUG, FACTOR, FORCE_OUT_DIR, JSON, MAX_LENGTH,
                      MODE, MODEL_ARG, QUIET, SEED, SELECT, TOP, first_documents, loads_model, print_table)


@loads_model()
def eval_(
    model: Optional[str] = MODEL_ARG,
    task: Optional[list[str]] = typer.Option(None, "--task", "-t", metavar="TASK",
                                             help="Task; repeatable or comma-separated, or 'all': wikitext, "
                                             "lambada_openai, piqa, arc_easy, arc_challenge, hellaswag, sciq, "
                                             "winogrande (default: wikitext, unless --harness is given)."),
    harness: Optional[list[str]] = typer.Option(None, "--harness", metavar="TASK",
                                                help="An lm-evaluation-harness task, group or tag, run by lm-eval's "
                                                "own evaluator on this model; repeatable (needs pip install "
                                                "'superweight[harness]')."),
    harness_include: Optional[list[Path]] = typer.Option(None, "--harness-include", metavar="DIR",
                                                         help="A folder of your own lm-eval task YAMLs for "
                                                         "--harness; repeatable."),
    coords: Optional[Path] = COORDS,
    coord: Optional[list[str]] = COORD,
    select: str = SELECT,
    mode: Optional[str] = MODE,
    factor: Optional[str] = FACTOR,
    control: Optional[str] = CONTROL,
    top: Optional[int] = TOP,
    restore_activation: bool = typer.Option(False, "--restore-activation",
                                            help="Zero the super weights but write the super activation back."),
    compare: bool = typer.Option(False, "--compare", help="Original, zeroed, zeroed + restored, and a control "
                                                          "side by side (the paper's Table 1)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", metavar="DIR", envvar="SUPERWEIGHT_DATA",
                                           help="Folder with one subfolder per task (env SUPERWEIGHT_DATA)."),
    limit: Optional[int] = typer.Option(None, "--limit", metavar="N", help="First N documents of each task (smoke runs)."),
    batch_size: str = BATCH_SIZE,
    max_length: Optional[int] = MAX_LENGTH,
    seed: int = SEED,
    output: Optional[str] = typer.Option(None, "--output", metavar="FILE.json", help="Write the results to FILE.json in lm-eval's own layout (--json prints superweight's)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --output file."),
    as_json: bool = JSON,
    quiet: bool = QUIET,
    debug: bool = DEBUG,
    options=None,
) -> None:
    """Perplexity and zero-shot accuracy, as lm-evaluation-harness computes them.

    With --coords/--coord the model is ablated in memory (nothing is saved).

    Examples:

      sw eval --task wikitext --task piqa --limit 100

      sw eval --coords smollm2-135m.superweights.yaml --compare --task all --limit 200

      sw eval llama-7b --coord 2,3968,7003 --restore-activation --task wikitext --json

      sw eval --coords c.yaml --compare --harness mmlu --harness gsm8k --limit 100
    """
    session = Session(quiet, debug)

    def work() -> None:
        from ..commands.evaluate import evaluate_model

        result = evaluate_model(
            model, task=task, harness=harness, harness_include=harness_include, coords=coords, coord=coord, select=select,
            mode=mode, factor=factor, control=control, top=top, restore_activation=restore_activation,
            compare=compare, data_dir=data_dir, limit=limit, batch_size=batch_size, max_length=max_length,
            seed=seed, output=output, options=options, force=force, reporter=session)
        if result is None:  # another rank than 0: rank 0 prints
            return
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2))
            return
        table = result.table()
        print_table(f"{result.spec}" + first_documents(result.limit)
                     + (f"; (lm-eval) columns computed by {result.harness_computed_by}"
                        if result.harness_computed_by else ""),
                     tuple(table.columns), [tuple(r) for r in table.rows])
        print_notes(result.notes())
        if output:
            stdout.print(f"results written to {output} (lm-eval's layout)")

    session.run(work)


@loads_model()
def generate(
    model: Optional[str] = MODEL_ARG,
    coords: Optional[Path] = COORDS,
    coord: Optional[list[str]] = COORD,
    select: str = SELECT,
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", "-p", help="Prompt to continue; repeatable "
                                               "(default: the paper's \"My favourite condiment is\")."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="Tokens to generate per prompt (default 16)."),
    control: Optional[str] = typer.Option(None, "--control", metavar="random|outliers",
                                          help="The control row: random (default: same count, "
                                               "same matrices) or outliers (--top N)."),
    top: Optional[int] = TOP,
    seed: int = CONTROL_SEED,
    as_json: bool = JSON,
    quiet: bool = QUIET,
    debug: bool = DEBUG,
    options=None,
) -> None:
    """Greedy continuations side by side: original, super weights zeroed, zeroed with the super
    activation restored, and a control.

    Without --coords/--coord the super weights are detected first. Nothing is written.

    Examples:

      sw generate

      sw generate --coords smollm2-135m.superweights.yaml --prompt "The capital of France is" --max-new-tokens 24

      sw generate llama-7b --coord 2,3968,7003 --json
    """
    session = Session(quiet, debug)

    def work() -> None:
        from ..commands.generate import generate_text

        result = generate_text(model, coords=coords, coord=coord, select=select, prompt=prompt, max_new_tokens=max_new_tokens,
                               control=control, top=top, seed=seed, options=options, reporter=session)
        if result is None:  # another rank than 0: rank 0 prints
            return
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2))
            return
        source, generations = result.model, result.generations
        for text in result.prompts:
            print_table(f"{source['spec']}: {text!r} + {max_new_tokens} greedy tokens", ("configuration", "continuation"),
                         [(g.configuration, g.text.replace("\n", "\\n")) for g in generations if g.prompt == text],
                         text_columns=("continuation",))

    session.run(work)


@loads_model()
def study(
    model: Optional[str] = MODEL_ARG,
    coords: Optional[Path] = COORDS,
    coord: Optional[list[str]] = COORD,
    select: str = SELECT,
    task: list[str] = typer.Option(["all"], "--task", "-t", metavar="TASK", help="Tasks; repeatable or comma-separated (default all: wikitext and "
                                                                 "the 7 zero-shot tasks)."),
    limit: Optional[str] = typer.Option(None, "--limit", metavar="N|all", help="First N documents of each task, or all "
                                         "(default: all on a GPU; on a CPU 40 per zero-shot task and 2 of wikitext)."),
    top: Optional[int] = typer.Option(None, "--top", metavar="N", help="How many other large down-projection weights to zero "
                                                          "(default: the paper's ~7000 of Llama-7B, scaled)."),
    grid: Optional[str] = typer.Option(None, "--grid", metavar="S,S,...", help="Scaling factors for the sweep, e.g. 0,0.5,1,2 "
                                                            "(default 0 to 3 in steps of 0.5)."),
    stop_words: Optional[Path] = typer.Option(None, "--stop-words", metavar="FILE", help="Stop-word list, one per line "
                                                                         "(default configs/stop_words.txt)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="DIR", help="Report directory (default ./<model>-study)."),
    force: bool = FORCE_OUT_DIR,
    data_dir: Optional[str] = DATA_DIR,
    batch_size: str = BATCH_SIZE,
    max_length: Optional[int] = MAX_LENGTH,
    seed: int = SEED,
    as_json: bool = JSON,
    quiet: bool = QUIET,
    debug: bool = DEBUG,
    options=None,
) -> None:
    """The paper's analysis of MODEL in one command: REPORT.md, report.json and plots in --out.

    Table 1 (original, super weights zeroed, other outliers zeroed, zeroed + super activation
    restored, random control), the scale sweep, the stop-word shift and the activation profile.
    Evaluation results are cached: a rerun with the same inputs evaluates nothing again.

    On a CPU without --limit it reads 40 documents of each zero-shot task and 2 of wikitext (12
    minutes measured for the default model on 2 cores); --limit all reads every document.

    Examples:

      sw study

      sw study --limit 200

      sw study llama-7b --coords llama7b.yaml --task wikitext --task piqa --grid 0,1,2,3
    """
    session = Session(quiet, debug)

    def work() -> None:
        from ..commands.study import DEFAULT_OUT, run_study

        # The command line as typed, for the report (not when global options come first).
        command = "sw study " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["study"] else None
        result = run_study(
            model, coords=coords, coord=coord, select=select, task=task, limit=limit, top=top, grid=grid, stop_words=stop_words,
            out=out or DEFAULT_OUT, force=force, data_dir=data_dir, batch_size=batch_size, max_length=max_length, seed=seed,
            options=options, command=command, reporter=session)
        if result is None:  # another rank than 0: rank 0 prints
            return
        table, meta = result.table, result.meta
        cached = meta["evaluations"]["from_cache"]
        if as_json:
            typer.echo(result.json_path.read_text(encoding="utf-8").rstrip())
            return
        documents = meta["documents_note"]
        print_table(f"{meta['model']['spec']}" + (f", {documents}" if documents else ""),
                     tuple(table.columns), [tuple(r) for r in table.rows])
        print_notes(result.notes())
        stdout.print(f"report written to {result.report} ({cached} of "
                     f"{meta['evaluations']['total']} task evaluations from the cache)", soft_wrap=True)

    session.run(work)


def print_notes(notes: list[str]) -> None:
    """A table's notes: the lead line after "note: ", its items indented below it."""
    for i, note in enumerate(notes):
        stdout.print(("note: " if i == 0 else "  ") + note, soft_wrap=True)
