"""Turning results into things people read: rows for tables, JSON documents, PNG plots.

No terminal code here (the CLI renders rows with rich); plots use matplotlib's Agg backend so
they work on headless machines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..coords import SuperWeight
from ..find.detect import Detection
from .known import KnownEntry, coordinate_key, lookup


@dataclass(frozen=True)
class SourceCheck:
    """How detected coordinates compare with one source's coordinates for this model."""

    source: str  # the source's key in the registry (paper-table-2, authors-code, ...)
    source_name: str  # how a reader calls it ("paper Table 2")
    cite: str
    super_weights: list[tuple]  # (layer, row, col) or (layer, row, col, expert), as the source gives them
    verdict: str  # "agrees", "agrees, and found more", "partly agrees", "differs"
    missing: list[tuple]
    extra: list[tuple]

    @property
    def agrees(self) -> bool:
        return not self.missing

    def summary(self) -> str:
        text = f"{self.source_name}: detection {self.verdict}"
        if self.missing:
            text += f"; not found: {', '.join(map(str, map(list, self.missing)))}"
        if self.extra:
            text += f"; also found: {', '.join(map(str, map(list, self.extra)))}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "source_name": self.source_name, "cite": self.cite,
                "super_weights": [list(c) for c in self.super_weights], "verdict": self.verdict,
                "agrees": self.agrees, "missing": [list(c) for c in self.missing],
                "extra": [list(c) for c in self.extra]}


@dataclass(frozen=True)
class KnownCheck:
    """How detected coordinates compare with every registered source for this model, entry by entry."""

    key: str  # the model's key in configs/known_coordinates.yaml
    entries: list[SourceCheck]
    conflicts: list[str]

    @property
    def agrees_with(self) -> list[str]:
        """The sources whose every coordinate was found."""
        return [e.source for e in self.entries if e.agrees]

    def summary(self) -> str:
        """One line per source, then one per known conflict between sources."""
        lines = [f"registered coordinates for {self.key}, {e.summary()}" for e in self.entries]
        lines += [f"known conflict between sources for {self.key}: {c}" for c in self.conflicts]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "agrees_with": self.agrees_with,
                "entries": [e.to_dict() for e in self.entries], "conflicts": list(self.conflicts)}


def _compare(found: list[tuple], entry: KnownEntry) -> SourceCheck:
    published = [coordinate_key(c) for c in entry.super_weights]
    missing = [c for c, k in zip(entry.super_weights, published) if k not in found]
    extra = [k if k[3] is not None else k[:3] for k in found if k not in published]
    if not missing:
        verdict = "agrees, and found more" if extra else "agrees"
    else:
        verdict = "differs" if len(missing) == len(published) else "partly agrees"
    return SourceCheck(entry.source.key, entry.source.name, entry.source.cite, list(entry.super_weights),
                       verdict, missing, extra)


def check_known(weights: list[SuperWeight], known_key: str | None, model_id: str | None = None) -> KnownCheck | None:
    """Compare detected weights with each registered source for this model (by the alias's
    `known:` key, else by hub id); None when the model is not registered."""
    model = lookup(known_key, model_id)
    if model is None:
        return None
    found = [w.key for w in weights]
    return KnownCheck(model.key, [_compare(found, entry) for entry in model.entries], list(model.conflicts))


def super_weight_table(weights: list[SuperWeight], labels: dict[tuple, str] | None = None,
                       ) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """(columns, rows) for a table of super weights; the expert column only for MoE models, the
    effect column (verify.py's labels, by weight key) only when given.

    write = the residual write, conc. = its concentration in one channel, share = the part of the
    raw output this one weight makes (above 1 when it writes more than the whole raw output, the
    row's other weights working against it), lands on = the residual value leaving the layer."""
    def num(x: float | None) -> str:
        return "" if x is None else f"{x:.4g}"

    def share(x: float | None) -> str:
        return "" if x is None else f"{x:.2f}"

    with_expert = any(w.expert is not None for w in weights)
    with_labels = labels is not None
    columns = ("layer", "row", "col", *(("expert",) if with_expert else ()), "weight", "input act.",
               "write", "conc.", "share", "lands on", "token", "iter.", *(("role",) if with_labels else ()))
    rows = [
        (str(w.layer), str(w.row), str(w.col), *((str(w.expert),) if with_expert else ()), num(w.value),
         num(w.input_activation), num(w.output_spike), share(w.concentration), share(w.share),
         num(w.residual_after), str(w.token), str(w.iteration),
         *((labels.get(w.key, ""),) if with_labels else ()))
        for w in weights
    ]
    return columns, rows


def detection_document(detection: Detection, model: dict[str, Any], known: KnownCheck | None) -> dict[str, Any]:
    """Everything `sw detect --json` prints: coordinates, the rule, and per-layer evidence."""
    first = detection.iterations[0] if detection.iterations else []
    first_reasons = detection.rejections[0] if detection.rejections else [None] * len(first)
    return {
        "model": model,
        "prompt": detection.prompt,
        "num_tokens": detection.num_tokens,
        "rule": vars(detection.rule),
        "super_weights": [w.to_dict() for w in detection.super_weights],
        "candidate_layers": detection.candidate_layers,
        "cancelling_layers": detection.cancelling_layers,
        "layers": [
            {"layer": s.layer, "down_proj_input_max": s.input_max, "down_proj_output_max": s.output_max,
             "residual_write": s.spike, "row": s.row, "col": s.col, "token": s.spike_token,
             "raw_output": s.raw_output, "concentration": s.concentration, "share": s.share,
             "residual_before": s.residual_before, "residual_after": s.residual_after,
             "carried": s.carried, "rejected": reason}
            for s, reason in zip(first, first_reasons)
        ],
        "known": None if known is None else known.to_dict(),
    }
