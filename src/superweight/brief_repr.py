"""Short reprs for what the library returns. A notebook shows the object on a cell's last line,
and a dataclass's own repr prints every nested table (kilobytes of it) or, for a loaded model, its
whole module tree: a result reads as its class and its fields, each long one named by its type and
size, the weights by their coordinates (`to_dict()` holds everything)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

WIDTH = 60  # a field's repr up to this long is shown as it is


def brief(value: Any) -> str:
    """`value` in a few words: its repr when short, a path in full, weights by their labels, a model's
    source by its name."""
    if isinstance(value, Path):
        return repr(str(value))
    if callable(getattr(value, "label", None)):  # a SuperWeight: [layer, row, col]
        return value.label()
    if isinstance(value, (list, tuple)) and value and all(callable(getattr(v, "label", None)) for v in value):
        labels = "[" + ", ".join(v.label() for v in value) + "]"
        return labels if len(labels) <= WIDTH else f"<{len(value)} weights>"
    text = repr(value)
    if len(text) <= WIDTH:
        return text
    if isinstance(value, (list, tuple, dict, set)):
        return f"<{type(value).__name__} of {len(value)}>"
    spec = getattr(value, "spec", None)  # a ModelSource: by the name it was given
    return f"<{type(value).__name__} {spec!r}>" if isinstance(spec, str) else f"<{type(value).__name__}>"


class BriefRepr:
    """A dataclass's repr in brief (declare it with `@dataclass(repr=False)`); `shown` names the
    properties worth reading beside the fields."""

    shown: tuple[str, ...] = ()

    def __repr__(self) -> str:
        names = [f.name for f in fields(self)] + list(self.shown)  # type: ignore[arg-type]
        return f"{type(self).__name__}(" + ", ".join(f"{name}={brief(getattr(self, name))}" for name in names) + ")"
