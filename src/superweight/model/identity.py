"""Which model a name means, so that coordinates made for one model are not silently applied to
another (the paper's issue #7: Llama-7B's coordinates applied to Llama-2-7B "cannot reproduce").

A coordinates file records the `model` and `model_type` it was made for (coords.write_coords). A
name is reduced to a hub id where one is known (an alias gives its hub id, or the hub id of its
registry entry for a packaged GGUF); a local folder or file has no hub id, and is compared by its
`model_type` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .source import ModelSource, aliases, load_yaml_config, looks_like_hub_id


def hub_identity(name: str | None) -> str | None:
    """The hub id `name` stands for (lower case), or None when it names a local file or folder."""
    if not isinstance(name, str) or not name.strip():
        return None
    entry = aliases().get(name)
    if entry is not None:
        if "hub" in entry:
            return entry["hub"].lower()
        hub = load_yaml_config("known_coordinates.yaml").get("models", {}).get(entry.get("known"), {}).get("hub")
        return hub[0].lower() if hub else None
    return name.lower() if looks_like_hub_id(name) and not Path(name).exists() else None


def source_identity(source: ModelSource) -> str | None:
    if source.alias:
        return hub_identity(source.alias)
    return source.location.lower() if source.kind == "hub" else None


def coordinates_mismatch(meta: dict[str, Any], source: ModelSource, model_type: str | None,
                         file: str | Path = "the coordinates file") -> str | None:
    """One line when coordinates made for one model (`meta`: a coordinates file's fields) are about
    to be applied to another (`source`, of `model_type`); None when they match or nobody can tell."""
    made_for = meta.get("model") if isinstance(meta.get("model"), str) else None
    made_type = meta.get("model_type") if isinstance(meta.get("model_type"), str) else None
    what = f"{made_for or 'another model'}" + (f" ({made_type})" if made_type else "")
    advice = f"super weights differ between models, even a base model and its instruct variant; " \
             f"find this model's own with `sw detect {source.spec}`"
    if made_type and model_type and made_type != model_type:
        return f"{file} was made for {what}, not for {source.spec} ({model_type}): {advice}"
    ours, theirs = source_identity(source), hub_identity(made_for)
    if ours and theirs and ours != theirs:
        return f"{file} was made for {what}, not for {source.spec}: {advice}"
    return None


def coordinates_file_mismatch(coords_file: Any, source: ModelSource, model_type: str | None) -> str | None:
    """`coordinates_mismatch` for a `--coords FILE` or a detection result (None when none was given)."""
    if coords_file is None:
        return None
    from ..coords import coordinates

    given = coordinates(coords_file)
    return coordinates_mismatch(given.meta, source, model_type, given.name)
