"""Where a command reports its progress: the library's silent `Reporter`, which the CLI subclasses
to draw spinners and bars. Kept apart from the commands so that `sw --help` imports no torch."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator

Bar = Callable[[str, int, int], None]


class Reporter:
    """Where a command reports its progress. This one is silent; the CLI's draws spinners and bars.

    `say`: a message; `note`: a note from the library; `warn`: what the result depends on and the
    caller must see (coordinates made for another model), which this reporter logs as a warning of
    the "superweight" logger (shown in a notebook); `status(message)`: one long step, yielding a
    function that updates its text; `bars()`: staged work, yielding `bar(stage, done, total)`.
    """

    def say(self, message: str) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        logging.getLogger("superweight").warning(message)

    @contextmanager
    def status(self, message: str) -> Iterator[Callable[[str], None]]:
        yield lambda text: None

    @contextmanager
    def bars(self) -> Iterator[Bar]:
        yield lambda stage, done, total: None
