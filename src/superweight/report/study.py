"""The study report: REPORT.md, report.json and the plots of a super-weight study (Yu et al. 2024),
written atomically to one directory. What the study measures comes from `measure` (`study_runs`,
`stop_words`, `activation_profile`); this module only writes it down.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..coords import SuperWeight
from ..files import atomic_directory
from ..measure.activation_profile import ActivationProfile
from ..measure.configurations import SummaryTable
from ..measure.generate import Generation
from ..measure.stop_words import StopWordShift
from ..measure.study_runs import CPU_BUDGET_NOTE, SWEEP_METRICS
from .plots import plot_activation_profile, plot_scale_sweep, plot_stop_word_shift

REPORT_FILE = "REPORT.md"
JSON_FILE = "report.json"
SWEEP_PLOT = "scale_sweep.png"
PROFILE_PLOT = "activation_profile.png"
STOP_WORDS_PLOT = "stop_words.png"


def sweep_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(columns, rows) of the scale sweep: only the metrics the tasks measured, accuracies to 4
    decimals (as in Table 1), perplexities to 3."""
    present = [(key, label) for key, label, _ in SWEEP_METRICS if any(r.get(key) is not None for r in rows)]

    def cell(key: str, value: Any) -> str:
        if value is None:
            return ""
        return f"{value:.4f}" if key == "avg_acc" else f"{value:.3f}"

    return (["s", *(label if key == "perplexity" else "avg acc" for key, label in present)],
            [[f"{r['factor']:g}", *(cell(key, r.get(key)) for key, _ in present)] for r in rows])


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def _stop_word_section(shift: StopWordShift) -> list[str]:
    lines = [
        "## Stop-word shift (super weights zeroed)", "",
        f"Mean next-token probability on {shift.num_stop_tokens} stop-word tokens over {shift.num_positions} "
        f"positions: original {shift.stop_mass_original:.4f}, zeroed {shift.stop_mass_ablated:.4f}.", "",
    ]
    for title, entries in (("Grows most", shift.grows), ("Shrinks most", shift.shrinks)):
        lines += [f"### {title}", "", markdown_table(
            ("token", "text", "original", "zeroed"),
            [(e["token"], repr(e["text"]), e["original"], e["ablated"]) for e in entries]), ""]
    return lines


def _generations_section(generations: Sequence[Generation]) -> list[str]:
    lines = ["## Generations", ""]
    for prompt in dict.fromkeys(g.prompt for g in generations):
        chosen = [g for g in generations if g.prompt == prompt]
        lines += [f"Greedy continuation of {prompt!r} (at most {max(len(g.token_ids) for g in chosen)} tokens):", "",
                  markdown_table(("configuration", "continuation"), [(g.configuration, repr(g.text)) for g in chosen]),
                  ""]
    return lines


def write_report(out_dir: str | Path, *, force: bool = False, super_weights: Sequence[SuperWeight] = (),
                 table: SummaryTable | None = None,
                 sweep_rows: list[dict[str, Any]] | None = None, stop_words: StopWordShift | None = None,
                 profile: ActivationProfile | None = None, meta: dict[str, Any] | None = None,
                 verification: Any = None, generations: Sequence[Generation] | None = None) -> Path:
    """REPORT.md, report.json and the PNG plots, written atomically to `out_dir` (a non-empty
    `out_dir` is refused unless `force`)."""
    meta = dict(meta or {})
    document: dict[str, Any] = {"meta": meta}
    lines = ["# Super-weight study", ""]
    if meta.get("command"):
        lines += ["Command:", "", "```", str(meta["command"]), "```", ""]
    if meta.get("documents_note"):
        lines += [f"Documents: {meta['documents_note']}"
                  + (f" ({CPU_BUDGET_NOTE})." if meta.get("cpu_budget") else "."), ""]
    with atomic_directory(out_dir, force) as tmp:
        if super_weights:
            labels = verification.labels() if verification is not None else {}
            lines += ["## Super weights", "", "`down_proj.weight[row, col]` of `layer` (see docs/architectures.md); "
                      "effect: `sw detect --verify`'s label (README: How detection decides).", "",
                      markdown_table(("layer", "row", "col", "expert", "weight", "input act.", "output spike", "conc.",
                                      "share", "iter.", "effect"),
                                     [(w.layer, w.row, w.col, w.expert, w.value, w.input_activation,
                                       w.output_spike, w.concentration, w.share, w.iteration,
                                       labels.get(w.key, w.effect)) for w in super_weights]), ""]
            document["super_weights"] = [w.to_dict() for w in super_weights]
        if verification is not None:
            lines += ["## Measured effect of each weight", "",
                      f"Perplexity on {verification.text_source} ({verification.num_tokens} tokens). "
                      f"Labels: {verification.to_dict()['rule']}.", "",
                      markdown_table(("configuration", "perplexity", "x original"), verification.rows()), ""]
            lines += [f"- prompt {c.prompt!r}: " + ("same coordinates" if c.same else "other coordinates: " + ", ".join(
                str(list(k[:3])) for k in c.coordinates)) for c in verification.prompts] + [""]
            document["verification"] = verification.to_dict()
        if table is not None:
            lines += ["## Table 1: zeroing super weights", "", markdown_table(table.columns, table.rows), ""]
            document["table"] = {"columns": table.columns, "rows": table.rows}
        if generations:
            lines += _generations_section(generations)
            document["generations"] = [g.to_dict() for g in generations]
        if sweep_rows:
            lines += ["## Scaling the super weights", "", markdown_table(*sweep_table(sweep_rows)), "",
                      f"![scale sweep]({SWEEP_PLOT})", ""]
            plot_scale_sweep(sweep_rows, tmp / SWEEP_PLOT)
            document["sweep"] = sweep_rows
        if stop_words is not None:
            lines += _stop_word_section(stop_words) + [f"![stop-word shift]({STOP_WORDS_PLOT})", ""]
            plot_stop_word_shift(stop_words, tmp / STOP_WORDS_PLOT)
            document["stop_words"] = stop_words.to_dict()
        if profile is not None:
            lines += ["## Activation profile", "", f"![activation profile]({PROFILE_PLOT})", ""]
            plot_activation_profile(profile.before, profile.after, tmp / PROFILE_PLOT)
            document["activation_profile"] = profile.to_dict()
        (tmp / REPORT_FILE).write_text("\n".join(lines), encoding="utf-8")
        (tmp / JSON_FILE).write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    return Path(out_dir)
