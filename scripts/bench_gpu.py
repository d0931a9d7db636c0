"""GPU benchmark: detection and evaluation against the physical limit, per dtype.

Detection is one forward pass per iteration over a handful of tokens, so its floor is reading
every weight once: weight bytes / memory bandwidth. The bandwidth is measured in this run (a
device-to-device copy, bytes read + written / time), so the printed ratios need no outside number.

Prints one JSON document (and writes it with --out). Usage, on a CUDA machine:
    python scripts/bench_gpu.py --model SmolLM2-135M-Instruct.Q4_1.gguf --data ../shared/data \
        [--tasks wikitext,piqa] [--synthetic-7b] [--out gpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from superweight.find.detect import DEFAULT_PROMPT, detect, encode_prompt
from superweight.measure.evaluate import evaluate
from superweight.find.hooks import capture_layer_stats
from superweight.model.load import load_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu only to check the script itself
DTYPES = ("float32", "bfloat16", "float16")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(gib: int = 2, repeats: int = 20) -> float:
    """Bytes per second of a device-to-device copy, reads and writes both counted."""
    source = torch.empty(gib << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / repeats
    del source, target
    torch.cuda.empty_cache()
    return 2 * (gib << 30) / seconds


def weight_bytes(model) -> int:
    """Bytes a forward pass must read: every distinct parameter once (tied embeddings once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn` after two warm-ups, synchronised around each call."""
    for _ in range(2):
        fn()
    samples = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def forward_times(model, input_ids, repeats: int) -> dict:
    def plain():
        with torch.inference_mode():
            model(input_ids=input_ids, use_cache=False)

    def hooked():
        with torch.inference_mode(), capture_layer_stats(model):
            model(input_ids=input_ids, use_cache=False)

    return {"plain_forward_s": timed(plain, repeats), "hooked_forward_s": timed(hooked, repeats)}


def bench_detection(model, input_ids, bandwidth: float, repeats: int) -> dict:
    result = forward_times(model, input_ids, repeats)
    detection = detect(model, input_ids)
    result["detect_s"] = timed(lambda: detect(model, input_ids), repeats)
    result["iterations"] = len(detection.iterations)
    result["super_weights"] = [w.label() for w in detection.super_weights]
    result["weight_bytes"] = weight_bytes(model)
    result["limit_s"] = result["weight_bytes"] / bandwidth
    result["hooked_forward_over_limit"] = result["hooked_forward_s"] / result["limit_s"]
    result["detect_per_iteration_over_limit"] = result["detect_s"] / result["iterations"] / result["limit_s"]
    return result


def bench_model(path: str, dtype: str, tasks: list[str], data_dir: str, bandwidth: float, repeats: int) -> dict:
    started = time.perf_counter()
    loaded = load_model(path, dtype=dtype, device=DEVICE)
    out = {"dtype": dtype, "load_s": time.perf_counter() - started, "from_cache": loaded.from_cache}
    input_ids = encode_prompt(loaded.tokenizer, DEFAULT_PROMPT).to(DEVICE)
    out["tokens"] = int(input_ids.shape[-1])
    out.update(bench_detection(loaded.model, input_ids, bandwidth, repeats))
    out["eval"] = {}
    for task in tasks:
        sync()
        started = time.perf_counter()
        result = evaluate(loaded.model, loaded.tokenizer, [task], data_dir=data_dir)
        sync()
        metrics = result["results"][task]
        out["eval"][task] = {"seconds": time.perf_counter() - started,
                             "n": result["n_samples"][task]["effective"],
                             **{k: v for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k}}
        print(json.dumps({dtype: {task: out["eval"][task]}}), flush=True)
    if torch.cuda.is_available():
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        del loaded
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def bench_synthetic_7b(bandwidth: float, repeats: int) -> dict:
    """A randomly initialised Llama-7B-shaped model (bfloat16): how close a pass is to the limit
    when the weights, not kernel launches, dominate. Random weights have no super weight."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    input_ids = torch.randint(0, 32000, (1, 10), device="cuda")
    out = {"model": "random Llama-7B shape, bfloat16"}
    out.update(bench_detection(model, input_ids, bandwidth, repeats))
    del model
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="SmolLM2 GGUF (or any model); omit to run only --synthetic-7b")
    parser.add_argument("--data")
    parser.add_argument("--tasks", default="wikitext")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--synthetic-7b", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    bandwidth = copy_bandwidth() if DEVICE == "cuda" else float("nan")
    document = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
                "copy_bandwidth_gb_s": bandwidth / 1e9, "models": []}
    print(json.dumps({"copy_bandwidth_gb_s": document["copy_bandwidth_gb_s"]}), flush=True)
    for dtype in args.dtypes.split(",") if args.model else ():
        document["models"].append(bench_model(args.model, dtype, tasks, args.data, bandwidth, args.repeats))
        print(json.dumps({k: v for k, v in document["models"][-1].items() if k != "eval"}), flush=True)
    if args.synthetic_7b:
        document["synthetic_7b"] = bench_synthetic_7b(bandwidth, args.repeats)
    text = json.dumps(document, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
