"""`sw detect` and `sw known`: find the super weights of a model, or list the published ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .app import Session, stdout
from .options import DEBUG, JSON, MODEL_ARG, QUIET, loads_model, print_table


SHARE_ABOVE_ONE = ("share > 1: the weight writes more than the whole raw output of its row; the row's other "
                   "weights work against it (README: How detection decides)")


@loads_model()
def detect(
    model: Optional[str] = MODEL_ARG,
    prompt: str = typer.Option(None, "--prompt", metavar="TEXT", help="Prompt for the forward pass (default: the paper's)."),
    iterations: int = typer.Option(None, "--iterations", "-n", metavar="N", help="At most N passes; each zeroes what was found "
                                                                     "and looks again (default 5)."),
    min_spike: float = typer.Option(None, "--min-spike", metavar="X", help="Least |residual write| of a super "
                                                                          "activation (default 100)."),
    min_concentration: float = typer.Option(None, "--min-concentration", metavar="F",
                                            help="Least part of the token's raw down_proj output energy in the "
                                                 "spike's channel, in (0, 1] (default 0.25)."),
    min_share: float = typer.Option(None, "--min-share", metavar="F", help="Least part of the raw output one weight "
                                                                           "makes, in (0, 1] (default 0.5): the "
                                                                           "table's share (above 1 when the row's "
                                                                           "other weights work against it)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar="FILE", help="Coordinates file (.yaml or .json). "
                                                                 "Default: ./<model>.superweights.yaml"),
    plot: Optional[str] = typer.Option(None, "--plot", metavar="FILE.png", help="Write the per-layer activation plot "
                                        "(format from the suffix: .png, .pdf, .svg, ...; PNG without one)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file or --plot (a coordinates "
                                                      "file may hold an earlier --verify's roles)."),
    stream: bool = typer.Option(False, "--stream", help="Read a safetensors checkpoint one decoder layer at a "
                                                        "time (memory: embeddings + one layer) instead of loading it."),
    verify: bool = typer.Option(False, "--verify", help="Measure what removing each candidate does (alone, within "
                                                        "the set, restored, random control), re-detect on more "
                                                        "prompts, and give each its role: super / joint / inert."),
    attribution: str = typer.Option("auto", "--attribution", metavar="auto|shapley|leave-one-out",
                                    help="With --verify: how the set's effect is split among the candidates "
                                         "(auto: exact Shapley values up to 5 candidates, else leave-one-out)."),
    chat_template: bool = typer.Option(False, "--chat-template", help="Wrap the prompt (and --verify's prompts) as "
                                                                      "one user turn in the tokenizer's chat template, "
                                                                      "as an instruct model reads text."),
    verify_text: Optional[Path] = typer.Option(None, "--verify-text", metavar="FILE", help="With --verify: a UTF-8 text file to "
                                                                           "measure perplexity on (default: a "
                                                                           "shipped paragraph)."),
    as_json: bool = JSON,
    quiet: bool = QUIET,
    debug: bool = DEBUG,
    options=None,
) -> None:
    """Find the super weights of MODEL in one forward pass per iteration (data-free).

    Examples:

      sw detect                                   # the offline default model, SmolLM2-135M

      sw detect mistral-7b --dtype float16 --plot act.png

      sw detect ./my-model --out coords.json --json

      sw detect mistral-7b --stream --dtype float16   # one decoder layer in memory at a time
    """
    session = Session(quiet, debug)

    def work() -> None:
        from ..commands.detect import DEFAULT_OUT, detect_model
        from ..report.detection import super_weight_table

        result = detect_model(model, prompt=prompt, iterations=iterations, min_spike=min_spike,
                              min_concentration=min_concentration, min_share=min_share,
                              out=out or DEFAULT_OUT, plot=plot,
                              stream=stream, verify=verify, verify_text=verify_text, attribution=attribution,
                              chat_template=chat_template, force=force, options=options, reporter=session)
        if result is None:  # another rank than 0: rank 0 prints
            return
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2))
            return
        detection, verification, known = result.detection, result.verification, result.known
        spec, coords_path = result.model["spec"], result.coords_path
        labels = verification.labels() if verification else {}
        supers = [w for w in detection.super_weights if labels.get(w.key) in ("super", "joint")]
        title = f"Candidates of {spec} ({len(detection.super_weights)} found" + (
            f"; {len(supers)} measured to be super weights)" if labels else "; not verified: add --verify)")
        print_table(title, *super_weight_table(detection.super_weights, labels or None), key_columns=3)
        if any(w.share is not None and w.share > 1 for w in detection.super_weights):
            stdout.print(SHARE_ABOVE_ONE, markup=False)
        if not detection.super_weights:
            stdout.print("no layer writes a super activation under the current rule "
                         "(README: How detection decides; see --min-spike, --min-concentration, --min-share)")
        if known:
            stdout.print(known.summary(), markup=False)
        if verification:
            _print_verification(verification, [w.key for w in detection.super_weights])
        stdout.print(f"coordinates written to {coords_path}" + (f"; plot written to {plot}" if plot else ""))

    session.run(work)


def _print_verification(verification, found: list[tuple]) -> None:
    if verification.broken:
        stdout.print(f"not verified: {verification.broken}", markup=False)
        return
    print_table(f"Measured effect: perplexity on {verification.text_source} ({verification.num_tokens} "
                 f"tokens, {verification.seconds:.1f} s)", ("configuration", "perplexity", "x original"),
                 verification.rows())
    attribution = verification.attribution_rows()
    if attribution:
        print_table(f"Attribution within the set ({verification.attribution}; README: Vocabulary)",
                     ("weight", "x alone", "x zeroed last", "share of set", "role"), attribution)
    for check in verification.prompts:
        stdout.print(f"prompt {check.prompt!r}: {check.difference(found)}", markup=False)


def known_coordinates(
    name: Optional[str] = typer.Argument(None, metavar="[MODEL]", help="One registered model (its alias or hub id); "
                                                                        "default: all of them."),
    as_json: bool = JSON,
    quiet: bool = QUIET,
    debug: bool = DEBUG,
) -> None:
    """Print the registry of published super-weight coordinates: each model's hub ids, each
    source's coordinates (paper Table 2, the authors' code, Super Experts Table 8, measured here)
    and the known conflicts between sources.

    Examples:

      sw known

      sw known olmo-1b --json
    """
    session = Session(quiet, debug)

    def work() -> None:
        from ..report.known import registry_document, registry_rows

        if as_json:
            typer.echo(json.dumps(registry_document(name), indent=2))
            return
        print_table("Published super-weight coordinates (layer, row, col of down_proj), by source", *registry_rows(name),
                     text_columns=("model", "hub ids", "source", "super weights", "conflicts"))

    session.run(work)
