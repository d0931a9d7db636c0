"""Time the load's NaN/inf check (integrity.check_finite_weights: one float32 sum per weight)
against isfinite per weight (a mask as large as each weight), on SmolLM2 from the cache, its pages
already read; prints both medians of 5 and their ratio, measured in this one run. Usage:
  .venv/bin/python scripts/bench_finite_check.py
"""
import statistics
import time

import torch

import superweight
from superweight.model.integrity import check_finite_weights


def median_seconds(work, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    model = superweight.load("smollm2-135m").model
    weights = list(model.parameters())
    check_finite_weights(model)  # reads the cached weights' pages once: both below read from memory
    sums = median_seconds(lambda: check_finite_weights(model))
    masks = median_seconds(lambda: all(bool(torch.isfinite(w).all()) for w in weights))
    print(f"{sum(w.numel() for w in weights) / 1e6:.1f}M values, {torch.get_num_threads()} threads: "
          f"float32 sums {sums * 1e3:.1f} ms, isfinite masks {masks * 1e3:.1f} ms, ratio {sums / masks:.3f}")


if __name__ == "__main__":
    main()
