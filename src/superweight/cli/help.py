"""How `sw COMMAND --help` reads: the command class every command is registered with.

Typer prints a parameter without a metavar as its Python type (`<list[str]>`, `<int>`), a
required argument as `{NAME}`, adds `[default: 4]` beside a help text that already says
`(default 4)`, and rewraps example lines mid-command. This class fixes each where the help is
built, so every command reads alike whoever declared its options.
"""

from __future__ import annotations

import re
from pathlib import Path

from typer.core import TyperArgument, TyperCommand

# A metavar for an option declared without one, by the type its values have.
_METAVARS = {int: "N", float: "X", str: "TEXT", Path: "PATH"}


def _metavar(param) -> str:
    annotation = param.type_descriptor.annotation
    args = getattr(annotation, "__args__", None)
    element = args[0] if args else annotation  # list[str] -> str (repeatable)
    return _METAVARS.get(element, param.name.upper())


def _argument_usage(argument: TyperArgument):
    """NAME for a required argument, [NAME] for an optional one (Typer writes {NAME})."""
    name = argument.metavar or argument.name.upper()
    return lambda: name if argument.required or name.startswith("[") else f"[{name}]"


def _keep_examples(text: str | None) -> str | None:
    """Mark each paragraph after "Examples:" with click's no-rewrap marker (a line of \\b), so
    that a command line is never cut in two."""
    if not text or "Examples:" not in text:
        return text
    head, examples = text.split("Examples:", 1)
    paragraphs = [p for p in re.split(r"\n\s*\n", examples) if p.strip()]
    return head + "Examples:\n\n" + "\n\n".join("\b\n" + p.strip("\n") for p in paragraphs)


class HelpCommand(TyperCommand):
    """A Typer command whose help shows metavars, each default once, and examples unwrapped."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.help = _keep_examples(self.help)
        for param in self.params:
            if isinstance(param, TyperArgument):
                param.display_type_rich = lambda ctx: None  # the metavar says what it is
                param._usage_display_name = _argument_usage(param)
                continue
            if getattr(param, "is_flag", False) or getattr(param, "count", False):
                continue
            if param.metavar is None and hasattr(param, "type_descriptor"):
                param.metavar = _metavar(param)
            if "(default" in (param.help or ""):  # the help says it in words: once is enough
                param.show_default = False
