"""Library calls print nothing unless asked: transformers' and huggingface_hub's progress bars
("Loading weights: 100%|...", "Writing model shards: 100%|...") and their info/warning logging
are silenced around a load and around a save."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def quiet_transformers(quiet: bool = True) -> Iterator[None]:
    """Within the block, no progress bar and no log line below ERROR from transformers or
    huggingface_hub (when `quiet`); their previous settings come back afterwards, even on error."""
    if not quiet:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging

    bars_were_on = logging.is_progress_bar_enabled()
    hub_bars_were_off = are_progress_bars_disabled()
    verbosity = logging.get_verbosity()
    logging.disable_progress_bar()
    disable_progress_bars()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars_were_on:
            logging.enable_progress_bar()
        if not hub_bars_were_off:
            enable_progress_bars()
