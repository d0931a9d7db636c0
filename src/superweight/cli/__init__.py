"""`sw`: the command line, one module per job.

`app` holds the Typer app, the consoles, the per-command session and `main`; `options` the options
several commands share and the table printer; the commands live by stage: `find` (detect, known),
`edit` (ablate, export, quantize), `measure` (eval, generate, study). They are registered here, in
the order `sw --help` lists them. Only this package imports typer and rich.
"""

from .app import app, main, terminate_on_sigterm  # noqa: F401  (the SIGTERM handler `main` installs)
from .edit import ablate, export, quantize
from .find import detect, known_coordinates
from .help import HelpCommand
from .measure import eval_, generate, study

# Each summary fits `sw --help`'s column (click cuts a longer one with "...").
SUMMARIES = {
    "detect": (detect, "Find the super weights of MODEL (data-free, one forward pass)."),
    "ablate": (ablate, "Zero or rescale super weights (or a control); save the model."),
    "eval": (eval_, "Perplexity and zero-shot accuracy, as lm-eval computes them."),
    "generate": (generate, "Greedy continuations: original, ablated, restored, control."),
    "export": (export, "Names a real quantizer needs to keep the super weights' matrices."),
    "quantize": (quantize, "RTN quantization with and without super-weight handling."),
    "study": (study, "The paper's analysis of MODEL in one command: REPORT.md, plots."),
    "known": (known_coordinates, "The registry of published super-weight coordinates."),
}
for _name, (_command, _summary) in SUMMARIES.items():
    app.command(name=_name, cls=HelpCommand, short_help=_summary)(_command)

__all__ = ["app", "main"]
