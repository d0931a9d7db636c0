"""How far bfloat16 and float16 land from float32 on tests/test_half_precision.py's runs: the
largest gap in mean negative log-likelihood (|log ppl - log ppl_float32|, nats) over every
perplexity-like metric of `sw eval --compare` (the seven multiple-choice tasks and wikitext), on the
test's tiny byte-level Llama with a planted super weight, at the test's --limit and --max-length.
Prints each gap beside the tolerance the test asserts (README, "Half precision"). Usage:
  .venv/bin/python scripts/half_precision_gap.py
"""
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

from conftest import PLANTED, byte_tokenizer  # noqa: E402
from synthetic import plant_super_weight, tiny_model  # noqa: E402
from test_half_precision import LIMIT, MAX_LENGTH, NLL_ATOL, run_every_path  # noqa: E402


def byte_llama(path: Path) -> Path:
    """conftest's byte_llama_dir, built outside pytest."""
    tokenizer = byte_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=int(MAX_LENGTH))
    plant_super_weight(model, *map(int, PLANTED.split(",")))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def largest_gap(got: dict, reference: dict) -> float:
    gap = 0.0
    for name in ("eval_choice", "eval_wikitext"):
        for mine, theirs in zip(got[name]["configurations"], reference[name]["configurations"], strict=True):
            for task, metrics in theirs["results"].items():
                for metric, value in metrics.items():
                    if "perplexity" in metric and isinstance(value, float) and value > 0:
                        gap = max(gap, abs(math.log(mine["results"][task][metric]) - math.log(value)))
    return gap


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        model = byte_llama(Path(work) / "model")
        runs = {dtype: run_every_path(model, dtype, ["--device", "cpu"], Path(work) / dtype, None,
                                      stream=False, quantize=False)
                for dtype in ("float32", "bfloat16", "float16")}
    print(f"--limit {LIMIT}, --max-length {MAX_LENGTH}, torch {torch.__version__}")
    for dtype in ("bfloat16", "float16"):
        print(f"{dtype}: largest NLL gap to float32 {largest_gap(runs[dtype], runs['float32']):.4f} nats "
              f"(tolerance {NLL_ATOL[dtype]})")


if __name__ == "__main__":
    main()
