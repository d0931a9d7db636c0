"""Turning results into things people read: rows for tables, JSON documents, PNG plots.

No terminal code here (the CLI renders rows with rich); plots use matplotlib's Agg backend so
they work on headless machines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..coords import SuperWeight
from ..find.detect import Detection
from ..model.source import load_yaml_config


@dataclass(frozen=True)
class KnownCheck:
    """How detected coordinates compare with the published ones for this model."""

    key: str
    published: list[tuple[int, int, int]]
    verdict: str  # "agrees", "agrees, and found more", "partly agrees", "differs"
    missing: list[tuple[int, int, int]]
    extra: list[tuple[int, int, int]]
    measured: bool = False  # the entry was measured by this tool, not published in the paper

    @property
    def provenance(self) -> str:
        return "reference coordinates (measured by superweight)" if self.measured else \
            "published coordinates (paper, Table 2)"

    def summary(self) -> str:
        text = f"{self.provenance} for {self.key}: detection {self.verdict}"
        if self.missing:
            text += f"; not found: {', '.join(map(str, map(list, self.missing)))}"
        if self.extra:
            text += f"; also found: {', '.join(map(str, map(list, self.extra)))}"
        return text


def known_entry_key(known_key: str | None, model_id: str | None) -> str | None:
    table = load_yaml_config("known_coordinates.yaml")
    if known_key in table:
        return known_key
    for key, entry in table.items():
        if model_id and model_id in entry.get("hub", []):
            return key
    return None


def check_known(weights: list[SuperWeight], known_key: str | None, model_id: str | None = None) -> KnownCheck | None:
    key = known_entry_key(known_key, model_id)
    if key is None:
        return None
    entry = load_yaml_config("known_coordinates.yaml")[key]
    published = [tuple(c) for c in entry["super_weights"]]
    found = [(w.layer, w.row, w.col) for w in weights]
    missing = [c for c in published if c not in found]
    extra = [c for c in found if c not in published]
    if not missing:
        verdict = "agrees, and found more" if extra else "agrees"
    else:
        verdict = "differs" if len(missing) == len(published) else "partly agrees"
    return KnownCheck(key, published, verdict, missing, extra, measured=entry.get("source") == "measured")


def super_weight_table(weights: list[SuperWeight], labels: dict[tuple, str] | None = None,
                       ) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """(columns, rows) for a table of super weights; the expert column only for MoE models, the
    effect column (verify.py's labels, by weight key) only when given.

    write = the residual write, conc. = its concentration in one channel, share = the part of the
    raw output this one weight makes, lands on = the residual value leaving the layer."""
    def num(x: float | None) -> str:
        return "" if x is None else f"{x:.4g}"

    def share(x: float | None) -> str:
        return "" if x is None else f"{x:.2f}"

    with_expert = any(w.expert is not None for w in weights)
    with_labels = labels is not None
    columns = ("layer", "row", "col", *(("expert",) if with_expert else ()), "weight", "input act.",
               "write", "conc.", "share", "lands on", "token", "iter.", *(("effect",) if with_labels else ()))
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
        "known": None if known is None else {
            "entry": known.key, "verdict": known.verdict, "published": [list(c) for c in known.published],
            "provenance": known.provenance, "missing": [list(c) for c in known.missing],
            "extra": [list(c) for c in known.extra],
        },
    }
