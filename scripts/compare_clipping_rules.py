"""How each per-matrix rule for choosing the clipping threshold does on SmolLM2, block size by block size.

    python scripts/compare_clipping_rules.py [--block-size N ...] [--limit DOCS] [--rule RULE ...]

Prints, per block size, the word perplexity (wikitext, first `--limit` documents, 1024-token
windows, INT4) of naive round-to-nearest and of super-weight-aware RTN (super weights
[11, 507, 1229] and [11, 507, 1487] kept exact) with each matrix's threshold picked from
`quantize.AUTO_Z_GRID` by one rule:

  none  never clip (only the super weights are kept exact; the library with z=None)
  max   least largest absolute error: `sw quantize --z auto` itself (the library with z="auto")
  mse   least squared error (the first rule tried)
  act   least squared error weighted by each input channel's mean square activation on the
        detection prompt (one forward pass; a data-dependent rule, measured for comparison only)

The figures are in docs/results/smollm2-135m/quantize.md. Offline: the shipped GGUF and
../shared/data (or --data-dir).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from superweight.edit import quantize  # noqa: E402
from superweight.coords import SuperWeight  # noqa: E402
from superweight.find.detect import DEFAULT_PROMPT, encode_prompt  # noqa: E402
from superweight.measure.evaluate import evaluate  # noqa: E402
from superweight.model.load import load_model  # noqa: E402

RULES = ("none", "max", "mse", "act")
LIBRARY_Z = {"none": None, "max": "auto"}  # rules the library runs: no clipping, and --z auto
SUPER_WEIGHTS = [SuperWeight(layer=11, row=507, col=1229), SuperWeight(layer=11, row=507, col=1487)]


def input_mean_squares(model, tokenizer) -> dict[str, torch.Tensor]:
    """Per decoder Linear: the mean over the detection prompt's tokens of its input squared, per channel."""
    found: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            def keep(module, args, name=name):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                found[name + ".weight"] = (x ** 2).mean(0)
            hooks.append(module.register_forward_pre_hook(keep))
    try:
        with torch.no_grad():
            model(encode_prompt(tokenizer, DEFAULT_PROMPT))
    finally:
        for hook in hooks:
            hook.remove()
    return found


def rule_error(rule: str, quantized: torch.Tensor, original: torch.Tensor, weight: torch.Tensor | None) -> float:
    error = quantized.double() - original.double()
    if rule == "max":
        return float(error.abs().max())
    if rule == "mse":
        return float((error ** 2).sum())
    return float(((error ** 2) * weight.double()).sum())  # act: [out, in] x [in]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-size", type=int, action="append")
    parser.add_argument("--limit", type=int, default=1, help="wikitext documents (default 1)")
    parser.add_argument("--rule", action="append", choices=RULES)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    args = parser.parse_args()
    rules = args.rule or list(RULES)
    loaded = load_model(None, device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    blocks = args.block_size or quantize.default_block_sizes(model)
    options = dict(data_dir=args.data_dir, limit=args.limit, max_length=1024)

    def perplexity() -> float:
        return evaluate(model, tokenizer, ["wikitext"], **options)["results"]["wikitext"]["word_perplexity"]

    activations = input_mean_squares(model, tokenizer) if "act" in rules else {}
    targets = quantize.weight_targets(model, SUPER_WEIGHTS)
    print(json.dumps({"unquantized": round(perplexity(), 3), "limit": args.limit, "bits": 4}), flush=True)
    for block in blocks:
        started = time.perf_counter()
        with quantize.quantized_weights(model, 4, block):
            row: dict[str, float | int] = {"block_size": block, "naive": round(perplexity(), 3)}
        for rule in rules:
            if rule in LIBRARY_Z:  # the shipped code path itself
                with quantize.quantized_weights(model, 4, block, SUPER_WEIGHTS, z=LIBRARY_Z[rule]) as record:
                    row[rule], row[f"{rule}_clipped"] = round(perplexity(), 3), record.clipped
                continue
            chosen = []
            for target in targets:
                for expert, matrix in quantize._matrices(target):
                    positions = target.super_positions.get(expert, [])
                    best, best_error = None, math.inf
                    for z in reversed(quantize.AUTO_Z_GRID):  # a tie: least clipping
                        candidate, _ = quantize._quantize_aware(matrix, 4, block, z, positions)
                        error = rule_error(rule, candidate, matrix, activations.get(target.name))
                        if error < best_error:
                            best, best_error = z, error
                    chosen.append(best)
            record = quantize.WeightQuantizationRecord(4, block, rule, SUPER_WEIGHTS, [t.name for t in targets])
            try:
                with torch.no_grad():
                    matrices = ((target, expert, matrix) for target in targets
                                for expert, matrix in quantize._matrices(target))
                    for target in targets:
                        record.originals.append((target.param, target.param.detach().to("cpu", copy=True)))
                    for z, (target, expert, matrix) in zip(chosen, matrices):
                        quantized, n = quantize._quantize_aware(matrix, 4, block, z,
                                                                target.super_positions.get(expert, []))
                        matrix.copy_(quantized)
                        record.clipped += n
                row[rule], row[f"{rule}_clipped"] = round(perplexity(), 3), record.clipped
            finally:
                quantize.restore_weights(record)
        row["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
