"""`sw`: the command line, one module per job.

`app` holds the Typer app, the consoles, the per-command session and `main`; `options` the options
several commands share and the table printer; the commands live by stage: `find` (detect, known),
`edit` (ablate, export, quantize), `measure` (eval, generate, study). They are registered here, in
the order `sw --help` lists them. Only this package imports typer and rich.
"""

from .app import app, main, terminate_on_sigterm  # noqa: F401  (the SIGTERM handler `main` installs)
from .edit import ablate, export, quantize
from .find import detect, known_coordinates
from .measure import eval_, generate, study

app.command()(detect)
app.command()(ablate)
app.command(name="eval")(eval_)
app.command()(generate)
app.command()(export)
app.command()(quantize)
app.command()(study)
app.command(name="known")(known_coordinates)

__all__ = ["app", "main"]
