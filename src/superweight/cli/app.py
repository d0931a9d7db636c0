"""`sw`: the command line. Parses options, calls one library function, prints.

Progress and messages go to stderr, results to stdout (`--json` for scripts). Errors print one
line and exit non-zero; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from .. import __version__
from ..commands.reporter import Reporter
from ..errors import SuperweightError

app = typer.Typer(
    help="Find, ablate and evaluate the super weights of large language models (Yu et al. 2024).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class _Stdout:
    """Results: wrapped to a terminal's width, never wrapped when piped, so that lines and table
    rows stay whole for grep and scripts (rich would wrap them at 80 columns)."""

    def print(self, *objects, **options) -> None:
        piped = not sys.stdout.isatty()
        console = Console(highlight=False, soft_wrap=piped, width=1_000_000 if piped else None)
        console.print(*objects, **options)


stdout = _Stdout()
stderr = Console(stderr=True, highlight=False)


class Session(Reporter):
    """Per-command output settings: how chatty, and whether errors show tracebacks. It is the
    reporter the library's command functions report their progress to."""

    def __init__(self, quiet: bool, debug: bool):
        self.quiet = quiet or GLOBAL_OPTIONS["quiet"]
        self.debug = debug or GLOBAL_OPTIONS["debug"]

    def say(self, message: str) -> None:
        """A message, on one line however long (a path or a list cut in two defeats grep)."""
        if not self.quiet:
            stderr.print(message, markup=False, soft_wrap=True)

    def note(self, message: str) -> None:
        """A note from the library, on one line however long."""
        if not self.quiet:
            stderr.print(f"note: {message}", markup=False, soft_wrap=True)

    @contextmanager
    def status(self, message: str) -> Iterator[Callable[[str], None]]:
        """A spinner on stderr; yields a function that updates its text."""
        if self.quiet:
            yield lambda text: None
            return
        with stderr.status(message) as spinner:
            yield lambda text: spinner.update(text)

    def bars(self) -> Iterator[Callable[[str, int, int], None]]:
        return _progress_bars(self)

    def run(self, work: Callable[[], None]) -> None:
        from ..distributed import launched, session

        _quiet_libraries()
        # Under a launcher only rank 0 prints: it reports the other ranks' errors and progress too.
        try:
            main = launched().is_main
        except SuperweightError:
            main = True  # session() raises it again, and it is printed below
        self.quiet = self.quiet or not main
        try:
            with session(), _muted(not main):
                work()
        except SuperweightError as e:
            if self.debug:
                raise
            if main:
                stderr.print(f"error: {e}", markup=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt as e:
            if main:
                stderr.print("error: interrupted; nothing was written")
            raise typer.Exit(143 if isinstance(e, Terminated) else 130) from None
        except typer.Exit:
            raise
        except Exception as e:  # last resort: still one line, unless --debug
            if self.debug:
                raise
            first_line = (str(e).splitlines() or [""])[0]
            if main:
                stderr.print(f"error: {type(e).__name__}: {first_line} (rerun with --debug for the traceback)",
                             markup=False, soft_wrap=True)
            raise typer.Exit(1) from None


@contextmanager
def _muted(mute: bool) -> Iterator[None]:
    """Results go to stdout on rank 0 only (the other ranks compute the same ones)."""
    if not mute:
        yield
        return
    import os
    from contextlib import redirect_stdout

    with open(os.devnull, "w") as devnull, redirect_stdout(devnull):
        yield


def _quiet_libraries() -> None:
    """transformers' and huggingface_hub's own bars, warnings and retry lines would interleave with
    ours on stderr (the library reports its progress to us instead)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    # The library logs its notes (an inferred adapter) for notebook users; commands print them.
    library_logger = logging.getLogger("superweight")
    if not library_logger.handlers:
        library_logger.addHandler(logging.NullHandler())
    try:
        from huggingface_hub.utils import disable_progress_bars, logging as hub_logging
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        hub_logging.set_verbosity_error()
        disable_progress_bars()
    except ImportError:
        pass


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"sw (superweight) {__version__}")
        raise typer.Exit()


# `sw --quiet detect` as well as `sw detect --quiet`: set by the callback on every invocation.
GLOBAL_OPTIONS = {"quiet": False, "debug": False}


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Show the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or messages on stderr (any command)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on error (any command)."),
) -> None:
    """Find, ablate and evaluate the super weights of large language models (Yu et al. 2024)."""
    GLOBAL_OPTIONS.update(quiet=quiet, debug=debug)


# Options shared by every command that loads a model.
MODEL_ARG = typer.Argument(None, metavar="MODEL", help="Alias (see configs/models.yaml), hub id, local directory or .gguf file. "
                                      "Default: smollm2-135m (offline).")
REVISION = typer.Option(None, "--revision", metavar="REV", help="Hub revision (branch, tag or commit).")
GGUF_FILE = typer.Option(None, "--gguf-file", metavar="FILE", help="GGUF file name inside the MODEL directory.")
DTYPE = typer.Option("auto", "--dtype", metavar="DTYPE", help="auto|float32|float16|bfloat16 (auto: the checkpoint's; GGUF: float32).")
DEVICE = typer.Option("auto", "--device", metavar="DEVICE", help="auto|cpu|cuda|cuda:N|mps.")
DEVICE_MAP = typer.Option(None, "--device-map", metavar="MAP", help="accelerate device map: auto|balanced|balanced_low_0|"
                                                       "sequential, or a JSON object/file (module -> device).")
MAX_MEMORY = typer.Option(None, "--max-memory", metavar="BUDGET", help="Per-device budget for --device-map, e.g. 0=20GiB,cpu=64GiB.")
TRUST = typer.Option(False, "--trust-remote-code", help="Run model code from the hub (off by default).")
CACHE_DIR = typer.Option(None, "--cache-dir", metavar="DIR", help="Hugging Face cache directory.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress or messages on stderr.")
DEBUG = typer.Option(False, "--debug", help="Show tracebacks on error.")
JSON = typer.Option(False, "--json", help="Print the result as JSON on stdout (for scripts).")

# The loading options, declared once: `loads_model` adds them to a command's signature (Typer
# reads that) and hands the command one `LoadOptions` built from them.
LOADING = {"revision": (Optional[str], REVISION), "gguf_file": (Optional[str], GGUF_FILE), "dtype": (str, DTYPE),
           "device": (str, DEVICE), "device_map": (Optional[str], DEVICE_MAP),
           "max_memory": (Optional[str], MAX_MEMORY), "trust_remote_code": (bool, TRUST),
           "cache_dir": (Optional[str], CACHE_DIR)}


def loads_model(*names: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A command that loads a model: the loading options `names` (default: all eight) appear before
    --quiet, and the command gets them as `options`."""
    names = names or tuple(LOADING)

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        parameters = [p for p in inspect.signature(command).parameters.values() if p.name != "options"]
        at = next(i for i, p in enumerate(parameters) if p.name == "quiet")
        added = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=LOADING[name][1],
                                   annotation=LOADING[name][0]) for name in names]

        @functools.wraps(command)
        def with_options(**values) -> None:
            from ..model.options import LoadOptions  # here, not at the top: `sw --help` imports no torch

            command(options=LoadOptions(**{name: values.pop(name) for name in names}), **values)

        with_options.__signature__ = inspect.Signature(parameters[:at] + added + parameters[at:])
        with_options.__annotations__ = {**{k: v for k, v in command.__annotations__.items() if k != "options"},
                                        **{name: LOADING[name][0] for name in names}}
        return with_options

    return decorate


def _print_table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]],
                 text_columns: tuple[str, ...] = ()) -> None:
    """Numbers right-aligned; `text_columns` (free text) left-aligned and folded, never cut."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        if column in text_columns:
            table.add_column(column, justify="left", overflow="fold")
        else:
            table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    stdout.print(table)


@app.command()
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
                                                                           "makes, in (0, 1] (default 0.5)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="FILE", help="Coordinates file (.yaml or .json). "
                                                                 "Default: ./<model>.superweights.yaml"),
    plot: Optional[Path] = typer.Option(None, "--plot", metavar="FILE.png", help="Write the per-layer activation plot (PNG)."),
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
        from ..commands.detect import detect_model
        from ..report.detection import super_weight_table

        result = detect_model(model, prompt=prompt, iterations=iterations, min_spike=min_spike,
                              min_concentration=min_concentration, min_share=min_share, out=out, plot=plot,
                              stream=stream, verify=verify, verify_text=verify_text, attribution=attribution,
                              chat_template=chat_template, options=options, reporter=session)
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
        _print_table(title, *super_weight_table(detection.super_weights, labels or None))
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
    _print_table(f"Measured effect: perplexity on {verification.text_source} ({verification.num_tokens} "
                 f"tokens, {verification.seconds:.1f} s)", ("configuration", "perplexity", "x original"),
                 verification.rows())
    attribution = verification.attribution_rows()
    if attribution:
        _print_table(f"Attribution within the set ({verification.attribution}; README: Vocabulary)",
                     ("weight", "x alone", "x zeroed last", "share of set", "role"), attribution)
    for check in verification.prompts:
        stdout.print(f"prompt {check.prompt!r}: {check.difference(found)}", markup=False)


COORDS = typer.Option(None, "--coords", metavar="FILE", help="Coordinates file from `sw detect` (YAML or JSON).")
COORD = typer.Option(None, "--coord", metavar="L,R,C", help="A coordinate LAYER,ROW,COL[,EXPERT]; repeatable.")
SELECT = typer.Option("super", "--select", metavar="super|set|all",
                      help="Which candidates of --coords (or of the detection) to act on, by their measured role: "
                           "super (the paper's: breaks the model alone), set (super + joint), all. --coord weights "
                           "are taken as given.")
MODE = typer.Option(None, "--mode", metavar="zero|scale", help="zero (default) or scale.")
FACTOR = typer.Option(None, "--factor", metavar="S", help="Multiply by S instead of zeroing (implies --mode scale; 0 zeroes, "
                                             "> 1 amplifies).")
CONTROL = typer.Option(None, "--control", metavar="random|outliers", help="Ablate a control instead: random (same count, same matrices) "
                                                "or outliers (the --top N largest other weights).")
TOP = typer.Option(None, "--top", metavar="N", help="With --control outliers: how many weights.")
SEED = typer.Option(0, "--seed", metavar="N", help="Seed for the random control and bootstrap errors.")


def _first_documents(limit: Optional[int]) -> str:
    """The table title's note on --limit."""
    if not limit:
        return ""
    return ", first document of each task" if limit == 1 else f", first {limit} documents per task"


@app.command()
@loads_model()
def ablate(
    model: Optional[str] = MODEL_ARG,
    coords: Optional[Path] = COORDS,
    coord: Optional[list[str]] = COORD,
    select: str = SELECT,
    mode: Optional[str] = MODE,
    factor: Optional[str] = FACTOR,
    control: Optional[str] = CONTROL,
    top: Optional[int] = TOP,
    seed: int = typer.Option(0, "--seed", metavar="N", help="Seed for --control random."),
    out: Path = typer.Option(..., "--out", "-o", metavar="DIR", help="Directory for the ablated model (safetensors)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out directory."),
    as_json: bool = JSON,
    quiet: bool = QUIET,
    debug: bool = DEBUG,
    options=None,
) -> None:
    """Zero or rescale super weights (or a control) and save the model.

    Writes safetensors, the tokenizer and superweight_ablation.json (what changed, original
    values) to --out, atomically; never into the source model's directory.

    Examples:

      sw ablate --coords smollm2-135m.superweights.yaml --out smollm2-no-sw

      sw ablate llama-7b --coord 2,3968,7003 --mode scale --factor 2 --out llama-7b-sw-x2

      sw ablate --coords c.yaml --control outliers --top 7000 --out smollm2-no-outliers
    """
    session = Session(quiet, debug)

    def work() -> None:
        from ..commands.ablate import ablate_model

        result = ablate_model(model, out=out, coords=coords, coord=coord, select=select, mode=mode, factor=factor, control=control,
                              top=top, seed=seed, force=force, options=options, reporter=session)
        if result is None:  # another rank than 0: rank 0 prints
            return
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2))
        else:
            what = f"{result.changed} {control + ' control ' if control else 'super '}weight(s)"
            done = "zeroed" if result.mode == "zero" else f"scaled x{result.factor:g}"
            stdout.print(f"{what} {done}; model written to {out}")

    session.run(work)


@app.command(name="eval")
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
    batch_size: str = typer.Option("auto", "--batch-size", metavar="N|auto", help="Sequences per forward pass, or auto."),
    max_length: Optional[int] = typer.Option(None, "--max-length", metavar="N", help="Context length (default: the model's)."),
    seed: int = SEED,
    output: Optional[Path] = typer.Option(None, "--output", metavar="FILE.json", help="Write the results (lm-eval layout) to FILE.json."),
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
            seed=seed, output=output, options=options, reporter=session)
        if result is None:  # another rank than 0: rank 0 prints
            return
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2))
            return
        table = result.table()
        _print_table(f"{result.spec}" + _first_documents(limit)
                     + (f"; (lm-eval) columns computed by {result.harness_computed_by}"
                        if result.harness_computed_by else ""),
                     tuple(table.columns), [tuple(r) for r in table.rows])
        if output:
            stdout.print(f"results written to {output}")

    session.run(work)


@app.command()
@loads_model()
def generate(
    model: Optional[str] = MODEL_ARG,
    coords: Optional[Path] = COORDS,
    coord: Optional[list[str]] = COORD,
    select: str = SELECT,
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", "-p", help="Prompt to continue; repeatable "
                                               "(default: the paper's \"My favourite condiment is\")."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="Tokens to generate per prompt (default 16)."),
    control: Optional[str] = typer.Option(None, "--control", help="The control row: random (default: same count, "
                                                                  "same matrices) or outliers (--top N)."),
    top: Optional[int] = TOP,
    seed: int = SEED,
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
            _print_table(f"{source['spec']}: {text!r} + {max_new_tokens} greedy tokens", ("configuration", "continuation"),
                         [(g.configuration, g.text.replace("\n", "\\n")) for g in generations if g.prompt == text],
                         text_columns=("continuation",))

    session.run(work)


@app.command()
@loads_model("revision", "gguf_file", "trust_remote_code", "cache_dir")
def export(
    coords_file: Path = typer.Argument(..., metavar="COORDS", help="Coordinates file from `sw detect` (YAML or JSON)."),
    select: str = SELECT,
    to: str = typer.Option(..., "--to", help="llama.cpp (llama-quantize --tensor-type-file), bitsandbytes "
                                             "(llm_int8_skip_modules / modules_to_not_convert) or llm-compressor "
                                             "(a recipe's ignore list)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model to check the names against (default: "
                                                                    "the file's `model:`, else smollm2-135m)."),
    gguf: Optional[Path] = typer.Option(None, "--gguf", help="llama.cpp: the GGUF you will quantize, to check the "
                                                             "tensor names in (default: MODEL itself when a GGUF)."),
    ggml_type: str = typer.Option("f16", "--type", help="llama.cpp: the type those tensors keep (default f16)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write to FILE (default: stdout)."),
    as_json: bool = JSON,
    quiet: bool = QUIET,
    debug: bool = DEBUG,
    options=None,
) -> None:
    """What a real quantizer needs to keep the super weights' matrices in high precision.

    The names are this model's own, checked against it (built from its config, no weights loaded)
    and, for llama.cpp, against the GGUF's tensor list.

    Examples:

      sw export smollm2-135m.superweights.yaml --to llama.cpp --out smollm2.tensor-types.txt

      sw export c.yaml --to bitsandbytes --model meta-llama/Llama-2-7b-hf --out skip.json

      sw export c.yaml --to llm-compressor --out recipe.yaml
    """
    session = Session(quiet, debug)

    def work() -> None:
        from ..commands.export import export_names

        exported = export_names(coords_file, to=to, model=model, gguf=gguf, ggml_type=ggml_type, out=out, select=select,
                                options=options, reporter=session)
        if exported is None:  # another rank than 0 under a launcher
            return
        result = exported.export
        if as_json:
            typer.echo(json.dumps(exported.to_dict(), indent=2))
        elif out is None:
            typer.echo(result.content, nl=False)
        session.say(f"{len(result.modules)} matrix(es) kept: {', '.join(result.gguf_tensors or result.modules)}; "
                    f"checked against {'; '.join(result.checked)}")
        if out is not None and not as_json:
            stdout.print(f"{to} names written to {out}; use with: {result.usage}", soft_wrap=True, markup=False)

    session.run(work)


@app.command()
@loads_model()
def quantize(
    model: Optional[str] = MODEL_ARG,
    coords: Optional[Path] = COORDS,
    coord: Optional[list[str]] = COORD,
    select: str = SELECT,
    bits: int = typer.Option(4, "--bits", metavar="N", help="Weight bits, 2..8 (default 4)."),
    block_size: Optional[list[str]] = typer.Option(None, "--block-size", metavar="N", help="Elements per 1-D block; repeatable "
                                                   "(default: a grid that suits the model's matrix sizes)."),
    z: str = typer.Option("9", "--z", metavar="Z|auto", help="Clip weights with |z-score| above this before "
                                                             "quantizing (paper: 9); auto: per matrix, the threshold "
                                                             "with the least largest rounding error."),
    activations: bool = typer.Option(False, "--activations", help="Also compare per-tensor activation RTN of the "
                                                                   "down-projection input, naive vs super-activation-aware."),
    activation_bits: int = typer.Option(8, "--activation-bits", metavar="N", help="Bits for --activations (default 8)."),
    task: list[str] = typer.Option(["wikitext"], "--task", "-t", metavar="TASK", help="Tasks to evaluate, repeatable or comma-separated (default wikitext)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", metavar="DIR", envvar="SUPERWEIGHT_DATA", help="Evaluation data."),
    limit: Optional[int] = typer.Option(None, "--limit", metavar="N", help="First N documents of each task."),
    max_length: Optional[int] = typer.Option(None, "--max-length", metavar="N", help="Context length (default: the model's)."),
    plot: Optional[Path] = typer.Option(None, "--plot", metavar="FILE.png", help="Each task's headline metrics vs block size (PNG)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="DIR", help="Save the super-weight-aware fake-quantized model "
                                                                 "(needs exactly one --block-size)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out directory."),
    as_json: bool = JSON,
    quiet: bool = QUIET,
    debug: bool = DEBUG,
    options=None,
) -> None:
    """Round-to-nearest quantization with and without super-weight handling (paper Sec. 4).

    Without --coords/--coord the super weights are detected first.

    Examples:

      sw quantize --limit 5 --block-size 1024 --block-size 65536 --plot rtn.png

      sw quantize llama-7b --coords llama7b.yaml --block-size 16384 --block-size 1048576

      sw quantize --block-size 4096 --out smollm2-w4-bs4096
    """
    session = Session(quiet, debug)

    def work() -> None:
        from ..commands.quantize import quantize_model
        from ..measure.quantized import quantization_warnings
        from ..edit.quantize import AUTO_Z

        result = quantize_model(
            model, coords=coords, coord=coord, select=select, bits=bits, block_size=block_size, z=z, activations=activations,
            activation_bits=activation_bits, task=task, data_dir=data_dir, limit=limit, max_length=max_length,
            plot=plot, out=out, force=force, options=options, reporter=session)
        if result is None:  # another rank than 0: rank 0 prints
            return
        for line in quantization_warnings(result.rows):
            session.say(f"warning: {line}")
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2))
            return
        table = result.weight_table()
        z_label = result.z if result.z == AUTO_Z else f"{result.z:g}"
        _print_table(f"{result.spec}: INT{bits} RTN, naive vs super-weight aware (z={z_label})" + _first_documents(limit),
                     tuple(table.columns), [tuple(r) for r in table.rows])
        if result.activation_rows:
            table = result.activation_table()
            _print_table("down-projection input, per-tensor RTN (aware: super activation held out)",
                         tuple(table.columns), [tuple(r) for r in table.rows])

    session.run(work)


@app.command()
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
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out directory."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", metavar="DIR", envvar="SUPERWEIGHT_DATA", help="Evaluation data."),
    batch_size: str = typer.Option("auto", "--batch-size", metavar="N|auto", help="Sequences per forward pass, or auto."),
    max_length: Optional[int] = typer.Option(None, "--max-length", metavar="N", help="Context length (default: the model's)."),
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

    On a CPU without --limit it reads 40 documents of each zero-shot task and 2 of wikitext (about
    12-13 minutes for the default model on 2 cores); --limit all reads every document.

    Examples:

      sw study

      sw study --limit 200

      sw study llama-7b --coords llama7b.yaml --task wikitext --task piqa --grid 0,1,2,3
    """
    session = Session(quiet, debug)

    def work() -> None:
        from ..commands.study import run_study

        # The command line as typed, for the report (not when global options come first).
        command = "sw study " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["study"] else None
        result = run_study(
            model, coords=coords, coord=coord, select=select, task=task, limit=limit, top=top, grid=grid, stop_words=stop_words,
            out=out, force=force, data_dir=data_dir, batch_size=batch_size, max_length=max_length, seed=seed,
            options=options, command=command, reporter=session)
        if result is None:  # another rank than 0: rank 0 prints
            return
        table, meta = result.table, result.meta
        cached = meta["evaluations"]["from_cache"]
        if as_json:
            typer.echo(result.json_path.read_text(encoding="utf-8").rstrip())
            return
        documents = meta["documents_note"]
        _print_table(f"{meta['model']['spec']}" + (f", {documents}" if documents else ""),
                     tuple(table.columns), [tuple(r) for r in table.rows])
        stdout.print(f"report written to {result.report} ({cached} of "
                     f"{meta['evaluations']['total']} task evaluations from the cache)", soft_wrap=True)

    session.run(work)


@contextmanager
def _progress_bars(session: Session) -> Iterator[Callable[[str, int, int], None]]:
    """Rich progress bars on stderr, one per stage; yields `bar(stage, done, total)`, the
    callback the library reports its progress through."""
    if session.quiet:
        yield lambda stage, done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bars: dict[str, int] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=stderr, transient=False) as progress:
        def bar(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                bars[stage] = progress.add_task(stage, total=total)
            progress.update(bars[stage], completed=done, total=total)

        yield bar


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler, `timeout`) unwinds like Ctrl-C, so atomic writes clean up."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main() -> None:
    # Bars that libraries draw with plain tqdm (transformers' GGUF conversion) obey only this,
    # read when tqdm is first imported: before any library is.
    os.environ.setdefault("TQDM_DISABLE", "1")
    signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="sw")


if __name__ == "__main__":
    main()


@app.command(name="known")
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
        _print_table("Published super-weight coordinates (layer, row, col of down_proj), by source", *registry_rows(name),
                     text_columns=("model", "hub ids", "source", "super weights", "conflicts"))

    session.run(work)
