"""Benchmark detection on SmolLM2-135M: hook overhead, hook memory vs length, load time, and
layer streaming (`sw detect --stream`) against a full load: peak memory and time.

Prints ratios measured in this one run. Usage:
    .venv/bin/python scripts/bench_detect.py [--repeats 5]
    .venv/bin/python scripts/bench_detect.py --synthetic 1b   # streamed vs full only, on a random 1.17B Llama
    .venv/bin/python scripts/bench_detect.py --forward-only   # detection and hook overhead only (cached model)
    .venv/bin/python scripts/bench_detect.py --forward-only --lengths 9 --repeats 41   # the short prompt only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from superweight.find.detect import DEFAULT_PROMPT, detect, encode_prompt
from superweight.find import hooks
from superweight.find.hooks import capture_layer_stats
from superweight.model.load import load_model
from superweight.find.stream import detect_streamed, open_checkpoint


def peak_rss_reset() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, the peak resident set size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def forward(model, input_ids, hooked: bool) -> None:
    with torch.inference_mode():
        if hooked:
            with capture_layer_stats(model):
                model(input_ids=input_ids, use_cache=False)
        else:
            model(input_ids=input_ids, use_cache=False)


# A short pass takes ~60 ms on the CPU and the hooks add ~5: fewer repeats than this read the
# ratio to within +-0.02 only (9 repeats: 1.101 and 1.106 where 41 read 1.078-1.090).
SHORT_PASS_REPEATS = 41


def time_forwards(model, input_ids, repeats: int) -> tuple[float, float]:
    """Median seconds of (plain, hooked) forwards, interleaved so machine load affects both alike."""
    forward(model, input_ids, hooked=False)  # warm-up
    plain, hooked = [], []
    for _ in range(repeats):
        for is_hooked, times in ((False, plain), (True, hooked)):
            started = time.perf_counter()
            forward(model, input_ids, is_hooked)
            times.append(time.perf_counter() - started)
    return statistics.median(plain), statistics.median(hooked)


def peak_added_mib(model, input_ids, hooked: bool, repeats: int = 3) -> float:
    """Peak RSS during one forward minus RSS before it (min over repeats: allocator noise only adds)."""
    samples = []
    for _ in range(repeats):
        gc.collect()
        before = rss_kib("VmRSS")
        peak_rss_reset()
        forward(model, input_ids, hooked)
        samples.append((rss_kib("VmHWM") - before) / 1024)
    return min(samples)


def detect_once(mode: str, directory: str) -> dict:
    """In a fresh process: load + detect (`full`) or streamed detect (`stream`) of a safetensors dir.

    Peak RSS (VmHWM) is of the whole process, imports included; `imports_kib` is what the process
    held before reading any weight (libraries, config, tokenizer, model code), so both the whole
    peak and the part above it (weights + activations) can be compared.
    """
    import importlib

    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # What both modes pay before reading any weight, whatever the model's size: the libraries,
    # the config and tokenizer, the family's model code. Taken out of the baseline, what is left
    # is the memory the weights and activations cost.
    config = AutoConfig.from_pretrained(directory)
    AutoTokenizer.from_pretrained(directory)
    importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    assert config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    imports_kib = rss_kib("VmHWM")
    started = time.perf_counter()
    if mode == "full":
        loaded = load_model(directory, device="cpu")
        result = detect(loaded.model, encode_prompt(loaded.tokenizer, DEFAULT_PROMPT))
    else:
        checkpoint = open_checkpoint(directory)
        result = detect_streamed(checkpoint, encode_prompt(checkpoint.tokenizer, DEFAULT_PROMPT), device="cpu")
    return {"seconds": time.perf_counter() - started, "peak_kib": rss_kib("VmHWM"), "imports_kib": imports_kib,
            "found": [w.label() for w in result.super_weights]}


def compare_streamed(directory: str, repeats: int) -> None:
    """Streamed vs full detection, each run in its own process so VmHWM starts clean; interleaved."""
    runs: dict[str, list[dict]] = {"full": [], "stream": []}
    for _ in range(repeats):
        for mode in runs:
            child = subprocess.run([sys.executable, __file__, "--child", mode, directory],
                                   capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(child.stdout.strip().splitlines()[-1]))

    def summary(mode: str) -> dict:  # min memory (allocator noise only adds), median time
        return {"peak_kib": min(r["peak_kib"] for r in runs[mode]),
                "imports_kib": min(r["imports_kib"] for r in runs[mode]),
                "seconds": statistics.median(r["seconds"] for r in runs[mode]), "found": runs[mode][0]["found"]}

    full, stream = summary("full"), summary("stream")
    assert stream["found"] == full["found"], (stream["found"], full["found"])
    above = {name: (run["peak_kib"] - run["imports_kib"]) / 1024 for name, run in (("full", full), ("stream", stream))}
    print(f"streamed vs full load + detect ({repeats} fresh processes each, found {stream['found']} in both):")
    print(f"  peak RSS: full {full['peak_kib'] / 1024:.0f} MiB, streamed {stream['peak_kib'] / 1024:.0f} MiB, "
          f"ratio {stream['peak_kib'] / full['peak_kib']:.3f} (goal <= 0.25)")
    print(f"  peak RSS above libraries + config + tokenizer + model code: full {above['full']:.0f} MiB, "
          f"streamed {above['stream']:.0f} MiB, ratio {above['stream'] / above['full']:.3f}")
    print(f"  time (load + detect, median): full {full['seconds']:.2f} s, streamed {stream['seconds']:.2f} s, "
          f"ratio {stream['seconds'] / full['seconds']:.2f}")


# Random Llama checkpoints where the weights, not the libraries, dominate memory (TinyLlama's shape).
SYNTHETIC_SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
}


def write_synthetic_checkpoint(size: str, tokenizer, directory: str) -> int:
    """A random float32 Llama of the given shape, sharded safetensors + tokenizer; returns its parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, **SYNTHETIC_SHAPES[size])
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory, max_shard_size="1GB")
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--synthetic", choices=sorted(SYNTHETIC_SHAPES), help="only streamed vs full, on a random "
                        "Llama of this size (SmolLM2's tokenizer); needs ~6 GB of disk and ~12 GB of memory")
    parser.add_argument("--forward-only", action="store_true", help="skip the load and streaming comparisons: "
                        "detection and hook overhead on the model as cached")
    parser.add_argument("--lengths", default="9,512,2048", help="prompt lengths of the hooked / plain forward "
                        "ratios, comma-separated (9: the default detection prompt)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a shared machine")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--peak-rss", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(detect_once(*args.child)))
        return
    if args.peak_rss:
        hook_memory()
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    if args.synthetic:
        with tempfile.TemporaryDirectory() as directory:
            tokenizer = load_model("smollm2-135m", device="cpu").tokenizer
            n_params = write_synthetic_checkpoint(args.synthetic, tokenizer, directory)
            print(f"random Llama, {n_params / 1e9:.2f} B parameters, float32, sharded safetensors")
            compare_streamed(directory, args.repeats)
        return

    if args.forward_only:
        loaded = load_model("smollm2-135m", device="cpu")
    else:
        loaded = load_and_stream(args.repeats)
    measure_forwards(loaded, args.repeats, tuple(int(n) for n in args.lengths.split(",")))
    hook_memory_in_child()


def load_and_stream(repeats: int):
    """First vs cached load, then streamed vs full detection; returns the cached load."""
    users_cache = os.environ.get("SUPERWEIGHT_CACHE")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["SUPERWEIGHT_CACHE"] = cache
        first = load_model("smollm2-135m", device="cpu")
        first_seconds = first.load_seconds
        del first
        gc.collect()
        loaded = load_model("smollm2-135m", device="cpu")
        print(f"load: first (GGUF dequantize + cache write) {first_seconds:.2f} s; "
              f"second (safetensors cache) {loaded.load_seconds:.2f} s; "
              f"speed-up {first_seconds / loaded.load_seconds:.1f}x (goal >= 5x)")
        compare_streamed(loaded.model.name_or_path, repeats)
    if users_cache is None:  # what comes later (hook_memory_in_child) loads from the user's cache
        del os.environ["SUPERWEIGHT_CACHE"]
    else:
        os.environ["SUPERWEIGHT_CACHE"] = users_cache
    return loaded


def measure_forwards(loaded, repeats: int, lengths: tuple[int, ...] = (9, 512, 2048)) -> None:
    """Detection time, hooked / plain forward ratios, and the hooks' memory."""
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt_ids = encode_prompt(tokenizer, DEFAULT_PROMPT)
    started = time.perf_counter()
    result = detect(model, prompt_ids)
    print(f"detect (default prompt, {len(result.iterations)} passes): {time.perf_counter() - started:.3f} s, "
          f"found {[w.label() for w in result.super_weights]}")

    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    for length in lengths:
        ids = prompt_ids if length == prompt_ids.shape[-1] else torch.randint(0, vocab, (1, length), generator=generator)
        n = max(repeats, SHORT_PASS_REPEATS) if length <= 64 else repeats
        plain, hooked = time_forwards(model, ids, n)
        print(f"forward, {length:5d} tokens: plain {plain * 1e3:8.1f} ms, hooked {hooked * 1e3:8.1f} ms, "
              f"ratio {hooked / plain:.3f} (goal <= 1.10; median of {n})")


# glibc raises its mmap threshold as big blocks are freed and then serves them from a heap it keeps:
# peak RSS then swings by tens of MiB from run to run. With a fixed low threshold every block over
# 16 KiB is mapped on its own and unmapped when freed, so RSS follows what is live.
MEASURED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "16384"}


def hook_memory_in_child() -> None:
    """What the hooks add to one forward's peak RSS, short and long, measured in a child process
    with MEASURED_MALLOC (the timings above keep the default allocator)."""
    subprocess.run([sys.executable, __file__, "--peak-rss"], env={**os.environ, **MEASURED_MALLOC}, check=True)


def held_until_the_end(model, ids) -> int:
    """Bytes of activations the hooks of a short pass keep until its last layer, counted: what RSS
    cannot show at a few MiB (the allocator serves small blocks from memory it already holds)."""
    held = []
    reduce_layers = hooks._locate_layers

    def counting(probes):
        tensors = {t.data_ptr(): t for p in probes for t in (p.down_input, p.down_output, p.write, p.residual_in)
                   if t is not None}
        held.append(sum(t.nbytes for t in tensors.values()))
        reduce_layers(probes)

    hooks._locate_layers = counting
    try:
        forward(model, ids, hooked=True)
    finally:
        hooks._locate_layers = reduce_layers
    return max(held)


def hook_memory() -> None:
    model = load_model("smollm2-135m", device="cpu").model
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, hooks.DEFER_MAX_TOKENS), generator=generator)
    print(f"held by the hooks of one {hooks.DEFER_MAX_TOKENS}-token forward (the longest reduced at its end): "
          f"{held_until_the_end(model, ids) / 2**20:.1f} MiB, counted")
    ids = torch.randint(0, model.config.vocab_size, (1, 2048), generator=generator)
    plain = peak_added_mib(model, ids, hooked=False)
    hooked = peak_added_mib(model, ids, hooked=True)
    print(f"peak RSS of one forward,  2048 tokens: plain {plain:7.1f} MiB, hooked {hooked:7.1f} MiB, "
          f"added by hooks {hooked - plain:+6.1f} MiB (goal: no growth with length; "
          f"{MEASURED_MALLOC['MALLOC_MMAP_THRESHOLD_']}-byte mmap threshold)")


if __name__ == "__main__":
    main()
