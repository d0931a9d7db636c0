"""Exception types the CLI turns into one-line messages, and the "did you mean" they suggest.

Every error a user can cause raises a subclass of `SuperweightError` whose message says what is
wrong and what to do about it. The CLI prints `error: <message>` and exits with `exit_code`.
"""

import difflib
from typing import Iterable


class SuperweightError(Exception):
    """Base class: a user-facing problem with a one-line, actionable message."""

    exit_code = 1


class UsageError(SuperweightError):
    """Bad option values or arguments."""

    exit_code = 2


class ModelLoadError(SuperweightError):
    """The model could not be found, read or understood."""


class UnsupportedArchitectureError(SuperweightError):
    """The model's family is not in the adapter table."""


class CoordinatesError(SuperweightError):
    """A coordinates file is malformed or does not fit the model."""


class CoordinateOptionError(CoordinatesError):
    """A --coord value that is not LAYER,ROW,COL[,EXPERT], or a --coords file that does not exist:
    a usage error."""

    exit_code = 2


class OutputPathError(SuperweightError):
    """An output path cannot or must not be written (a missing folder, the current directory, the
    model's own): a usage error, like an output that exists without --force."""

    exit_code = 2


class DataError(SuperweightError):
    """Evaluation data is missing or malformed."""


class MissingDependencyError(SuperweightError):
    """A feature needs an optional extra that is not installed."""

class RankFailed(SuperweightError):
    """Another rank of a distributed run failed, hung or died; the message names it."""


def closest_name(name: str, known: Iterable[str], cutoff: float) -> str | None:
    """The known name `name` is most likely a typo of, for an error's "did you mean": the closest
    one with a similarity of at least `cutoff` (0..1), else None."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=cutoff)
    return close[0] if close else None
