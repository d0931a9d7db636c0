"""The options that several commands share, declared once, and the table printer of their results."""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from .app import stdout


# Options shared by every command that loads a model.
MODEL_ARG = typer.Argument(None, metavar="MODEL", help="Alias (see configs/models.yaml), hub id, local directory or .gguf file. "
                                      "Default: smollm2-135m (offline).")
REVISION = typer.Option(None, "--revision", metavar="REV", help="Hub revision (branch, tag or commit).")
GGUF_FILE = typer.Option(None, "--gguf-file", metavar="FILE", help="GGUF file name inside the MODEL directory or hub repository.")
DTYPE = typer.Option("auto", "--dtype", metavar="DTYPE", help="auto|float32|float16|bfloat16 (auto: the checkpoint's; GGUF: float32).")
DEVICE = typer.Option("auto", "--device", metavar="DEVICE", help="auto|cpu|cuda|cuda:N|mps.")
DEVICE_MAP = typer.Option(None, "--device-map", metavar="MAP", help="accelerate device map: auto|balanced|balanced_low_0|"
                                                       "sequential, or a JSON object/file (module -> device).")
MAX_MEMORY = typer.Option(None, "--max-memory", metavar="BUDGET", help="Per-device budget for --device-map, e.g. 0=20GiB,cpu=64GiB.")
TRUST = typer.Option(False, "--trust-remote-code", help="Run model code from the hub (off by default).")
CACHE_DIR = typer.Option(None, "--cache-dir", metavar="DIR", help="Hugging Face cache directory.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress or notes on stderr; warnings still print.")
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


def typed_options(ctx: typer.Context) -> list[str]:
    """The options the user typed (their long flags), as opposed to those left at their defaults."""
    return [parameter.opts[0] for parameter in ctx.command.params
            if parameter.name in ctx.params and ctx.get_parameter_source(parameter.name).name != "DEFAULT"]


def print_table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]],
                 text_columns: tuple[str, ...] = (), key_columns: int = 1) -> None:
    """Numbers right-aligned and never cut; `text_columns` (free text) left-aligned and folded.
    A table wider than the terminal is drawn compact, else its rows wrap: parts of the columns,
    each part led by the first `key_columns` (what names the row)."""
    for table in fitted_tables(title, columns, rows, text_columns, key_columns, stdout.width()):
        stdout.print(table)


def fitted_tables(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]], text_columns: tuple[str, ...] = (),
                  key_columns: int = 1, width: Optional[int] = None) -> list[Table]:
    """The table as one or more rich Tables that fit `width` (None: any) with every number whole."""
    def build(title: str, picked: list[int], compact: bool, probe: bool = False) -> Table:
        options = dict(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False) if compact else {}
        table = Table(title=title, title_justify="left", **options)
        for i in picked:
            if columns[i] in text_columns:
                table.add_column(columns[i], justify="left", overflow="fold")
            else:
                table.add_column(columns[i], justify="right", no_wrap=True)
        for row in rows:  # a probe counts free text at a folded width: only numbers must fit
            table.add_row(*(row[i][:12] if probe and columns[i] in text_columns else row[i] for i in picked))
        return table

    def fits(picked: list[int], compact: bool) -> bool:
        return width is None or _MEASURE.measure(build("", picked, compact, probe=True)).maximum <= width

    everything = list(range(len(columns)))
    for compact in (False, True):
        if fits(everything, compact):
            return [build(title, everything, compact)]
    keys, rest, parts = everything[:key_columns], everything[key_columns:], []
    while rest:
        taken = [rest.pop(0)]
        while rest and fits(keys + taken + rest[:1], True):
            taken.append(rest.pop(0))
        parts.append(keys + taken)
    return [build(title if n == 0 else f"(continued, {n + 1}/{len(parts)})", picked, True)
            for n, picked in enumerate(parts)]


_MEASURE = Console(width=1_000_000)  # measures a table's natural width, prints nothing

COORDS = typer.Option(None, "--coords", metavar="FILE", help="Coordinates file from `sw detect` (YAML or JSON).")
COORD = typer.Option(None, "--coord", metavar="L,R,C", help="A coordinate LAYER,ROW,COL[,EXPERT]; repeatable.")
SELECT = typer.Option("super", "--select", metavar="super|set|all",
                      help="Which candidates of --coords (or of the detection) to act on, by their measured role: "
                           "super (the paper's: breaks the model alone), set (super + joint), all. --coord weights "
                           "are taken as given.")
EXPORT_SELECT = typer.Option("super", "--select", metavar="super|set|all",
                             help="Which candidates of COORDS keep their matrices, by their measured role: super "
                                  "(the paper's: breaks the model alone), set (super + joint), all.")
MODE = typer.Option(None, "--mode", metavar="zero|scale", help="zero (default) or scale.")
FACTOR = typer.Option(None, "--factor", metavar="S", help="Multiply by S instead of zeroing (implies --mode scale; 0 zeroes, "
                                             "> 1 amplifies).")
CONTROL = typer.Option(None, "--control", metavar="random|outliers", help="Ablate a control instead: random (same count, "
                       "same matrices) or outliers (the --top N largest other weights).")
TOP = typer.Option(None, "--top", metavar="N", help="With --control outliers: how many weights (default: the paper's "
                   "~7000 of Llama-7B, scaled by this model's down-projection size, as sw study picks).")
SEED = typer.Option(0, "--seed", metavar="N", help="Seed for the random control and bootstrap errors.")
CONTROL_SEED = typer.Option(0, "--seed", metavar="N", help="Seed for --control random.")
FORCE_OUT_DIR = typer.Option(False, "--force", help="Replace a non-empty --out directory.")

# Options shared by the commands that evaluate a model.
DATA_DIR = typer.Option(None, "--data-dir", metavar="DIR", envvar="SUPERWEIGHT_DATA", help="Evaluation data.")
BATCH_SIZE = typer.Option("auto", "--batch-size", metavar="N|auto", help="Sequences per forward pass, or auto.")
MAX_LENGTH = typer.Option(None, "--max-length", metavar="N", help="Context length (default: the model's).")


def first_documents(limit: Optional[int]) -> str:
    """The table title's note on --limit."""
    if not limit:
        return ""
    return ", first document of each task" if limit == 1 else f", first {limit} documents per task"
