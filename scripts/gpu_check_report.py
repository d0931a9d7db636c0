"""The parts of scripts/gpu_check.sh that are easier in Python than in bash.

    gpu_check_report.py summary WORK OUT      # $OUT/gpu_check.json from the steps' records; exit 1 if one failed
    gpu_check_report.py nccl-probe            # under torchrun: start the process group, all-gather, stop
    gpu_check_report.py same-results A B      # two `sw eval --json` outputs: the same numbers?

The summary reads WORK/steps.tsv (name, status, seconds, budget, one line per step) and the JSON
each step wrote under OUT, and pulls out the figures the issue sets goals for: hooked / plain
forward (<= 1.10), detection against the weight-read limit (<= 2x), every task's speed against
lm-eval's HF backend at equal numbers (>= 1.5x). A goal not met is reported, not a failure: the
check fails on errors, wrong numbers and timeouts.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from pathlib import Path

GOALS = {"hooked_over_plain_max": 1.10, "detect_pass_over_limit_max": 2.0, "eval_speed_ratio_min": 1.5}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def bench_figures(document: dict) -> dict:
    figures: dict = {"device": document.get("device"), "copy_bandwidth_gb_s": document.get("copy_bandwidth_gb_s")}
    for model in document.get("models", []):
        dtype = model["dtype"]
        figures[dtype] = {
            "super_weights": model.get("super_weights"),
            "detect_s": model.get("detect_s"),
            "detect_pass_over_limit": model.get("detect_per_iteration_over_limit"),
            "hooked_over_plain": {n: r["hooked_over_plain"] for n, r in model.get("hook_overhead", {}).items()},
            "eval": model.get("eval"),
        }
    if "synthetic_7b" in document:
        synthetic = document["synthetic_7b"]
        figures["synthetic_7b"] = {k: synthetic.get(k) for k in ("hooked_over_plain", "hooked_forward_over_limit",
                                                                   "detect_per_iteration_over_limit")}
    return figures


def numbers_equal(ours: float, theirs: float, metric: str) -> bool:
    """Accuracies identical; perplexity-like numbers to 1e-5 relative (the GPU's summation order)."""
    if metric.startswith("acc"):
        return ours == theirs
    return math.isclose(ours, theirs, rel_tol=1e-5)


def compare_figures(document: dict) -> tuple[dict, list[str]]:
    figures, unequal = {}, []
    for task, run in document.items():
        metrics = {m: (run["ours"][m], run["lm_eval"][m]) for m in run["lm_eval"]
                   if m in run["ours"] and "stderr" not in m and isinstance(run["ours"][m], (int, float))}
        unequal += [f"{task} {m}: ours {a!r}, lm-eval {b!r}" for m, (a, b) in metrics.items()
                    if not numbers_equal(a, b, m)]
        figures[task] = {"docs": run["docs"], "metrics": metrics,
                         "speed_ratio": statistics.median(run["lm_eval_seconds"]) / statistics.median(run["our_seconds"]),
                         "our_seconds": run["our_seconds"], "lm_eval_seconds": run["lm_eval_seconds"]}
    return figures, unequal


def goals(figures: dict) -> dict:
    """Each goal: the worst measured value and whether it is met (None where nothing was measured)."""
    bench = figures.get("bench_gpu") or {}
    ratios = [r for d in ("float32", "bfloat16", "float16") for r in (bench.get(d) or {}).get("hooked_over_plain", {}).values()]
    limits = [v for d in ("float32", "bfloat16", "float16", "synthetic_7b")
              for v in [(bench.get(d) or {}).get("detect_pass_over_limit")
                        or (bench.get(d) or {}).get("detect_per_iteration_over_limit")] if v is not None]
    speeds = [t["speed_ratio"] for t in (figures.get("compare_lm_eval") or {}).values()]

    def verdict(values, limit, worst):
        if not values:
            return {"worst": None, "met": None}
        value = worst(values)
        return {"worst": value, "met": value <= limit if worst is max else value >= limit}

    return {"hooked_over_plain <= 1.10": verdict(ratios, GOALS["hooked_over_plain_max"], max),
            "detection pass <= 2x weight-read limit": verdict(limits, GOALS["detect_pass_over_limit_max"], max),
            "every task >= 1.5x lm-eval HF": verdict(speeds, GOALS["eval_speed_ratio_min"], min)}


def summary(work: Path, out: Path) -> int:
    steps = []
    for line in (work / "steps.tsv").read_text().splitlines():
        name, status, seconds, budget = line.split("\t")
        steps.append({"name": name, "status": status, "seconds": float(seconds), "budget_s": int(budget)})
    figures: dict = {}
    bench = _read_json(out / "bench_gpu.json")
    if bench is not None:
        figures["bench_gpu"] = bench_figures(bench)
    compare = _read_json(out / "compare_lm_eval.json")
    if compare is not None:
        figures["compare_lm_eval"], unequal = compare_figures(compare)
        if unequal:
            figures["compare_lm_eval_unequal"] = unequal
            for step in steps:
                if step["name"] == "compare_lm_eval" and step["status"] == "ok":
                    step["status"] = "failed: numbers differ from lm-eval's"
    torchrun = _read_json(work / "torchrun.json")
    if torchrun is not None:
        figures["torchrun_eval"] = torchrun
    not_run = [s["name"] for s in steps if s["status"].startswith("not run")]  # left out on purpose (GPU_CHECK_ONLY)
    failed = [s["name"] for s in steps if s["status"] != "ok" and s["name"] not in not_run]
    document = {"ok": not failed, "failed": failed, "not_run": not_run,
                "dry_run": os.environ.get("GPU_CHECK_DRY_RUN") == "1",
                "commit": os.environ.get("GPU_CHECK_COMMIT"), "seconds": sum(s["seconds"] for s in steps),
                "steps": steps, "goals": goals(figures), "figures": figures}
    text = json.dumps(document, indent=2)
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(text + "\n")
    tmp.replace(out / "gpu_check.json")
    for step in steps:
        print(f"{step['name']:>16}  {step['status']:<40} {step['seconds']:7.1f} s (budget {step['budget_s']} s)")
    for goal, result in document["goals"].items():
        print(f"goal {goal}: {result}")
    verdict = ("FAILED: " + ", ".join(failed) if failed
               else "the steps asked for passed (not run: " + ", ".join(not_run) + ")" if not_run
               else "all steps passed")
    print(f"gpu_check: {verdict}; figures in {out / 'gpu_check.json'}")
    return 0 if not failed else 1


def nccl_probe() -> int:
    """One collective on the backend `sw` would use (NCCL on a GPU, gloo on the CPU). `sw` itself
    starts no process group for a one-process job, so this is what checks the backend works here."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=120))
    try:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {"rank": dist.get_rank()})
        tensor = torch.ones(4, device="cuda" if backend == "nccl" else "cpu")
        dist.all_reduce(tensor)
        ok = gathered == [{"rank": r} for r in range(dist.get_world_size())] and tensor.sum().item() == 4 * dist.get_world_size()
    finally:
        dist.destroy_process_group()
    print(json.dumps({"backend": backend, "world_size": len(gathered), "ok": ok}))
    return 0 if ok else 1


def same_results(first: Path, second: Path) -> int:
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    same = a["results"] == b["results"] if "results" in a else a == b
    print(json.dumps({"same_results": same}))
    return 0 if same else 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["summary"] and len(argv) == 3:
        return summary(Path(argv[1]), Path(argv[2]))
    if argv == ["nccl-probe"]:
        return nccl_probe()
    if argv[:1] == ["same-results"] and len(argv) == 3:
        return same_results(Path(argv[1]), Path(argv[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
