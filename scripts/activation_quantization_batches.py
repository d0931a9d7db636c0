"""Whether `sw quantize --activations` gives the same scores whatever the batch size, on SmolLM2.

    python scripts/activation_quantization_batches.py [--wikitext-limit DOCS] [--piqa-limit DOCS]
        [--max-length N] [--batch-size B ...]

Prints, per batch size (default 1, auto, 8), the headline metrics of wikitext and piqa (their
first 4 and 20 documents by default; `--max-length`, default 256) with the down projections' input
fake-quantized to INT8, naive and with the super activation held out (super weight [11, 507, 1229],
the one `sw quantize` acts on), then the largest difference from batch size 1 per method. A quantization
scale shared by the rows of a batch, or one that reads padding, makes those differences non-zero.

Offline: the shipped GGUF and ../shared/data (or --data-dir). The figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from superweight.coords import SuperWeight  # noqa: E402
from superweight.measure.quantized import activation_quantization_compare  # noqa: E402
from superweight.model.load import load_model  # noqa: E402

SUPER_WEIGHTS = [SuperWeight(layer=11, row=507, col=1229)]  # what `sw quantize` detects and acts on (--select super)
HEADLINE = {"wikitext": ("word_perplexity",), "piqa": ("acc", "acc_norm")}


def batch_size(text: str) -> int | str:
    return text if text == "auto" else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wikitext-limit", type=int, default=4, help="documents (each some 20 windows of 256)")
    parser.add_argument("--piqa-limit", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=batch_size, action="append")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    args = parser.parse_args()
    loaded = load_model(None, device="cpu")
    rows = {}
    for size in args.batch_size or [1, "auto", 8]:
        started = time.perf_counter()
        rows[size] = {"naive": {}, "aware": {}}
        held_out = 0
        for task, metrics in HEADLINE.items():
            row, = activation_quantization_compare(loaded.model, loaded.tokenizer, SUPER_WEIGHTS, 8, [task],
                                                   data_dir=args.data_dir, limit=getattr(args, f"{task}_limit"),
                                                   max_length=args.max_length, batch_size=size)
            for method in rows[size]:
                rows[size][method].update({f"{task}/{metric}": row[method][task][metric] for metric in metrics})
            held_out += row["held_out"]
        print(json.dumps({"batch_size": size, **rows[size], "held_out": held_out,
                          "seconds": round(time.perf_counter() - started, 1)}), flush=True)
    first, *others = rows
    for size in others:
        print(json.dumps({"batch_size": size, "largest_difference_from": first, **{
            method: max(abs(value - rows[first][method][key]) for key, value in rows[size][method].items())
            for method in ("naive", "aware")}}))


if __name__ == "__main__":
    main()
