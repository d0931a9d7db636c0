"""Installed versions of the packages a result depends on, recorded beside it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__version__ = "0.1.0"  # this tool's own version (superweight.__version__ hands it on)


def package_version(*names: str) -> str | None:
    """The installed version of the first of `names` that is installed (a distribution can be
    spelt several ways, e.g. "lm_eval" and "lm-eval"), or None when none is."""
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None
