"""Benchmark detection on SmolLM2-135M: hook overhead, hook memory vs length, load time.

Prints ratios measured in this one run. Usage:
    .venv/bin/python scripts/bench_detect.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time

import torch

from superweight.detect import DEFAULT_PROMPT, detect, encode_prompt
from superweight.hooks import capture_layer_stats
from superweight.model import load_model


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")

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

    model, tokenizer = loaded.model, loaded.tokenizer
    prompt_ids = encode_prompt(tokenizer, DEFAULT_PROMPT)
    started = time.perf_counter()
    result = detect(model, prompt_ids)
    print(f"detect (default prompt, {len(result.iterations)} passes): {time.perf_counter() - started:.3f} s, "
          f"found {[w.label() for w in result.super_weights]}")

    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    for length in (9, 512, 2048):
        ids = prompt_ids if length == 9 else torch.randint(0, vocab, (1, length), generator=generator)
        plain, hooked = time_forwards(model, ids, args.repeats)
        print(f"forward, {length:5d} tokens: plain {plain * 1e3:8.1f} ms, hooked {hooked * 1e3:8.1f} ms, "
              f"ratio {hooked / plain:.3f} (goal <= 1.10)")

    for length in (16, 2048):
        ids = torch.randint(0, vocab, (1, length), generator=generator)
        plain = peak_added_mib(model, ids, hooked=False)
        hooked = peak_added_mib(model, ids, hooked=True)
        print(f"peak RSS of one forward, {length:5d} tokens: plain {plain:7.1f} MiB, hooked {hooked:7.1f} MiB, "
              f"added by hooks {hooked - plain:+6.1f} MiB (goal: no growth with length)")


if __name__ == "__main__":
    main()
