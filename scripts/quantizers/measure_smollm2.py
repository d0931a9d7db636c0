"""Real quantizers on SmolLM2-135M, naive vs the super weights' matrices kept in high precision.

Run with the quantizers' own venv (scripts/quantizers/setup.sh), from the repository root:

    .venv-quant/bin/python scripts/quantizers/measure_smollm2.py --limit 2 --ctx 512

For each quantizer and width it quantizes the float32 model twice: naive (the quantizer's usual
skips: the output head) and protected (the names `sw export` writes for the coordinates file kept
in high precision). It records WikiText perplexity (llama-perplexity for GGUF files; `sw eval`, run
by the project's own .venv, on the dequantized model for the others), the size, every super
weight's value after quantization and dequantization, and reads back from the quantizer's output
which modules stayed in high precision. Each variant's result is cached as JSON under --work
(rerun skips what is done; --redo QUANTIZER reruns one). Writes --json and prints a markdown table.

Quantizing, dequantizing and reading back are `sw quantize --quantizer`'s own steps
(superweight/edit/quantizer_worker.py); this script adds the timings, the control and the table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "quantizers"
LLAMA_VERSION = os.environ.get("LLAMA_CPP_PYTHON_VERSION", "0.3.36")
LLAMA_SRC = CACHE / f"llama_cpp_python-{LLAMA_VERSION}" / "vendor" / "llama.cpp"
LLAMA_BIN = CACHE / f"llama.cpp-build-{LLAMA_VERSION}" / "bin"
# `sw` as the project's own venv runs it, on this checkout's src (not the quantizers' venv).
PROJECT_PYTHON = os.environ.get("SUPERWEIGHT_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
SW = [PROJECT_PYTHON, "-m", "superweight"]
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
sys.path.insert(0, str(ROOT / "src"))  # the worker's steps, from this checkout too
from superweight.edit.quantizer_worker import (bitsandbytes_config, bitsandbytes_dequantized, down_proj_after,  # noqa: E402
                                               folder_size, gguf_read_back, llm_compressor_dequantized,
                                               llm_compressor_recipe, load_float32, quanto_dequantized,
                                               quanto_quantize, super_weight_values, write_float_model)

DATA_DIR = Path(os.environ.get("SUPERWEIGHT_DATA", "/work/shared/data"))
WIKITEXT = DATA_DIR / "wikitext" / "wikitext-2-raw-v1_test_documents.jsonl"

LLAMA_TYPES = ["Q8_0", "Q4_K_M", "Q3_K_S", "Q2_K", "Q4_0"]
# llm-compressor: (name, bits, group size: None for one scale per channel); symmetric int
# weights, activations 16-bit. Groups of 128 (the W4A16 preset) are refused on SmolLM2: 576
# columns are not a multiple of 128 (kept below to record the error); 64 divides both 576 and 1536.
LLMC_SCHEMES = [("W8A16 channel", 8, None), ("W4A16 group128", 4, 128), ("W4A16 channel", 4, None),
                ("W4A16 group64", 4, 64), ("W3A16 group64", 3, 64), ("W2A16 group64", 2, 64)]
# quanto: (name, qtype, per-axis?) -- quanto's own default for qint4/qint2 is groups of 128
# (96 where 128 does not divide the row); per-axis sets the module's group size to None.
QUANTO_SCHEMES = [("qint8 per-axis", "qint8", True), ("qint4 group128", "qint4", False),
                  ("qint4 per-axis", "qint4", True), ("qint2 group128", "qint2", False)]
BNB_SCHEMES = [("nf4 block64", "nf4"), ("int8 (LLM.int8)", "int8")]
# A control for "protected": as many other layers' down projections kept instead (same size
# cost), far from the super weights' layers, so a gain that is not the super weight's shows.
CONTROL_LAYERS = [5, 15, 25]
CONTROL_RUNS = {"llama.cpp": ["Q3_K_S", "Q2_K", "Q4_0"], "llm-compressor": ["W4A16 channel"],
                "quanto": ["qint4 group128", "qint4 per-axis"]}
RTN_SETTINGS = [(4, 128), (3, 128), (8, 128)]
DOWN_PROJ = "model.layers.{}.mlp.down_proj"  # SmolLM2 is a Llama


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    log("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], text=True, capture_output=True, **kwargs)


def checked(cmd: list, **kwargs) -> str:
    result = run(cmd, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result.stdout


# --- the float32 model, the coordinates and what `sw export` writes ---------------------------

class Setup:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.model_dir = Path(args.model_dir)
        self.coords = Path(args.coords)
        import yaml
        coords = yaml.safe_load(self.coords.read_text())
        self.super_weights = [(s["layer"], s["row"], s["col"]) for s in coords["super_weights"]]
        self.original = self.read_original_values()
        self.exports = {}
        for target, suffix in (("llama.cpp", "tensor-types.txt"), ("llm-compressor", "recipe.yaml"),
                               ("bitsandbytes", "bnb.json")):
            out = self.work / f"export.{suffix}"
            extra = ["--gguf", self.f32_gguf()] if target == "llama.cpp" else []
            if not out.exists():
                checked([*SW, "export", self.coords, "--to", target, "--out", out, "-q", *extra])
            self.exports[target] = out
        skips = json.loads(self.exports["bitsandbytes"].read_text())["llm_int8_skip_modules"]
        recipe = yaml.safe_load(self.exports["llm-compressor"].read_text())
        ignore = recipe["quant_stage"]["quant_modifiers"]["QuantizationModifier"]["ignore"]
        self.protected_modules = [m for m in ignore if m != "lm_head"]
        self.llmc_ignore = {"naive": [m for m in ignore if m not in self.protected_modules],
                            "protected": ignore}
        self.hf_skips = {"naive": [m for m in skips if m not in self.protected_modules],
                         "protected": skips}
        self.control_modules = [f"model.layers.{l}.mlp.down_proj" for l in CONTROL_LAYERS]
        self.llmc_ignore["control"] = self.llmc_ignore["naive"] + self.control_modules
        self.hf_skips["control"] = self.hf_skips["naive"] + self.control_modules
        control_types = self.work / "control.tensor-types.txt"
        control_types.write_text("".join(f"^blk\\.{l}\\.ffn_down\\.weight$=f16\n" for l in CONTROL_LAYERS))
        self.exports["llama.cpp control"] = control_types
        self.text_file = self.work / f"wikitext-first{args.limit}.txt"
        docs = [json.loads(line)["page"] for line in WIKITEXT.read_text().splitlines()[: args.limit]]
        self.text_file.write_text("\n".join(docs))

    def read_original_values(self) -> dict:
        from safetensors import safe_open
        values = {}
        with safe_open(self.model_dir / "model.safetensors", "pt") as f:
            for layer, row, col in self.super_weights:
                tensor = f.get_tensor(f"model.layers.{layer}.mlp.down_proj.weight")
                values[f"{layer},{row},{col}"] = float(tensor[row, col])
        return values

    def f32_gguf(self) -> Path:
        out = self.work / "smollm2-f32.gguf"
        if not out.exists():
            checked([sys.executable, LLAMA_SRC / "convert_hf_to_gguf.py", self.model_dir,
                     "--outtype", "f32", "--outfile", out])
        return out

    def sw_eval(self, model_dir: Path) -> dict:
        out = checked([*SW, "eval", model_dir, "--task", "wikitext", "--data-dir", DATA_DIR,
                       "--limit", self.args.limit, "--max-length", self.args.ctx, "--json", "-q"])
        metrics = json.loads(out)["results"]["wikitext"]
        return {k: metrics[k] for k in ("word_perplexity", "byte_perplexity", "bits_per_byte")}

    def values_after(self, model, dequantized: dict) -> dict:
        """The super weights' values after quantization: dequantized, or kept in float."""
        return super_weight_values(self.super_weights, down_proj_after(DOWN_PROJ, model, dequantized))


# --- llama.cpp -------------------------------------------------------------------------------

def llama_perplexity(setup: Setup, gguf: Path) -> dict:
    # --no-repack: this build's AMX buffer type (GGML_NATIVE on a CPU with AMX) segfaults in
    # ggml::cpu::amx::tensor_traits::compute_forward on these VMs; plain CPU kernels do not.
    out = run([LLAMA_BIN / "llama-perplexity", "-m", gguf, "-f", setup.text_file, "-c", setup.args.ctx,
               "-b", setup.args.ctx, "-t", setup.args.threads, "--no-repack"])
    text = out.stdout + out.stderr
    match = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", text)
    if out.returncode != 0 or not match:
        raise RuntimeError(f"llama-perplexity failed: {text.strip()[-1500:]}")
    chunks = re.search(r"calculating perplexity over (\d+) chunks", text)
    return {"ppl": float(match.group(1)), "ppl_stderr": float(match.group(2)),
            "chunks": int(chunks.group(1)) if chunks else None}


def measure_llama(setup: Setup, qtype: str, mode: str) -> dict:
    src = setup.f32_gguf()
    out = setup.work / "gguf" / f"smollm2-{qtype}-{mode}.gguf"
    out.parent.mkdir(exist_ok=True)
    cmd = [LLAMA_BIN / "llama-quantize"]
    if mode == "protected":
        cmd += ["--tensor-type-file", setup.exports["llama.cpp"]]
    elif mode == "control":
        cmd += ["--tensor-type-file", setup.exports["llama.cpp control"]]
    started = time.time()
    checked(cmd + [src, out, qtype])
    quantize_s = time.time() - started
    values, types = gguf_read_back(out, setup.super_weights)
    result = {"quantize_s": round(quantize_s, 1), "size_bytes": out.stat().st_size,
              "values": values, "tensor_types": types,
              "perplexity": llama_perplexity(setup, out)}
    if setup.args.sw_eval_gguf:
        result["sw_eval"] = sw_eval_gguf(setup, out)
    return result


def sw_eval_gguf(setup: Setup, gguf: Path) -> dict:
    env = dict(os.environ, SUPERWEIGHT_CACHE=str(setup.work / "sw-cache"))
    out = subprocess.run([*SW, "eval", str(gguf), "--task", "wikitext", "--data-dir",
                          str(DATA_DIR), "--limit", str(setup.args.limit), "--max-length",
                          str(setup.args.ctx), "--json", "-q"], text=True, capture_output=True, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    metrics = json.loads(out.stdout)["results"]["wikitext"]
    # The dequantized copy is 0.5 GB per file; the perplexity is what we keep.
    shutil.rmtree(setup.work / "sw-cache" / "gguf", ignore_errors=True)
    return {k: metrics[k] for k in ("word_perplexity", "byte_perplexity", "bits_per_byte")}


# --- llm-compressor --------------------------------------------------------------------------

def measure_llmc(setup: Setup, scheme: tuple, mode: str) -> dict:
    from llmcompressor import oneshot

    name, bits, group_size = scheme
    out = setup.work / "llmc" / f"{name.replace(' ', '-')}-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    model = load_float32(setup.model_dir)
    recipe = llm_compressor_recipe(bits, group_size, setup.llmc_ignore[mode])
    started = time.time()
    oneshot(model=model, recipe=recipe)  # data-free: weight-only round-to-nearest with its observers
    quantize_s = time.time() - started
    dequantized, kept = llm_compressor_dequantized(model)
    model.save_pretrained(out, save_compressed=True)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    float_dir = setup.work / "llmc-float" / out.name
    write_float_model(setup.model_dir, dequantized, float_dir)
    values = setup.values_after(model, dequantized)
    result = {"quantize_s": round(quantize_s, 1), "size_bytes": folder_size(out), "values": values,
              "saved_ignore": config.get("ignore"), "saved_format": config.get("format"),
              "unquantized_linear": kept, "perplexity": setup.sw_eval(float_dir)}
    shutil.rmtree(float_dir)
    return result


# --- optimum-quanto --------------------------------------------------------------------------

def measure_quanto(setup: Setup, scheme: tuple, mode: str) -> dict:
    name, qtype, per_axis = scheme
    model = load_float32(setup.model_dir)
    started = time.time()
    quanto_quantize(model, qtype, per_axis, setup.hf_skips[mode])
    quantize_s = time.time() - started
    memory, seen = 0, set()  # tied weights (the embeddings and the head) counted once
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            memory += tensor.numel() * tensor.element_size()
    dequantized, kept = quanto_dequantized(model)
    float_dir = setup.work / "quanto-float" / f"{qtype}-{per_axis}-{mode}"
    write_float_model(setup.model_dir, dequantized, float_dir)
    values = setup.values_after(model, dequantized)
    result = {"quantize_s": round(quantize_s, 1), "size_bytes": memory, "size_kind": "state dict bytes",
              "values": values, "unquantized_linear": with_dtypes(model, kept), "perplexity": setup.sw_eval(float_dir)}
    shutil.rmtree(float_dir)
    return result


# --- bitsandbytes ----------------------------------------------------------------------------

def measure_bnb(setup: Setup, scheme: tuple, mode: str) -> dict:
    name, kind = scheme
    config = bitsandbytes_config(kind, setup.hf_skips[mode])
    started = time.time()
    model = load_float32(setup.model_dir, quantization_config=config, device_map="cpu")
    quantize_s = time.time() - started
    dequantized, kept = bitsandbytes_dequantized(model)
    float_dir = setup.work / "bnb-float" / f"{kind}-{mode}"
    write_float_model(setup.model_dir, dequantized, float_dir)
    values = setup.values_after(model, dequantized)
    result = {"quantize_s": round(quantize_s, 1), "size_bytes": model.get_memory_footprint(),
              "size_kind": "get_memory_footprint", "values": values, "unquantized_linear": with_dtypes(model, kept),
              "perplexity": setup.sw_eval(float_dir)}
    shutil.rmtree(float_dir)
    return result


def with_dtypes(model, names: list) -> list:
    """Each module left in float, named with its dtype (`name (torch.float32)`): read_back checks it."""
    modules = dict(model.named_modules())
    return [f"{name} ({modules[name].weight.dtype})" for name in names]


# --- the paper's RTN (`sw quantize`) ---------------------------------------------------------

def rtn_value(value_block, bits: int, index: int) -> float:
    """Asymmetric min-max round-to-nearest of one 1-D block, as `sw quantize` does (naive)."""
    lo, hi = float(value_block.min()), float(value_block.max())
    scale = (hi - lo) / (2 ** bits - 1)
    q = round((float(value_block[index]) - lo) / scale)
    return q * scale + lo


def measure_rtn(setup: Setup, bits: int, block: int) -> dict:
    from safetensors import safe_open
    out = checked([*SW, "quantize", setup.model_dir, "--coords", setup.coords, "--bits", bits,
                   "--block-size", block, "--z", "auto", "--task", "wikitext", "--data-dir", DATA_DIR,
                   "--limit", setup.args.limit, "--max-length", setup.args.ctx, "--json", "-q"])
    report = json.loads(out)
    naive_values = {}
    with safe_open(setup.model_dir / "model.safetensors", "pt") as f:
        for layer, row, col in setup.super_weights:
            flat = f.get_tensor(f"model.layers.{layer}.mlp.down_proj.weight").flatten()
            index = row * f.get_slice(f"model.layers.{layer}.mlp.down_proj.weight").get_shape()[1] + col
            start = index // block * block
            naive_values[f"{layer},{row},{col}"] = rtn_value(flat[start:start + block], bits, index - start)
    return {"report": report, "naive_values": naive_values}


# --- read-back checks and the table ---------------------------------------------------------

def read_back(setup: Setup, runs: dict) -> dict:
    """Did the quantizer keep exactly the protected matrices (and only them) in high precision?"""
    checks = {}
    gguf_names = [f"blk.{m.split('.')[2]}.ffn_down.weight" for m in setup.protected_modules]
    for key, run_result in runs.items():
        quantizer, *_, mode = key.split("/")
        if "error" in run_result or mode not in ("naive", "protected"):
            continue
        if quantizer == "llama.cpp":
            other = runs.get(key.rsplit("/", 1)[0] + ("/naive" if mode == "protected" else "/protected"), {})
            if mode == "naive" or "tensor_types" not in other:
                continue
            changed = sorted(n for n, t in run_result["tensor_types"].items() if other["tensor_types"].get(n) != t)
            kept = {n: run_result["tensor_types"][n] for n in gguf_names}
            # The named tensors are F16; any other tensor whose type moved is llama-quantize's own
            # mix (Q4_K_M's every-third-ffn_down bump counts only the tensors it quantizes).
            ok = set(gguf_names) <= set(changed) and set(kept.values()) == {"F16"}
            others = {n: f"{other['tensor_types'][n]}->{run_result['tensor_types'][n]}"
                      for n in changed if n not in gguf_names}
            checks[key] = {"ok": ok, "others_changed": others, "kept_types": kept,
                           "naive_types": {n: other["tensor_types"][n] for n in gguf_names}}
        elif quantizer == "llm-compressor":
            expected = sorted(setup.llmc_ignore[mode])
            ok = sorted(run_result["saved_ignore"]) == expected == sorted(run_result["unquantized_linear"])
            checks[key] = {"ok": ok, "saved_ignore": run_result["saved_ignore"], "expected": expected}
        elif quantizer in ("quanto", "bitsandbytes"):
            kept = sorted(n.split(" ")[0] for n in run_result["unquantized_linear"])
            floats = all("float32" in n for n in run_result["unquantized_linear"])
            expected = sorted(m for m in setup.hf_skips[mode] if m not in ("model.embed_tokens", "model.norm"))
            checks[key] = {"ok": kept == expected and floats, "unquantized_linear": run_result["unquantized_linear"],
                           "expected": expected}
    return checks


def short_size(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def control_cell(run_result: dict | None, naive_ppl: float | None) -> str:
    if not run_result:
        return ""
    if "error" in run_result:
        return "not run" if run_result["error"].startswith("not measured") else "failed"
    p = run_result["perplexity"]
    value = p.get("ppl", p.get("word_perplexity"))
    return f"{value:.4g} ({(value / naive_ppl - 1) * 100:+.1f} %)" if naive_ppl else f"{value:.4g}"


def table(results: dict) -> str:
    runs, sw = results["runs"], results["super_weights"]
    main_sw = "11,507,1229"
    lines = [f"| quantizer | scheme | perplexity naive | perplexity protected | change | size naive | "
             f"size protected | [{main_sw}] naive | [{main_sw}] protected | read-back | control: layers {CONTROL_LAYERS} kept |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def ppl(r):
        p = r.get("perplexity", {})
        if "ppl" in p:
            return p["ppl"], f"{p['ppl']:.2f} ± {p['ppl_stderr']:.2f}"
        if "word_perplexity" in p:
            return p["word_perplexity"], f"{p['word_perplexity']:.4g}"
        return None, "—"

    base_g, base_s = runs.get("baseline/f32 gguf", {}), runs.get("baseline/f32 sw eval", {})
    if base_g:
        lines.append(f"| llama.cpp (F32 GGUF) | unquantized | {ppl(base_g)[1]} | | | {short_size(base_g.get('size_bytes'))} | | {sw[main_sw]:.4f} | | | |")
    if base_s:
        lines.append(f"| `sw eval` (float32) | unquantized | {ppl(base_s)[1]} | | | {short_size(base_s.get('size_bytes'))} | | {sw[main_sw]:.4f} | | | |")
    seen = []
    for key in runs:
        parts = key.split("/")
        if parts[0] in ("baseline", "rtn") or parts[:2] in seen:
            continue
        seen.append(parts[:2])
        naive, prot = runs.get(f"{parts[0]}/{parts[1]}/naive", {}), runs.get(f"{parts[0]}/{parts[1]}/protected", {})
        if "error" in naive or "error" in prot:
            error = naive.get("error") or prot.get("error")
            error = "not run" if error.startswith("not measured") else f"failed: {error}"
            lines.append(f"| {parts[0]} | {parts[1]} | {error} | | | | | | | | |")
            continue
        (pn, tn), (pp, tp) = ppl(naive), ppl(prot)
        change = f"{(pp / pn - 1) * 100:+.1f} %" if pn and pp else ""
        check_result = results["read_back"].get(f"{parts[0]}/{parts[1]}/protected", {})
        check = check_result.get("ok")
        moved = len(check_result.get("others_changed", {}))
        lines.append(f"| {parts[0]} | {parts[1]} | {tn} | {tp} | {change} | {short_size(naive.get('size_bytes'))} | "
                     f"{short_size(prot.get('size_bytes'))} | {naive['values'][main_sw]:.4f} | "
                     f"{prot['values'][main_sw]:.4f} | {'ok' if check else ('—' if check is None else 'FAILED')}"
                     f"{f' (+{moved} other tensors changed type)' if moved else ''} | "
                     f"{control_cell(runs.get(f'{parts[0]}/{parts[1]}/control'), pn)} |")
    for key, r in runs.items():
        if not key.startswith("rtn/") or "error" in r:
            continue
        row = r["report"]["weights"][0] if r["report"].get("weights") else None
        if row is None:
            continue
        pn, pa = row.get("naive_perplexity"), row.get("aware_perplexity")
        change = f"{(pa / pn - 1) * 100:+.1f} %" if pn and pa else ""
        lines.append(f"| `sw quantize` RTN (paper) | {key.split('/')[1]}, --z auto | {pn:.4g} | {pa:.4g} (aware) | "
                     f"{change} | n/a | n/a | {r['naive_values'][main_sw]:.4f} | {sw[main_sw]:.4f} (restored) | | |")
    return "\n".join(lines)


# --- driver ----------------------------------------------------------------------------------

def cached(setup: Setup, key: str, compute) -> dict:
    path = setup.work / "results" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', key)}.json"
    path.parent.mkdir(exist_ok=True)
    if path.exists() and key.split("/")[0] not in setup.args.redo:
        return json.loads(path.read_text())
    if setup.args.no_compute:
        return {"error": "not measured in this run"}
    log(f"measuring {key}")
    started = time.time()
    try:
        result = compute()
    except Exception as error:  # a quantizer that fails here is a result: keep its error
        result = {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"[:600]}
        log(f"{key} failed: {result['error']}")
    result["wall_s"] = round(time.time() - started, 1)
    path.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="the float32 HF folder (superweight's GGUF cache)")
    parser.add_argument("--coords", required=True, help="coordinates file from `sw detect`")
    parser.add_argument("--work", default=str(CACHE / "work"))
    parser.add_argument("--limit", type=int, default=2, help="first N wikitext test documents")
    parser.add_argument("--ctx", type=int, default=512, help="context: llama-perplexity -c, sw eval --max-length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="baseline,llama.cpp,llm-compressor,quanto,bitsandbytes,rtn")
    parser.add_argument("--redo", default="", help="comma-separated quantizers to rerun")
    parser.add_argument("--sw-eval-gguf", action="store_true", help="also `sw eval` each quantized GGUF")
    parser.add_argument("--no-compute", action="store_true", help="only assemble the cached results")
    parser.add_argument("--table", help="also write the markdown table to this file")
    parser.add_argument("--json", default=str(ROOT / "docs/results/smollm2-135m/real_quantizers.json"))
    args = parser.parse_args()
    args.redo = args.redo.split(",")
    only = args.only.split(",")
    setup = Setup(args)
    results = {"model_dir": str(setup.model_dir), "coords": str(setup.coords), "limit": args.limit,
               "ctx": args.ctx, "super_weights": setup.original,
               "protected_modules": setup.protected_modules,
               "exports": {k: v.read_text() for k, v in setup.exports.items()}, "runs": {}}
    runs = results["runs"]
    if "baseline" in only:
        runs["baseline/f32 gguf"] = cached(setup, "baseline/f32 gguf", lambda: {
            "size_bytes": setup.f32_gguf().stat().st_size,
            "perplexity": llama_perplexity(setup, setup.f32_gguf())})
        runs["baseline/f32 sw eval"] = cached(setup, "baseline/f32 sw eval", lambda: {
            "size_bytes": folder_size(setup.model_dir), "perplexity": setup.sw_eval(setup.model_dir)})
    for mode in ("naive", "protected"):
        if "llama.cpp" in only:
            for qtype in LLAMA_TYPES:
                key = f"llama.cpp/{qtype}/{mode}"
                runs[key] = cached(setup, key, lambda: measure_llama(setup, qtype, mode))
        if "llm-compressor" in only:
            for scheme in LLMC_SCHEMES:
                key = f"llm-compressor/{scheme[0]}/{mode}"
                runs[key] = cached(setup, key, lambda: measure_llmc(setup, scheme, mode))
        if "quanto" in only:
            for scheme in QUANTO_SCHEMES:
                key = f"quanto/{scheme[0]}/{mode}"
                runs[key] = cached(setup, key, lambda: measure_quanto(setup, scheme, mode))
        if "bitsandbytes" in only:
            for scheme in BNB_SCHEMES:
                key = f"bitsandbytes/{scheme[0]}/{mode}"
                runs[key] = cached(setup, key, lambda: measure_bnb(setup, scheme, mode))
    for qtype in CONTROL_RUNS["llama.cpp"] if "llama.cpp" in only else []:
        key = f"llama.cpp/{qtype}/control"
        runs[key] = cached(setup, key, lambda: measure_llama(setup, qtype, "control"))
    for scheme in [s for s in LLMC_SCHEMES if s[0] in CONTROL_RUNS["llm-compressor"]] if "llm-compressor" in only else []:
        key = f"llm-compressor/{scheme[0]}/control"
        runs[key] = cached(setup, key, lambda: measure_llmc(setup, scheme, "control"))
    for scheme in [s for s in QUANTO_SCHEMES if s[0] in CONTROL_RUNS["quanto"]] if "quanto" in only else []:
        key = f"quanto/{scheme[0]}/control"
        runs[key] = cached(setup, key, lambda: measure_quanto(setup, scheme, "control"))
    if "rtn" in only:
        for bits, block in RTN_SETTINGS:
            key = f"rtn/INT{bits} block{block}"
            runs[key] = cached(setup, key, lambda: measure_rtn(setup, bits, block))
    results["read_back"] = read_back(setup, runs)
    print(table(results))
    if args.table:
        Path(args.table).write_text(table(results) + "\n")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
