"""`sw`: the command line. Parses options, calls one library function, prints.

Progress and messages go to stderr, results to stdout (`--json` for scripts). Errors print one
line and exit non-zero; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import json
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import SuperweightError

app = typer.Typer(
    help="Find, ablate and evaluate the super weights of large language models (Yu et al. 2024).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)


class Session:
    """Per-command output settings: how chatty, and whether errors show tracebacks."""

    def __init__(self, quiet: bool, debug: bool):
        self.quiet = quiet
        self.debug = debug

    def say(self, message: str) -> None:
        if not self.quiet:
            stderr.print(message)

    @contextmanager
    def status(self, message: str) -> Iterator[Callable[[str], None]]:
        """A spinner on stderr; yields a function that updates its text."""
        if self.quiet:
            yield lambda text: None
            return
        with stderr.status(message) as spinner:
            yield lambda text: spinner.update(text)

    def run(self, work: Callable[[], None]) -> None:
        _quiet_libraries()
        try:
            work()
        except SuperweightError as e:
            if self.debug:
                raise
            stderr.print(f"error: {e}", markup=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            stderr.print("error: interrupted; nothing was written")
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except Exception as e:  # last resort: still one line, unless --debug
            if self.debug:
                raise
            first_line = (str(e).splitlines() or [""])[0]
            stderr.print(f"error: {type(e).__name__}: {first_line} (rerun with --debug for the traceback)",
                         markup=False, soft_wrap=True)
            raise typer.Exit(1) from None


def _quiet_libraries() -> None:
    """transformers' own bars and warnings would interleave with ours on stderr."""
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"sw (superweight) {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Show the version and exit."),
) -> None:
    """Find, ablate and evaluate the super weights of large language models (Yu et al. 2024)."""


# Options shared by every command that loads a model.
MODEL_ARG = typer.Argument(None, help="Alias (see configs/models.yaml), hub id, local directory or .gguf file. "
                                      "Default: smollm2-135m (offline).")
REVISION = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit).")
GGUF_FILE = typer.Option(None, "--gguf-file", help="GGUF file name inside the MODEL directory.")
DTYPE = typer.Option("auto", "--dtype", help="auto|float32|float16|bfloat16 (auto: the checkpoint's; GGUF: float32).")
DEVICE = typer.Option("auto", "--device", help="auto|cpu|cuda|cuda:N|mps.")
DEVICE_MAP = typer.Option(None, "--device-map", help="accelerate device map: auto|balanced|sequential.")
TRUST = typer.Option(False, "--trust-remote-code", help="Run model code from the hub (off by default).")
CACHE_DIR = typer.Option(None, "--cache-dir", help="Hugging Face cache directory.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress or messages on stderr.")
DEBUG = typer.Option(False, "--debug", help="Show tracebacks on error.")
JSON = typer.Option(False, "--json", help="Print the result as JSON on stdout (for scripts).")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text).name if text.endswith(".gguf") else text).strip("-")


def _print_table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    stdout.print(table)


@app.command()
def detect(
    model: Optional[str] = MODEL_ARG,
    prompt: str = typer.Option(None, "--prompt", help="Prompt for the forward pass (default: the paper's)."),
    iterations: int = typer.Option(None, "--iterations", "-n", help="At most N passes; each zeroes what was found "
                                                                     "and looks again (default 5)."),
    min_spike: float = typer.Option(None, "--min-spike", help="Absolute floor for a super activation (default 100)."),
    median_ratio: float = typer.Option(None, "--median-ratio",
                                       help="A layer must exceed this multiple of the median layer (default 50)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Coordinates file (.yaml or .json). "
                                                                 "Default: ./<model>.superweights.yaml"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the per-layer activation plot (PNG)."),
    as_json: bool = JSON,
    revision: Optional[str] = REVISION,
    gguf_file: Optional[str] = GGUF_FILE,
    dtype: str = DTYPE,
    device: str = DEVICE,
    device_map: Optional[str] = DEVICE_MAP,
    trust_remote_code: bool = TRUST,
    cache_dir: Optional[str] = CACHE_DIR,
    quiet: bool = QUIET,
    debug: bool = DEBUG,
) -> None:
    """Find the super weights of MODEL in one forward pass per iteration (data-free).

    Examples:

      sw detect                                   # the offline default model, SmolLM2-135M

      sw detect mistral-7b --dtype float16 --plot act.png

      sw detect ./my-model --out coords.json --json
    """
    session = Session(quiet, debug)

    def work() -> None:
        from .detect import DEFAULT_ITERATIONS, DEFAULT_PROMPT, SpikeRule, detect as run_detect, encode_prompt
        from .coords import write_coords
        from .files import check_writable, refuse_inside
        from .model import load_model, resolve
        from .report import check_known, detection_document, plot_activations, super_weight_table
        from .errors import UsageError

        text = DEFAULT_PROMPT if prompt is None else prompt
        n = DEFAULT_ITERATIONS if iterations is None else iterations
        if n < 1:
            raise UsageError(f"--iterations must be at least 1, got {n}")
        if not text.strip():
            raise UsageError("--prompt is empty; give a non-empty prompt (default: the paper's sentence)")
        defaults = SpikeRule()
        rule = SpikeRule(min_spike=defaults.min_spike if min_spike is None else min_spike,
                         median_ratio=defaults.median_ratio if median_ratio is None else median_ratio)
        source = resolve(model, revision=revision, gguf_file=gguf_file)
        coords_path = out or Path(f"{_slug(source.alias or source.spec)}.superweights.yaml")
        for path in filter(None, (coords_path, plot)):
            refuse_inside(path, source.protected_dirs)
            check_writable(path)
        with session.status(f"loading {source.spec}") as update:
            loaded = load_model(model, revision=revision, gguf_file=gguf_file, dtype=dtype, device=device,
                                device_map=device_map, trust_remote_code=trust_remote_code, cache_dir=cache_dir,
                                progress=update)
            update(f"detecting: {n} iteration(s) at most")
            input_ids = encode_prompt(loaded.tokenizer, text)
            detection = run_detect(loaded.model, input_ids, iterations=n, rule=rule, prompt=text)
        session.say(f"loaded {source.spec} ({loaded.dtype}) in {loaded.load_seconds:.1f} s"
                    + (" from the GGUF cache" if loaded.from_cache else ""))
        model_info = {"spec": source.spec, "location": source.location, "kind": source.kind,
                      "model_type": loaded.model.config.model_type, "dtype": loaded.dtype}
        known = check_known(detection.super_weights, source.known_key, source.location)
        from .arch import adapter_for
        adapter = adapter_for(loaded.model)
        write_coords(coords_path, detection.super_weights, model=source.spec,
                     model_type=loaded.model.config.model_type,
                     tensor=f"{adapter.layers}.{{layer}}.{adapter.down_proj}.{adapter.weight_name}",
                     layout="[expert, row, col]" if adapter.experts else
                     ("[col, row] (Conv1D)" if adapter.transposed else "[row, col]"),
                     prompt=text, tool=f"superweight {__version__}")
        if plot:
            plot_activations(detection, plot, title=f"{source.spec}: down-projection activations")
        if as_json:
            document = detection_document(detection, model_info, known)
            document["coordinates_file"] = str(coords_path)
            typer.echo(json.dumps(document, indent=2))
            return
        title = f"Super weights of {source.spec} ({len(detection.super_weights)} found)"
        _print_table(title, *super_weight_table(detection.super_weights))
        if not detection.super_weights:
            stdout.print("no layer stands out: no super weight under the current rule "
                         "(see --min-spike / --median-ratio)")
        if known:
            stdout.print(known.summary())
        stdout.print(f"coordinates written to {coords_path}" + (f"; plot written to {plot}" if plot else ""))

    session.run(work)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
