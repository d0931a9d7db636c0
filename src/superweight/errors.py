"""Exception types the CLI turns into one-line messages, and the "did you mean" they suggest.

Every error a user can cause raises a subclass of `SuperweightError` whose message says what is
wrong and what to do about it. The CLI prints `error: <message>` and exits with `exit_code`.
"""

import difflib
import functools
import re
from typing import Any, Callable, Iterable, Mapping, TypeVar

T = TypeVar("T")


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


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message, for a one-line report ("" when it has none): a library's
    own message may run to a traceback-like page, and a one-line error quotes only its head."""
    return (str(error).splitlines() or [""])[0]


def closest_name(name: str, known: Iterable[str], cutoff: float) -> str | None:
    """The known name `name` is most likely a typo of, for an error's "did you mean": the closest
    one with a similarity of at least `cutoff` (0..1), else None."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=cutoff)
    return close[0] if close else None


# A command-line option in a message: `--max-length`, not `sw eval --coords` quoted in backticks
# (that one names the command to run) and not one already followed by its keyword.
_OPTION = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)(?! \()")


def with_keywords(message: str, keywords: Mapping[str, str]) -> str:
    """`message` with each option a library caller gave as a keyword argument named both ways:
    "--max-length (max_length=) must be ...". `keywords` maps an option's name with underscores to
    how the caller writes it (`max_length=`, `force=True`, `LoadOptions(dtype=)`); other options,
    and anything between backticks, stay as they are."""
    def name(match: re.Match) -> str:
        keyword = keywords.get(match.group(1).replace("-", "_"))
        return f"{match.group(0)} ({keyword})" if keyword else match.group(0)

    parts = message.split("`")
    return "`".join(part if i % 2 else _OPTION.sub(name, part) for i, part in enumerate(parts))


def keyword_errors(function: Callable[..., T], keywords: Mapping[str, str]) -> Callable[..., T]:
    """`function` as the library hands it out: the messages of its errors are written for `sw`
    (one place per check, shared with the CLI), so a `SuperweightError` raised by the call names
    `keywords` (see `with_keywords`) for a caller who never typed an option. The CLI calls the
    unwrapped functions and keeps its own wording."""
    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> T:
        try:
            return function(*args, **kwargs)
        except SuperweightError as error:
            if len(error.args) == 1 and isinstance(error.args[0], str):
                error.args = (with_keywords(error.args[0], keywords),)
            raise

    return call
