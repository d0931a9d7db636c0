"""`sw`: the command line. Parses options, calls one library function, prints.

Progress and messages go to stderr, results to stdout (`--json` for scripts). Errors print one
line and exit non-zero; `--debug` shows the traceback instead.

This module holds the Typer app and what every command shares at run time: the consoles, the
per-command `Session`, the global options and `main`. The commands live beside it, by stage.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import typer
from rich.console import Console

from ..versions import __version__
from ..commands.reporter import Reporter
from ..errors import SuperweightError, first_line

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

    def width(self) -> int | None:
        """The terminal's width; None when piped (nothing is wrapped)."""
        return None if not sys.stdout.isatty() else Console().width


stdout = _Stdout()
stderr = Console(stderr=True, highlight=False)


class Session(Reporter):
    """Per-command output settings: how chatty, and whether errors show tracebacks. It is the
    reporter the library's command functions report their progress to."""

    def __init__(self, quiet: bool, debug: bool):
        self.quiet = quiet or GLOBAL_OPTIONS["quiet"]
        self.debug = debug or GLOBAL_OPTIONS["debug"]
        self.main = True  # the process that prints: rank 0 under a launcher (run)

    def say(self, message: str) -> None:
        """A message, on one line however long (a path or a list cut in two defeats grep)."""
        if not self.quiet:
            stderr.print(message, markup=False, soft_wrap=True)

    def note(self, message: str) -> None:
        """A note from the library, on one line however long."""
        if not self.quiet:
            stderr.print(f"note: {message}", markup=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        """A warning: printed under --quiet too (beside --json's stdout), by rank 0 alone."""
        if self.main:
            stderr.print(f"warning: {message}", markup=False, soft_wrap=True)

    @contextmanager
    def status(self, message: str) -> Iterator[Callable[[str], None]]:
        """A spinner on stderr; yields a function that updates its text. A long text keeps its end
        (the task a stage is at). When stderr is not a terminal (a log file), each new stage is a
        plain line instead, as it comes."""
        if self.quiet:
            yield lambda text: None
            return
        if not stderr.is_terminal:
            shown = [None]

            def line(text: str) -> None:
                if text != shown[0]:
                    shown[0] = text
                    stderr.print(text, markup=False, soft_wrap=True)

            line(message)
            yield line
            return
        room = max(20, stderr.width - 4)  # the spinner and its gap
        with stderr.status(keep_end(message, room)) as spinner:
            yield lambda text: spinner.update(keep_end(text, room))

    def bars(self) -> Iterator[Callable[[str, int, int], None]]:
        return _progress_bars(self)

    def run(self, work: Callable[[], None]) -> None:
        from ..distributed import launched, session, speaks_for_main

        _quiet_libraries()
        # Under a launcher only rank 0 prints: it reports the other ranks' errors and progress too.
        try:
            main = launched().is_main
        except SuperweightError:
            main = True  # session() raises it again, and it is printed below
        self.main = main
        self.quiet = self.quiet or not main
        try:
            with session(), _muted(not main):
                work()
        except SuperweightError as e:
            if self.debug:
                raise
            if main or speaks_for_main(e):
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
            if main or speaks_for_main(e):
                stderr.print(f"error: {type(e).__name__}: {first_line(e)} (rerun with --debug for the traceback)",
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
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or notes on stderr (any command); warnings still print."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on error (any command)."),
) -> None:
    """Find, ablate and evaluate the super weights of large language models (Yu et al. 2024)."""
    GLOBAL_OPTIONS.update(quiet=quiet, debug=debug)


@contextmanager
def _progress_bars(session: Session) -> Iterator[Callable[[str, int, int], None]]:
    """Rich progress bars on stderr, one per stage; yields `bar(stage, done, total)`, the
    callback the library reports its progress through."""
    if session.quiet:
        yield lambda stage, done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not stderr.is_terminal:  # a log file: one line when a stage starts, one when it ends
        started: set[str] = set()

        def line(stage: str, done: int, total: int) -> None:
            if stage not in started or done >= total:
                stderr.print(f"{stage}: {done}/{total}", markup=False, soft_wrap=True)
                started.add(stage)

        yield line
        return
    bars: dict[str, int] = {}
    room = max(16, stderr.width - 60)  # the bar, the count and the time take the rest
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=stderr, transient=False) as progress:
        def bar(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                bars[stage] = progress.add_task(keep_end(stage, room), total=total)
            progress.update(bars[stage], completed=done, total=total)

        yield bar


def keep_end(text: str, width: int) -> str:
    """`text` cut to `width` at its start, not its end: "…ablated: piqa" keeps the task in view."""
    return text if len(text) <= width else "…" + text[len(text) - width + 1:]


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler, `timeout`) unwinds like Ctrl-C, so atomic writes clean up."""


def terminate_on_sigterm(signum, frame) -> None:
    raise Terminated()


def main() -> None:
    # Bars that libraries draw with plain tqdm (transformers' GGUF conversion) obey only this,
    # read when tqdm is first imported: before any library is.
    os.environ.setdefault("TQDM_DISABLE", "1")
    signal.signal(signal.SIGTERM, terminate_on_sigterm)
    with _muted(_another_rank()):  # also --help and --version, printed before any command runs
        sys.exit(_run_app())


def _run_app() -> int:
    """The CLI's exit code. A mistake click finds while parsing (an unknown option, a value that is
    not a number) is one line, as every other usage error: what is wrong, and where the help is;
    click's own form is four (usage, hint, blank, error)."""
    try:  # recent typer carries its own copy of click
        from typer._click import exceptions as click
    except ImportError:
        from click import exceptions as click

    no_args_is_help = getattr(click, "NoArgsIsHelpError", ())  # click >= 8.2 raises it for `sw` alone
    try:
        code = app(prog_name="sw", standalone_mode=False)
    except no_args_is_help as e:  # the help, as click shows it
        e.show()
        return e.exit_code
    except click.UsageError as e:
        where = f"; see {e.ctx.command_path} -h" if e.ctx is not None else ""
        if not _another_rank():
            stderr.print(f"error: {e.format_message().rstrip('.')}{where}", markup=False, soft_wrap=True)
        return e.exit_code
    except click.ClickException as e:  # a file option click could not open
        if not _another_rank():
            stderr.print(f"error: {e.format_message()}", markup=False, soft_wrap=True)
        return e.exit_code
    except click.Abort:  # Ctrl-C at a prompt
        return 130
    return code if isinstance(code, int) else 0


def _another_rank() -> bool:
    """Under a launcher, a rank other than 0: what it would print, rank 0 prints once. Read from
    RANK alone, not `distributed.launched()`: `sw --help` must not wait for torch to import."""
    rank = os.environ.get("RANK", "0")
    return "WORLD_SIZE" in os.environ and rank.isdigit() and int(rank) > 0
