"""A real quantizer, naive vs the super weights' matrices kept in high precision: perplexity, size,
each super weight after quantization and dequantization, and what the quantizer's output says it kept.

The names kept are `sw export`'s (edit/export.py), checked against the model, exactly what a user
hands the quantizer. GGUF files are scored by llama.cpp's own `llama-perplexity` on the task's raw
text (wikitext only); the Python quantizers' dequantized models by superweight's evaluator.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from ..coords import SuperWeight
from ..edit import export as handoff
from ..edit import real_quantizers as rq
from ..errors import UsageError

EXPORT_FORMAT = {"llama.cpp": "llama.cpp", "llm-compressor": "llm-compressor", "quanto": "bitsandbytes",
                 "bitsandbytes": "bitsandbytes"}


def _original_values(model_dir: Path, down_proj: str, weights: Sequence[SuperWeight]) -> dict[str, float]:
    from safetensors import safe_open

    values = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for w in weights:
                name = f"{down_proj.format(w.layer)}.weight"
                if name in f.keys():
                    values[f"{w.layer},{w.row},{w.col}"] = float(f.get_slice(name)[w.row:w.row + 1, w.col:w.col + 1])
    return values


def _keep_lists(exported: handoff.Export, fmt: str) -> dict[str, list[str]]:
    """The quantizer's own skips (naive) and those plus the super weights' matrices (protected)."""
    if fmt == "llm-compressor":
        listed = yaml.safe_load(exported.content)["quant_stage"]["quant_modifiers"]["QuantizationModifier"]["ignore"]
    else:
        import json

        listed = json.loads(exported.content)["llm_int8_skip_modules"]
    return {"naive": [m for m in listed if m not in exported.modules], "protected": list(listed)}


def _evaluate_folder(folder: Path, tasks: list[str], evaluate_options: dict) -> dict[str, Any]:
    from .evaluate import evaluate
    from ..model.load import load_model

    loaded = load_model(str(folder), dtype="float32", device="cpu")
    out = evaluate(loaded.model, loaded.tokenizer, tasks, **evaluate_options)
    return out["results"]


def _wikitext_file(work: Path, data_dir: Optional[str], limit: Optional[int]) -> Path:
    from .tasks import load_task

    docs = load_task("wikitext", data_dir, limit).docs
    path = work / "wikitext.txt"
    path.write_text("\n".join(doc["page"] for doc in docs))
    return path


def read_back(quantizer: str, mode: str, result: dict, keep: list[str], gguf_tensors: list[str],
              naive_types: Optional[dict] = None) -> dict[str, Any]:
    """Did the quantizer keep exactly the named modules (tensors) in high precision?"""
    if quantizer == "llama.cpp":
        types = result["tensor_types"]
        kept = {name: types.get(name) for name in gguf_tensors}
        others = ({n: f"{naive_types[n]}->{t}" for n, t in types.items()
                   if n not in gguf_tensors and naive_types.get(n) != t} if naive_types else {})
        ok = all(t == handoff.DEFAULT_GGML_TYPE.upper() for t in kept.values()) if mode == "protected" else True
        return {"ok": ok, "kept_types": kept, "others_changed": others}
    kept_linear = sorted(result["unquantized_linear"])
    expected = sorted(m for m in keep if m in kept_linear or m not in ("model.embed_tokens", "model.norm"))
    check = {"ok": kept_linear == expected, "unquantized_linear": kept_linear, "expected": expected}
    if quantizer == "llm-compressor":
        check["saved_ignore"] = result.get("saved_ignore")
        check["ok"] = check["ok"] and sorted(result.get("saved_ignore") or []) == sorted(keep)
    return check


def compare(model_dir: Path, weights: Sequence[SuperWeight], tools: rq.QuantizerTools, settings: dict, *,
            tasks: list[str], work: Path, data_dir: Optional[str] = None, limit: Optional[int] = None,
            max_length: Optional[int] = None, batch_size: int | str = "auto",
            progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Quantize `model_dir` (a float safetensors folder) naive and protected; measure both."""
    progress = progress or (lambda message: None)
    quantizer = tools.quantizer
    if quantizer == "llama.cpp" and list(tasks) != ["wikitext"]:
        raise UsageError("--quantizer llama.cpp is scored by llama-perplexity on wikitext: use --task wikitext")
    fmt = EXPORT_FORMAT[quantizer]
    gguf = None
    if quantizer == "llama.cpp":
        progress("converting to an F32 GGUF with llama.cpp's converter")
        gguf = work / "model-f32.gguf"
        rq.run_worker(tools, {"job": "convert", "converter": str(tools.converter), "model_dir": str(model_dir),
                              "out": str(gguf)})
    exported = handoff.export(weights, fmt, spec=str(model_dir), gguf=gguf)
    down_proj = re.sub(r"\.\d+\.", ".{}.", exported.modules[0], count=1)
    keep = _keep_lists(exported, fmt) if fmt != "llama.cpp" else {"naive": [], "protected": exported.gguf_tensors}
    if quantizer != "llama.cpp":
        rq.check_model_fits(quantizer, settings, model_dir, keep["protected"])
    super_weights = [[w.layer, w.row, w.col] for w in weights]
    evaluate_options = dict(data_dir=data_dir, limit=limit, max_length=max_length, batch_size=batch_size)
    text_file = _wikitext_file(work, data_dir, limit) if gguf else None
    context = max_length or 512
    runs: dict[str, Any] = {}
    progress("scoring the unquantized model")
    runs["unquantized"] = ({"perplexity": rq.llama_perplexity(tools, gguf, text_file, context),
                            "size_bytes": gguf.stat().st_size} if gguf else
                           {"results": _evaluate_folder(model_dir, tasks, evaluate_options),
                            "size_bytes": sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))})
    for mode in ("naive", "protected"):
        progress(f"{quantizer} {settings['name']}, {mode}")
        job = {"job": quantizer, "model_dir": str(model_dir), "scheme": settings.get("type"), "scheme_args": settings,
               "keep": keep[mode], "super_weights": super_weights, "down_proj": down_proj,
               "out": str(work / f"{mode}{'.gguf' if gguf else ''}"), "float_out": str(work / f"{mode}-float32"),
               "gguf": str(gguf) if gguf else None, "bin_dir": str(tools.bin_dir) if tools.bin_dir else None,
               "tensor_types": exported.content if gguf and mode == "protected" else None}
        result = rq.run_worker(tools, job)
        progress(f"scoring {mode}")
        if gguf:
            result["perplexity"] = rq.llama_perplexity(tools, Path(job["out"]), text_file, context)
        else:
            result["results"] = _evaluate_folder(Path(job["float_out"]), tasks, evaluate_options)
        result["read_back"] = read_back(quantizer, mode, result, keep[mode], exported.gguf_tensors or [],
                                        runs.get("naive", {}).get("tensor_types"))
        runs[mode] = result
    return {"quantizer": quantizer, "scheme": settings["name"], "kept": exported.modules,
            "gguf_tensors": exported.gguf_tensors, "export": exported.content,
            "original_values": _original_values(model_dir, down_proj, weights), "runs": runs,
            "scored_by": "llama-perplexity (token perplexity, context %d)" % context if gguf else "superweight's evaluator"}


def _headline(run: dict, task: str) -> Optional[float]:
    if "perplexity" in run:
        return run["perplexity"]["perplexity"]
    metrics = run.get("results", {}).get(task, {})
    return next((metrics[k] for k in ("word_perplexity", "perplexity", "acc") if k in metrics), None)


def table(document: dict, task: str) -> tuple[list[str], list[list[str]]]:
    """Naive vs protected, one row each, as in docs/results/smollm2-135m/real_quantizers.md."""
    runs, original = document["runs"], document["original_values"]
    names = list(original)
    columns = ["model", f"{task} perplexity", "change vs naive", "size"] + [f"[{n}]" for n in names] + ["kept as named"]
    rows = []
    for mode in ("unquantized", "naive", "protected"):
        run = runs[mode]
        value = _headline(run, task)
        cell = "—" if value is None else f"{value:.4g}" + (f" ± {run['perplexity']['stderr']:.2g}" if "perplexity" in run else "")
        naive = _headline(runs["naive"], task)
        change = f"{(value / naive - 1) * 100:+.1f} %" if mode == "protected" and value and naive else ""
        values = run.get("values") or original
        check = run.get("read_back", {})
        kept = "" if mode == "unquantized" else ("yes" if check.get("ok") else "NO")
        if check.get("others_changed"):
            kept += f" (+{len(check['others_changed'])} other tensors changed type)"
        label = mode if mode == "unquantized" else f"{document['quantizer']} {document['scheme']} {mode}"
        rows.append([label, cell, change, f"{run['size_bytes'] / 2**20:.1f} MiB"]
                    + [f"{values[n]:.4g}" for n in names] + [kept])
    return columns, rows
