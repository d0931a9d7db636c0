"""Benchmark data-parallel evaluation: 1 rank x 2 threads against 2 ranks x 1 thread, same work.

Both runs evaluate SmolLM2-135M (CPU, gloo) on the same tasks and documents; the script checks
that every metric is identical and prints the wall-time ratio with its parts: start-up (imports,
process group), model load, scoring, and gather (time inside the collectives, which includes
waiting for the slowest rank). Usage:
    .venv/bin/python scripts/bench_distributed.py [--limit 16] [--task piqa --task arc_easy ...]
    .venv/bin/python scripts/bench_distributed.py --gpus 8   # on a machine with 8 GPUs: 1 vs 8 ranks
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TASKS = ("piqa", "arc_easy", "hellaswag")


def worker(args: argparse.Namespace) -> None:
    """One rank: load, evaluate, report this rank's timings; rank 0 writes everything to --report."""
    started = time.perf_counter()
    from superweight import distributed
    from superweight.measure.evaluate import evaluate
    from superweight.model.load import load_model

    exchange = distributed.exchange
    in_collectives = [0.0]

    def timed_exchange(payload):
        before = time.perf_counter()
        try:
            return exchange(payload)
        finally:
            in_collectives[0] += time.perf_counter() - before

    with distributed.session() as ranks:
        ready = time.perf_counter()
        loaded = load_model(args.model, device=args.device)
        distributed.exchange = timed_exchange  # evaluate's gathers go through it from here on
        evaluated = time.perf_counter()
        result = evaluate(loaded.model, loaded.tokenizer, args.task, data_dir=args.data_dir, limit=args.limit)
        done = time.perf_counter()
        distributed.exchange = exchange
        mine = {"startup_s": ready - started, "load_s": loaded.load_seconds,
                "scoring_s": done - evaluated - in_collectives[0], "gather_s": in_collectives[0]}
        everyone = distributed.exchange(mine)
        if ranks.is_main:
            Path(args.report).write_text(json.dumps({"results": result["results"], "ranks": everyone}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ranks: int, threads: int, args: argparse.Namespace, report: str) -> tuple[float, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    me = [__file__, "--worker", "--report", report, "--model", args.model, "--device", args.device,
          "--limit", str(args.limit), *[x for t in args.task for x in ("--task", t)]]
    if args.data_dir:
        me += ["--data-dir", args.data_dir]
    if ranks == 1:
        command = [sys.executable, *me]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                   "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *me]
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, timeout=3600)
    return time.perf_counter() - started, json.loads(Path(report).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--task", action="append")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--data-dir", default=os.environ.get("SUPERWEIGHT_DATA") or str(REPO.parent / "shared" / "data"))
    parser.add_argument("--gpus", type=int, default=0, help="GPU machine: 1 rank on 1 GPU vs N ranks, one GPU each")
    args = parser.parse_args()
    args.task = args.task or list(DEFAULT_TASKS)
    if args.worker:
        worker(args)
        return
    if args.gpus:
        args.device = "auto"
        layouts = [(1, 1), (args.gpus, 1)]
    else:
        layouts = [(1, 2), (2, 1)]  # the same two cores, as threads of one process or as two ranks
    print(f"model {args.model}, tasks {', '.join(args.task)}, --limit {args.limit}, device {args.device}")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks, threads in layouts:
            wall, report = launch(ranks, threads, args, str(Path(tmp) / f"{ranks}.json"))
            runs.append((ranks, threads, wall, report))
    print(f"{'layout':>18} {'wall s':>8} {'startup':>8} {'load':>6} {'scoring':>8} {'gather':>7}   (slowest rank)")
    for ranks, threads, wall, report in runs:
        parts = {k: max(r[k] for r in report["ranks"]) for k in ("startup_s", "load_s", "scoring_s", "gather_s")}
        print(f"{ranks} rank(s) x {threads} thr {wall:8.1f} {parts['startup_s']:8.1f} {parts['load_s']:6.1f} "
              f"{parts['scoring_s']:8.1f} {parts['gather_s']:7.2f}")
    (_, _, one_wall, one), (_, _, many_wall, many) = runs
    identical = one["results"] == many["results"]
    print(f"metrics identical: {identical}")
    print(json.dumps(one["results"]))
    scoring_one = max(r["scoring_s"] for r in one["ranks"])
    scoring_many = max(r["scoring_s"] + r["gather_s"] for r in many["ranks"])
    print(f"wall-time ratio (1 rank / {runs[1][0]} ranks): {one_wall / many_wall:.2f}x; "
          f"scoring + gather: {scoring_one / scoring_many:.2f}x")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
