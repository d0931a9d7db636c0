"""The registry of published super-weight coordinates (configs/known_coordinates.yaml).

Each registered model holds one entry per source (the paper's Table 2, the authors' code, Super
Experts Table 8, this tool's own measurement, ...), so that a detection is compared with every
source on its own, and the places where sources disagree are recorded as conflicts rather than
silently resolved. `sw known` prints it; `sw detect` compares with it (report/detection.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from ..model.source import aliases, load_yaml_config

REGISTRY_FILE = "known_coordinates.yaml"

Coordinate = tuple  # (layer, row, col) or (layer, row, col, expert)


@dataclass(frozen=True)
class Source:
    """Where coordinates come from: a short name for tables and the full citation."""

    key: str
    name: str
    cite: str


@dataclass(frozen=True)
class KnownEntry:
    """One source's coordinates for one model."""

    source: Source
    super_weights: list[Coordinate]


@dataclass(frozen=True)
class KnownModel:
    """A registered model: its hub ids, one entry per source, the conflicts between sources."""

    key: str
    hub: list[str]
    entries: list[KnownEntry]
    conflicts: list[str] = field(default_factory=list)
    notes: str | None = None

    @property
    def sources(self) -> list[str]:
        return [e.source.key for e in self.entries]

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "hub": list(self.hub),
            "alias": self.key if self.key in aliases() else None,
            "entries": [{"source": e.source.key, "source_name": e.source.name, "cite": e.source.cite,
                         "super_weights": [list(c) for c in e.super_weights]} for e in self.entries],
            "conflicts": list(self.conflicts), "notes": self.notes,
        }


def coordinate_key(coordinate: Coordinate) -> tuple:
    """(layer, row, col, expert) as SuperWeight.key spells it: expert None for a dense layer."""
    return tuple(coordinate) if len(coordinate) == 4 else (*coordinate, None)


def registry() -> dict[str, KnownModel]:
    """Every registered model, by key, in the file's order."""
    table = load_yaml_config(REGISTRY_FILE)
    sources = {key: Source(key, value["name"], value["cite"]) for key, value in table.get("sources", {}).items()}
    models = {}
    for key, model in (table.get("models") or {}).items():
        entries = [KnownEntry(sources[e["source"]], [tuple(c) for c in e["super_weights"]]) for e in model["entries"]]
        models[key] = KnownModel(key, list(model.get("hub", [])), entries, list(model.get("conflicts", [])),
                                 model.get("notes"))
    return models


def lookup(known_key: str | None = None, model_id: str | None = None) -> KnownModel | None:
    """The registered model named `known_key` (an alias's `known:`), else the one whose hub ids
    hold `model_id`; None when the model is not registered."""
    models = registry()
    if known_key in models:
        return models[known_key]
    for model in models.values():
        if model_id and model_id in model.hub:
            return model
    return None


def known_model(name: str) -> KnownModel:
    """A registered model by its key, alias or hub id, for `sw known NAME`; an unknown name fails."""
    alias = aliases().get(name, {})
    found = lookup(alias.get("known", name), alias.get("hub", name))
    if found is None:
        raise UsageError(f"'{name}' is not in the registry of published coordinates; "
                         f"`sw known` lists the registered models ({', '.join(registry())})")
    return found


def registry_document(name: str | None = None) -> dict[str, Any]:
    """`sw known --json`: the sources and every registered model (or only `name`)."""
    table = load_yaml_config(REGISTRY_FILE)
    models = [known_model(name)] if name else list(registry().values())
    return {"sources": {key: dict(value) for key, value in table.get("sources", {}).items()},
            "models": [m.to_dict() for m in models]}


def registry_rows(name: str | None = None) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """(columns, rows) for `sw known`: one row per model and source; conflicts in their own column."""
    models = [known_model(name)] if name else list(registry().values())
    columns = ("model", "hub ids", "source", "super weights", "conflicts")
    rows = []
    for model in models:
        for i, entry in enumerate(model.entries):
            rows.append((model.key if i == 0 else "", ", ".join(model.hub) if i == 0 else "", entry.source.name,
                         "; ".join(_label(c) for c in entry.super_weights),
                         "; ".join(model.conflicts) if i == 0 else ""))
    return columns, rows


def _label(coordinate: Coordinate) -> str:
    where = f"[{coordinate[0]}, {coordinate[1]}, {coordinate[2]}]"
    return where if len(coordinate) == 3 else f"{where} expert {coordinate[3]}"
