"""`sw`: the command line (the Typer app and its commands are in `app`)."""

from .app import _terminate, app, main  # noqa: F401  (_terminate: tests install it as `main` does)

__all__ = ["app", "main"]
