"""The study report: REPORT.md, report.json and the plots of a super-weight study (Yu et al. 2024),
written atomically to one directory. What the study measures comes from `measure` (`study_runs`,
`stop_words`, `activation_profile`); this module only writes it down.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from ..coords import SuperWeight, weights_named, weights_noun
from ..edit.save import describe_recorded_ablation
from ..files import atomic_directory
from ..measure.activation_profile import ActivationProfile
from ..measure.configurations import SummaryTable
from ..measure.generate import Generation
from ..measure.stop_words import StopWordShift
from ..measure.study_runs import CPU_BUDGET_NOTE, SWEEP_METRICS
from ..measure.verify import GIVEN_TEXT, SHIPPED_TEXT, labelled
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


def readable(value: Any) -> str:
    """A number as a person reads it: four significant digits (30.71, 0.4836, 1.298e+08, never
    129802099.419); a number written as text (a table cell) likewise; anything else as it is."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, str):
        if " ± " in value:  # a table cell with its standard error
            return " ± ".join(readable(part) for part in value.split(" ± ", 1))
        try:
            number = float(value)
        except ValueError:
            return value
        return readable(number) if "." in value or "e" in value.lower() else value
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, (float, str)) and not isinstance(value, bool):
            value = readable(value)
        if value is None:
            return ""
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def _column(table: SummaryTable, *wanted: str) -> int | None:
    """The index of the first of `wanted` among the table's columns (a substring match), or None."""
    for name in wanted:
        for i, column in enumerate(table.columns):
            if name in column:
                return i
    return None


def summary_lines(super_weights: Sequence[SuperWeight], table: SummaryTable | None,
                  stop_words: StopWordShift | None, measured: Sequence[SuperWeight] = ()) -> list[str]:
    """The paragraph a reader can quote: the super weights, what zeroing and restoring them does,
    against the controls, each number as the table gives it (with its error where it has one).
    `measured`: the same weights with the roles the study measured (default: as given)."""
    lines = ["## Summary", ""]
    if super_weights:
        found = "; ".join(f"layer {w.layer}, `down_proj.weight[{w.row}, {w.col}]`"
                          + (f" (expert {w.expert})" if w.expert is not None else "")
                          + (f", {w.role}" if getattr(w, "role", None) else "") for w in measured or super_weights)
        what = weights_noun(list(super_weights))  # as the table's rows name them
        lines.append(f"Acting on {len(super_weights)} {what}{'s' if len(super_weights) != 1 else ''} "
                     f"(role measured on a short text by `sw detect --verify`'s rule): {found}.")
    else:
        lines.append("No super weight was found or given.")
    if table is not None and table.rows:
        metrics = [(i, name) for i, name in ((_column(table, "word_perplexity", "perplexity"), "perplexity"),
                                             (_column(table, "avg acc", " acc"), "accuracy")) if i is not None]

        def values(row: list[Any] | None) -> str:
            return ", ".join(f"{table.columns[i]} {readable(row[i])}" for i, _ in metrics) if row else ""

        original, zeroed, restored = (table.row_of(kind) for kind in ("unchanged", "ablated", "restored"))
        controls = table.rows_of("control")
        if original and zeroed and metrics:
            lines.append(f"Zeroing {'it' if len(super_weights) == 1 else 'them'} moves the scores from "
                         f"{values(original)} (original) to {values(zeroed)}.")
        if restored and metrics:
            lines.append(f"Writing the super activation back with the {_zeroed(super_weights)} still zeroed gives "
                         f"{values(restored)}.")
        if controls and metrics:
            lines.append("Controls: " + "; ".join(f"{row[0]}: {values(row)}" for row in controls) + ".")
        if any("±" in str(cell) for row in table.rows for cell in row):
            lines.append("± is the standard error of the mean over the documents read.")
    if stop_words is not None:
        lines.append(f"Mean next-token probability on stop words: {stop_words.stop_mass_original:.4g} original, "
                     f"{stop_words.stop_mass_ablated:.4g} with the {_zeroed(super_weights)} zeroed.")
    return [lines[0], "", " ".join(lines[2:]), ""]


def _gguf_quantization(location: str) -> str | None:
    """The quantization type a GGUF file's name states (`...Q4_1.gguf` -> Q4_1), or None."""
    found = re.search(r"[.-](I?Q\d(?:_[0-9A-Z]+)*|F16|BF16|F32)\.gguf$", location, re.IGNORECASE)
    return found.group(1).upper() if found else None


def model_lines(meta: dict[str, Any]) -> list[str]:
    """What model, data and tool made the report: enough for a reader to reproduce it."""
    model = meta.get("model") or {}
    location = str(model.get("location") or "")
    lines = ["## Model, data and tool", ""]
    if model:
        lines.append(f"- Model: `{model.get('spec')}`" + (f" ({location})" if location and location != model.get("spec") else ""))
    if location.lower().endswith(".gguf"):
        name = Path(location).name
        quantization = _gguf_quantization(location)
        instruct = " the instruction-tuned (Instruct) model," if "instruct" in name.lower() else ""
        lines.append(f"- Weights:{instruct} read from the GGUF file `{name}`"
                     + (f", quantized as {quantization}" if quantization else "")
                     + f", dequantized to {model.get('dtype', 'float32')} before anything is measured: every result "
                     "is of the quantized model's values, not of the original checkpoint's"
                     + (" (a 4-bit round-to-nearest experiment on it quantizes weights that are already 4-bit)"
                        if quantization and quantization.startswith(("Q4", "IQ4")) else "") + ".")
    elif model.get("dtype"):
        lines.append(f"- Weights: {model['dtype']}.")
    if model.get("superweight_ablation"):  # a study puts a folder's recorded values back (README: sw study)
        lines.append(f"- The folder is {describe_recorded_ablation(model['superweight_ablation'])}; the original "
                     "values its superweight_ablation.json records were put back in memory, so every row is "
                     "measured on the original model.")
    device = model.get("device") or meta.get("device")
    if device:
        lines.append(f"- Device: {device}.")
    if meta.get("tasks"):
        lines.append(f"- Tasks: {', '.join(meta['tasks'])}.")
    if meta.get("documents_note"):
        lines.append(f"- Documents read: {meta['documents_note']}"
                     + (f" ({CPU_BUDGET_NOTE})" if meta.get("cpu_budget") else "") + ".")
    if meta.get("seed") is not None:
        lines.append(f"- Seed of the random control: {meta['seed']}.")
    if meta.get("tool"):
        lines.append(f"- Tool: {meta['tool']}.")
    if meta.get("command"):
        lines += ["", "Command:", "", "```", str(meta["command"]), "```"]
    return lines + [""] if len(lines) > 2 else []


def differences_lines(table: SummaryTable | None, stop_words: StopWordShift | None) -> list[str]:
    """Where this run's results go against the paper's (Yu et al. 2024, Llama-7B), and why."""
    notes = []
    if stop_words is not None and stop_words.stop_mass_ablated < stop_words.stop_mass_original:
        grown = ", ".join(repr(e["text"]) for e in stop_words.grows[:3])
        notes.append(
            f"- **Stop words.** The paper finds that zeroing the super weights raises the next-token probability "
            f"of stop words (2-5x in Llama-7B). Here it falls, {stop_words.stop_mass_original:.4g} -> "
            f"{stop_words.stop_mass_ablated:.4g}: the model is broken so badly that probability moves to tokens "
            f"unrelated to the text" + (f" ({grown} gain most)" if grown else "") + ", not towards stop words. "
            "The paper's stop-word increase is a finding about a model that still writes fluent text without them.")
    if table is not None:
        perplexity = _column(table, "word_perplexity", "perplexity")
        original = table.row_of("unchanged")
        outliers = next((row for row in table.rows_of("control") if "outliers" in row[0]), None)

        def number(cell: Any) -> float | None:
            try:
                return float(str(cell).split("±")[0])
            except ValueError:
                return None

        if perplexity is not None and original and outliers:
            before, after = number(original[perplexity]), number(outliers[perplexity])
            if before and after and after > 2 * before:
                notes.append(
                    f"- **Other outliers.** The paper finds that zeroing the largest other weights barely matters in "
                    f"Llama-7B. Here \"{outliers[0]}\" raises perplexity from {before:.4g} to {after:.4g}. In a "
                    "small model many of the largest other weights sit in the super weight's own row, the hidden "
                    "channel that carries the super activation (in SmolLM2-135M, row 507 of eight other layers), so "
                    "this control weakens the same massive activation.")
    return ["## Where this differs from the paper", "", *notes, ""] if notes else []


def _zeroed(super_weights: Sequence[SuperWeight]) -> str:
    """What the study zeroed, for sentences and titles: "super weight [11, 507, 1229]", "3 super weights"."""
    return weights_named(list(super_weights)) if super_weights else "super weights"


def _stop_word_section(shift: StopWordShift, super_weights: Sequence[SuperWeight]) -> list[str]:
    lines = [
        f"## Stop-word shift ({_zeroed(super_weights)} zeroed)", "",
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


def _text_name(source: str) -> str:
    """Where the verification text came from, in words: a file by its path, in backticks."""
    if source == SHIPPED_TEXT:
        return "the sample paragraph that comes with superweight (configs/verify_text.txt)"
    return source if source == GIVEN_TEXT else f"`{source}`"


def table_reading(meta: dict[str, Any]) -> str | None:
    """Which documents Table 1 read, for its note ("--limit 40", or the CPU budget), None for all."""
    if isinstance(meta.get("limit"), int):
        return f"--limit {meta['limit']}"
    return meta.get("documents_note") or None


def write_report(out_dir: str | Path, *, force: bool = False, super_weights: Sequence[SuperWeight] = (),
                 table: SummaryTable | None = None,
                 sweep_rows: list[dict[str, Any]] | None = None, stop_words: StopWordShift | None = None,
                 profile: ActivationProfile | None = None, meta: dict[str, Any] | None = None,
                 verification: Any = None, generations: Sequence[Generation] | None = None) -> Path:
    """REPORT.md, report.json and the PNG plots, written atomically to `out_dir` (a non-empty
    `out_dir` is refused unless `force`)."""
    meta = dict(meta or {})
    document: dict[str, Any] = {"meta": meta}
    # Named as given (as the table's rows, and sw eval, name them); described with the roles measured here.
    measured = labelled(super_weights, verification) if verification is not None else list(super_weights)
    lines = ["# Super-weight study", "", *summary_lines(super_weights, table, stop_words, measured), *model_lines(meta),
             *differences_lines(table, stop_words)]
    with atomic_directory(out_dir, force) as tmp:
        if super_weights:
            lines += ["## Super weights", "", "`down_proj.weight[row, col]` of decoder layer `layer`; weight: its value; input act.: the "
                      "down-projection input it multiplies; output spike: what the layer writes; role: what "
                      "removing it measured, alone and within the set (superweight README, \"Vocabulary\").", "",
                      markdown_table(("layer", "row", "col", "expert", "weight", "input act.", "output spike", "conc.",
                                      "share", "iter.", "role"),
                                     [(w.layer, w.row, w.col, w.expert, w.value, w.input_activation,
                                       w.output_spike, w.concentration, w.share, w.iteration,
                                       w.role) for w in measured]), ""]
            document["super_weights"] = [w.to_dict() for w in measured]
        if verification is not None:
            lines += ["## Measured effect of each candidate", "",
                      f"Perplexity on {_text_name(verification.text_source)} ({verification.num_tokens} tokens). "
                      f"Roles: {verification.to_dict()['rule']}.", "",
                      markdown_table(("configuration", "perplexity", "x original"), verification.rows()), ""]
            if verification.attribution_rows():
                lines += [f"Attribution within the set ({verification.attribution}): x when zeroed last = the "
                          "perplexity ratio of zeroing it once every other candidate is zeroed; share of set = its "
                          "Shapley value over the whole set's log-perplexity effect.", "",
                          markdown_table(("weight", "x alone", "x zeroed last", "share of set", "role"),
                                         verification.attribution_rows()), ""]
            found = [e.weight.key for e in verification.effects]
            lines += [f"- prompt {c.prompt!r}: {c.difference(found)}" for c in verification.prompts] + [""]
            document["verification"] = verification.to_dict()
        if table is not None:
            lines += ["## Table 1: zeroing super weights", "", markdown_table(table.columns, table.rows), ""]
            if any("±" in str(cell) for row in table.rows for cell in row):  # one document read has no error
                lines += ["± is the standard error over the documents read (none is computed for word perplexity, "
                          "as in lm-eval).", ""]
            notes = table.limit_notes(table_reading(meta))
            if notes:  # a lead sentence, then one bullet per metric
                lines += ["Note: " + notes[0], "", *notes[1:], ""]
            document["table"] = table.to_dict()
        if generations:
            lines += _generations_section(generations)
            document["generations"] = [g.to_dict() for g in generations]
        if sweep_rows:
            lines += [f"## Scaling the {_zeroed(super_weights)}", "", markdown_table(*sweep_table(sweep_rows)), "",
                      f"![scale sweep]({SWEEP_PLOT})", ""]
            plot_scale_sweep(sweep_rows, tmp / SWEEP_PLOT, scaled=_zeroed(super_weights))
            document["sweep"] = sweep_rows
        if stop_words is not None:
            lines += _stop_word_section(stop_words, super_weights) + [f"![stop-word shift]({STOP_WORDS_PLOT})", ""]
            plot_stop_word_shift(stop_words, tmp / STOP_WORDS_PLOT, zeroed=_zeroed(super_weights))
            document["stop_words"] = stop_words.to_dict()
        if profile is not None:
            lines += ["## Activation profile", "", f"![activation profile]({PROFILE_PLOT})", ""]
            plot_activation_profile(profile.before, profile.after, tmp / PROFILE_PLOT, zeroed=_zeroed(super_weights))
            document["activation_profile"] = profile.to_dict()
        (tmp / REPORT_FILE).write_text("\n".join(lines), encoding="utf-8")
        (tmp / JSON_FILE).write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    return Path(out_dir)
