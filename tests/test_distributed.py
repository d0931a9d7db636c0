"""Data-parallel runs: the work split, and real multi-process runs on 127.0.0.1 (gloo on CPU) whose
numbers must equal one process's, whose failures end every rank, and where rank 0 alone writes.

Each multi-process run is bounded (a subprocess timeout) and small: this machine has 2 cores.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DATA_DIR, REPO
from test_cli import invoke

from superweight import distributed
from superweight.errors import UsageError

RUN_TIMEOUT_S = 300  # per multi-process run; the runs below take ~10-60 s on an idle machine
TINY = ("--data-dir", DATA_DIR, "--max-length", "64", "-q")


# ----------------------------------------------------------------------------- in one process


def test_work_is_balanced_by_tokens_not_by_count():
    # one long batch and nine short ones: a split by count (5 + 5) would leave rank 1 waiting
    costs = [100, 10, 10, 10, 10, 10, 10, 10, 10, 10]
    owned = distributed.assign(costs, 2)
    assert owned == [[0], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    costs = [7, 5, 4, 4, 3, 3, 2]
    assert [sum(costs[i] for i in items) for items in distributed.assign(costs, 3)] == [10, 10, 8]
    owned = distributed.assign([5, 1, 4, 2, 3], 3)
    assert sorted(i for items in owned for i in items) == [0, 1, 2, 3, 4]  # each once
    assert distributed.share([3, 2, 1]) == [0, 1, 2]  # one process does everything


def test_each_rank_scores_only_its_share_of_the_batches(tiny_llama_dir, monkeypatch):
    """Two ranks simulated in one process: disjoint shares that cover every request, each scored as
    in one process."""
    from superweight.measure.requests import Encoder, build_requests
    from superweight.measure.scoring import Scorer
    from superweight.model.load import load_model
    from superweight.measure.tasks import load_task

    loaded = load_model(str(tiny_llama_dir), device="cpu")
    built = build_requests(load_task("piqa", DATA_DIR, 5), Encoder(loaded.tokenizer), 64)
    scorer = Scorer(loaded.model, batch_size=1)
    alone = scorer.score(built.requests, built.groups)
    shares = []

    def exchange(mine):  # what the other rank would send: the rest
        shares.append(set(mine))
        return [mine, {i: s for i, s in enumerate(alone) if i not in mine}]

    monkeypatch.setattr(distributed, "exchange", exchange)
    monkeypatch.setattr(distributed, "check_peers", lambda: None)
    monkeypatch.setattr(distributed.Progress, "add", lambda self, n: 0)
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "_current", distributed.Ranks(rank, 2, rank, 2))
        assert scorer.score(built.requests, built.groups) == alone
    assert all(shares) and not shares[0] & shares[1] and shares[0] | shares[1] == set(range(len(alone)))


def test_launcher_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.launched() == distributed.Ranks()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    ranks = distributed.launched()
    assert (ranks.rank, ranks.world_size, ranks.local_rank, ranks.local_world_size, ranks.is_main) == (3, 4, 1, 2, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(UsageError, match="inconsistent"):
        distributed.launched()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(UsageError, match="not integers"):
        distributed.launched()


@pytest.mark.parametrize("variable", ["SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])
def test_copies_started_without_torchrun_are_refused_before_writing(tiny_llama_dir, tmp_path, monkeypatch, variable):
    """`srun -n 2 sw eval ...` (or mpirun) starts two whole jobs that each write --output: one line instead."""
    from test_cli import assert_one_line_error

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "2")
    output = tmp_path / "results.json"
    result = invoke("eval", tiny_llama_dir, "--task", "wikitext", "--limit", "1", *TINY, "--output", output)
    assert_one_line_error(result, f"{variable}=2", "without torchrun", "srun --ntasks-per-node 1 torchrun")
    assert result.exit_code == 2 and not output.exists()
    monkeypatch.setenv(variable, "1")  # one task of an allocation (srun -n 1, or a batch script) runs as one process
    assert distributed.launched() == distributed.Ranks()
    monkeypatch.setenv("WORLD_SIZE", "2")  # one torchrun per node under srun: torchrun's ranks count
    monkeypatch.setenv("RANK", "1")
    assert distributed.launched() == distributed.Ranks(1, 2, 0, 2)


@pytest.mark.parametrize("cuda", [True, False])
def test_session_starts_nccl_on_cuda_and_gloo_on_cpu(monkeypatch, cuda):
    """The process group a launched rank starts (torch.distributed itself stood in for: this
    machine has no GPU), the node-local GPU NCCL binds it to, and the group gone afterwards."""
    import torch
    import torch.distributed as dist

    calls = []
    for name, value in (("WORLD_SIZE", "8"), ("RANK", "5"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "4")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "rendezvous", lambda url, timeout: iter([(dist.HashStore(), 5, 8)]))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **options: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    monkeypatch.setattr(distributed, "_all_gather_objects", lambda payload: [payload] * 8)
    with distributed.session() as ranks:
        assert distributed.current() == ranks and ranks.rank == 5
    expected = [("set_device", 1), ("init", "nccl")] if cuda else [("init", "gloo")]
    assert calls == expected + [("destroy",)]
    assert distributed.current() == distributed.Ranks()  # one process again


def test_a_rank_exits_only_once_gloo_has_let_go_of_the_exchanged_tensors(tmp_path):
    """Gloo's threads release a collective's tensors after the caller has its result; one still
    doing so when the interpreter shuts down aborts the process (SIGABRT, about one two-rank run
    in a hundred before the wait). A one-rank gloo group runs the same threads."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert distributed._all_gather_objects({"scores": [1.5, 2]}) == [{"scores": [1.5, 2]}]
        handed = list(distributed._handed)
        assert len(handed) == 4  # the size, the sizes gathered, the padded bytes, the bytes gathered
        distributed._wait_for_release()
        assert [r() for r in handed] == [None] * 4 and distributed._handed == []
    finally:
        dist.destroy_process_group()


def test_each_rank_gets_its_own_gpus():
    two_per_node = [distributed.Ranks(rank, 4, rank % 2, 2) for rank in range(4)]
    assert [distributed.gpu_share(r, device_count=8) for r in two_per_node] == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2
    assert distributed.gpu_share(distributed.Ranks(1, 2, 1, 2), device_count=3) == [1]
    with pytest.raises(UsageError, match="2 ranks on this node but 1 GPU"):
        distributed.gpu_share(distributed.Ranks(1, 2, 1, 2), device_count=1)


def test_rank_placement_on_a_node_of_8_gpus(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(distributed, "_current", distributed.Ranks(3, 4, 1, 2))  # 2 nodes x 2 ranks
    assert distributed.rank_device("auto") == distributed.rank_device("cuda") == "cuda:1"
    assert distributed.rank_device("cuda:0") == "cuda:0" and distributed.rank_device("cpu") == "cpu"
    # --device-map auto: GPUs 4-7 of the node, GPU keys of --max-memory counted from the rank's first
    assert distributed.rank_max_memory({0: "20GiB", 1: "30GiB", "cpu": "64GiB"}) == {4: "20GiB", 5: "30GiB",
                                                                                     "cpu": "64GiB"}
    with pytest.raises(UsageError, match="each rank has 4 GPU"):
        distributed.rank_max_memory({4: "20GiB"})


# ----------------------------------------------------------------------------- many processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=str(REPO / "src"), SUPERWEIGHT_CACHE=str(cache), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _torchrun(*args, env: dict, nproc: int, timeout: float = RUN_TIMEOUT_S, program=("-m", "superweight"), **launch):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if not launch:
        launcher += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    for option, value in launch.items():
        launcher += [f"--{option.replace('_', '-')}", str(value)]
    return subprocess.Popen([*launcher, *map(str, program), *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"a distributed run did not finish within {timeout} s: {err[-2000:]}")
    return process.returncode, out, err


def _ok(process: subprocess.Popen) -> dict:
    code, out, err = _finish(process)
    assert code == 0, err[-3000:]
    return json.loads(out)


@pytest.mark.integration
def test_two_ranks_on_smollm2_compare_equals_one_process(gguf_cache, tmp_path):
    """Table 1 (original, zeroed, zeroed + activation restored, random control) on 2 ranks."""
    args = ("eval", "--coord", "11,507,1229", "--compare", "--task", "piqa", "--task", "lambada_openai",
            "--limit", "2", "--max-length", "64", "--batch-size", "1", "--data-dir", DATA_DIR, "--json", "-q")
    two = _torchrun(*args, env=_env(gguf_cache), nproc=2)
    one = invoke(*args)
    assert one.exit_code == 0, one.output
    expected, got = ({run["name"]: run for run in document["configurations"]}
                     for document in (json.loads(one.stdout), _ok(two)))  # stdout: a first GGUF load draws a bar on stderr
    assert list(got) == list(expected) and len(got) == 4
    for name in expected:
        # Accuracies exactly; perplexities and their errors to 1e-4: torchrun runs each rank with OMP_NUM_THREADS=1, the
        # single process with the machine's threads, and a matmul summed in another order moved
        # lambada's perplexity by 3e-6 relative (279.5426 vs 279.5435) and, zeroed, its bootstrap error by
        # 2.4e-5 (7.2078e6 vs 7.2080e6) at stop 18.
        for task, metrics in expected[name]["results"].items():
            for metric, value in metrics.items():
                close = pytest.approx(value, rel=1e-4) if isinstance(value, float) else value
                assert got[name]["results"][task][metric] == close, (name, task, metric)
        assert got[name]["config"]["ranks"] == 2


@pytest.mark.integration
def test_detect_and_ablate_of_a_gguf_on_two_ranks_run_on_rank_0_alone(gguf_cache, tmp_path):
    """Rank 0 alone detects and saves; its GGUF load must not take turns with ranks that are not
    loading (their last collective answered its first, and rank 0 then lost contact with them)."""
    coords, saved = tmp_path / "c.yaml", tmp_path / "ablated"
    detect = ("detect", "--out", coords, "--json", "-q")
    code, out, err = _finish(_torchrun(*detect, env=_env(gguf_cache), nproc=2))
    assert code == 0, err[-3000:]
    found = json.loads(out)  # one document: rank 0's alone
    one = invoke("detect", "--out", tmp_path / "one.yaml", "--json", "-q")
    assert one.exit_code == 0, one.output

    def coordinates(document):  # the activations differ in their last digits: 1 thread vs the machine's
        return [[w["layer"], w["row"], w["col"]] for w in document["super_weights"]]

    assert [11, 507, 1229] in coordinates(found) and coordinates(found) == coordinates(json.loads(one.output))
    assert coords.is_file()
    code, out, err = _finish(_torchrun("ablate", "--coords", coords, "--out", saved, "--json", "-q",
                                       env=_env(gguf_cache), nproc=2))
    assert code == 0, err[-3000:]
    assert json.loads(out)["out"] == str(saved) and (saved / "superweight_ablation.json").is_file()


def test_three_ranks_study_on_uneven_documents_equals_one_process(tiny_llama_dir, tmp_path):
    """4 documents per task on 3 ranks; rank 0 alone writes the report and the evaluation cache."""
    args = ["study", tiny_llama_dir, "--coord", "1,3,5", "--task", "piqa", "--task", "lambada_openai", "--limit", "4",
            "--grid", "0,2", "--top", "5", "--batch-size", "1", *TINY, "--json"]
    three = _torchrun(*args, "--out", tmp_path / "three", env=_env(tmp_path / "cache3"), nproc=3)
    os.environ["SUPERWEIGHT_CACHE"], saved = str(tmp_path / "cache1"), os.environ.get("SUPERWEIGHT_CACHE")
    try:
        one = invoke(*args, "--out", tmp_path / "one")
    finally:
        os.environ.pop("SUPERWEIGHT_CACHE") if saved is None else os.environ.update(SUPERWEIGHT_CACHE=saved)
    assert one.exit_code == 0, one.output
    expected, got = json.loads(one.output), _ok(three)
    assert got["table"] == expected["table"] and got["sweep"] == expected["sweep"]
    assert got["meta"]["evaluations"] == expected["meta"]["evaluations"]
    cached = sorted(p.name for p in (tmp_path / "cache3" / "evaluations").iterdir())
    assert cached == sorted(p.name for p in (tmp_path / "cache1" / "evaluations").iterdir())
    assert not [p for p in (tmp_path / "cache3" / "evaluations").iterdir() if p.name.startswith(".")]


def test_two_nodes_by_c10d_rendezvous_equal_one_process(tiny_llama_dir, tmp_path):
    """Two torchrun agents (--nnodes 2) meeting at 127.0.0.1: the quantize sweep's evaluations."""
    args = ["quantize", tiny_llama_dir, "--coord", "1,3,5", "--block-size", "64", "--task", "wikitext", "--limit", "2",
            *TINY, "--json"]
    rendezvous = dict(nnodes=2, rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}",
                      rdzv_id="superweight-test")
    env = _env(tmp_path / "cache")
    nodes = [_torchrun(*args, env=env, nproc=1, node_rank=n, **rendezvous) for n in (0, 1)]
    one = invoke(*args)
    assert one.exit_code == 0, one.output
    codes = [_finish(node) for node in nodes]
    assert [c[0] for c in codes] == [0, 0], [c[2][-2000:] for c in codes]
    printed = [json.loads(out) for _, out, _ in codes if out.strip()]
    assert len(printed) == 1  # rank 0's node alone prints
    expected = json.loads(one.output)["weights"]
    assert expected[0]["naive_perplexity"] > 1 and printed[0]["weights"] == expected  # wikitext's, exactly


def _launch_ranks(args, env: dict, world_size: int) -> list[subprocess.Popen]:
    """The ranks started directly with the environment a launcher sets, to see each one's exit."""
    port = str(_free_port())
    return [subprocess.Popen([sys.executable, "-m", "superweight", *map(str, args)],
                             env={**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
                                  "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                                  "LOCAL_WORLD_SIZE": str(world_size)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank in range(world_size)]


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_a_failing_rank_ends_every_rank_and_nothing_is_written(tiny_llama_dir, tmp_path):
    output = tmp_path / "results.json"
    args = ["eval", tiny_llama_dir, "--task", "piqa", "--task", "wikitext", "--limit", "6", *TINY,
            "--output", output, "--batch-size", "1"]
    started = time.monotonic()
    ranks = _launch_ranks(args, _env(tmp_path / "cache", SUPERWEIGHT_TEST_FAIL_RANK="1"), 2)
    (code0, out0, err0), (code1, out1, err1) = [_finish(rank, timeout=120) for rank in ranks]
    assert code0 != 0 and code1 != 0
    assert _error_lines(err0) == ["error: rank 1 of 2 failed: RuntimeError: injected failure "
                                  "(SUPERWEIGHT_TEST_FAIL_RANK=1)"], err0
    assert _error_lines(err1) == [] and not out0.strip() and not out1.strip()
    assert not output.exists() and not list(tmp_path.glob(".results.json*"))
    assert time.monotonic() - started < 120


def test_a_hanging_rank_times_out(tiny_llama_dir, tmp_path):
    output = tmp_path / "results.json"
    args = ["eval", tiny_llama_dir, "--task", "piqa", "--limit", "4", *TINY, "--output", output]
    env = _env(tmp_path / "cache", SUPERWEIGHT_TEST_FAIL_RANK="1:hang", SUPERWEIGHT_DIST_TIMEOUT="10")
    main, hanging = _launch_ranks(args, env, 2)
    try:
        code, out, err = _finish(main, timeout=120)
        assert code != 0
        lines = _error_lines(err)
        assert len(lines) == 1 and lines[0].startswith("error: rank 0 lost contact") and "10 s" in lines[0], err
        assert not output.exists()
    finally:
        hanging.kill()  # what the launcher does once rank 0 has exited
        hanging.communicate()


def test_when_rank_0_hangs_another_rank_says_why(tiny_llama_dir, tmp_path):
    """Rank 0, which prints every error, is the one that hangs: the first other rank to give up on it
    says so (before, nobody did, and the launcher's stop read 'interrupted')."""
    output = tmp_path / "results.json"
    args = ["eval", tiny_llama_dir, "--task", "piqa", "--limit", "4", *TINY, "--output", output]
    env = _env(tmp_path / "cache", SUPERWEIGHT_TEST_FAIL_RANK="0:hang", SUPERWEIGHT_DIST_TIMEOUT="5")
    hanging, other = _launch_ranks(args, env, 2)
    try:
        code, out, err = _finish(other, timeout=150)  # 5 s, then EXIT_WAIT_S for rank 0 to say it
        assert code != 0 and not out.strip()
        lines = _error_lines(err)
        assert len(lines) == 1 and lines[0].startswith("error: rank 1 lost contact") and "5 s" in lines[0], err
        assert not output.exists()
    finally:
        hanging.kill()  # what the launcher does once a rank has exited
        hanging.communicate()


RANK_0_ALONE = """import sys, time
from superweight import distributed

SLOW_S = float(sys.argv[1])  # longer than SUPERWEIGHT_DIST_TIMEOUT
with distributed.session() as ranks:
    detected = distributed.main_alone(lambda: time.sleep(SLOW_S) or "detected")()  # sw detect, ablate, export
    harness = distributed.on_main(lambda: time.sleep(SLOW_S) or "harness")  # --harness, study's verification
    if distributed.main_proceeds():
        time.sleep(SLOW_S)  # rank 0 writes (a command's --out, or the script's own files)
        print(detected, harness, flush=True)
    else:
        print(detected is None, harness, flush=True)
    seen = distributed.exchange(ranks.rank)  # the script goes on: the next command's first collective
    if distributed.main_proceeds():
        time.sleep(SLOW_S)  # rank 0 writes while the others are at the session's end
        print(seen, flush=True)
"""


def test_work_rank_0_does_alone_may_outlast_the_timeout(tmp_path):
    """SUPERWEIGHT_DIST_TIMEOUT bounds the gaps between collectives: a detection, lm-eval's tasks or a
    save that rank 0 does alone take as long as they take in one process, and so does what it writes
    after `main_proceeds`, also when the script goes on to another collective. Before, the other ranks
    waited in a collective, timed out, and the launcher stopped rank 0 mid-work ('interrupted')."""
    script = tmp_path / "alone.py"
    script.write_text(RANK_0_ALONE)
    port = str(_free_port())
    ranks = [subprocess.Popen([sys.executable, str(script), "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**_env(tmp_path / "cache", SUPERWEIGHT_DIST_TIMEOUT="1"),
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
                                              "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"})
             for rank in range(2)]
    (code0, out0, err0), (code1, out1, err1) = [_finish(rank, timeout=120) for rank in ranks]
    assert (code0, code1) == (0, 0), (err0[-2000:], err1[-2000:])
    assert (out0, out1) == ("detected harness\n[0, 1]\n", "True harness\n")


TWO_SESSIONS = """import os, sys, time
from superweight import distributed
from superweight.errors import RankFailed

def say(line):  # one write per line: two ranks share the pipe, and print's pieces interleaved
    os.write(1, (line + "\\n").encode())

try:
    with distributed.session() as ranks:
        if ranks.rank == 1:
            raise RuntimeError("the first session fails on rank 1")
        distributed.exchange(None)
except (RankFailed, RuntimeError) as error:  # rank 0 is told of rank 1's own error
    say(f"first: {error}")
with distributed.session():  # longer than SUPERWEIGHT_DIST_TIMEOUT: the others wait in the store
    say("second: " + distributed.on_main(lambda: time.sleep(float(sys.argv[1])) or "done"))
"""


def test_a_script_that_caught_a_failure_starts_another_session(tmp_path):
    """torchrun's store outlives a session: the second one must not read the first one's failure (its
    ranks then stopped waiting for rank 0 and timed out), nor rank 1 wait for rank 0 to exit (30 s,
    and rank 0 timed out waiting for it in the second session)."""
    script = tmp_path / "two_sessions.py"
    script.write_text(TWO_SESSIONS)
    code, out, err = _finish(_torchrun(13, env=_env(tmp_path / "cache", SUPERWEIGHT_DIST_TIMEOUT="10"), nproc=2,
                                       program=[script]), timeout=120)
    assert code == 0, err[-3000:]
    assert sorted(out.splitlines()) == ["first: rank 1 of 2 failed: RuntimeError: the first session fails on rank 1",
                                        "first: the first session fails on rank 1", "second: done", "second: done"]


def test_generate_decodes_on_rank_0_alone(tiny_llama_dir, monkeypatch):
    """On rank 1 of 2 the continuations come from rank 0 (here: a stand-in), not from decoding."""
    import superweight as api
    from superweight.measure import generate

    from_main = []

    def fake_exchange(payload):  # what all_gather_object returns on rank 1: rank 0's payload first
        if isinstance(payload, bool):  # who works while the others wait: rank 0
            return [True, payload]
        main = from_main.pop(0) if from_main else None
        return [main, payload]

    def no_decoding(*args, **kwargs):
        raise AssertionError("rank 1 decoded")

    monkeypatch.setattr(distributed, "_current", distributed.Ranks(rank=1, world_size=2, local_rank=1,
                                                                   local_world_size=2))
    monkeypatch.setattr(distributed, "exchange", fake_exchange)
    monkeypatch.setattr(distributed, "_wait_for", lambda done: None)  # rank 0 (not here) is done at once
    monkeypatch.setattr(generate, "generate", no_decoding)
    assert api.generate_text(str(tiny_llama_dir), coord=["1,3,5"], max_new_tokens=2) is None


def test_two_ranks_generate_print_once_what_one_process_prints(tiny_llama_dir, tmp_path):
    args = ("generate", tiny_llama_dir, "--coord", "1,3,5", "--max-new-tokens", "3", "--json", "-q")
    code, out, err = _finish(_torchrun(*args, env=_env(tmp_path / "cache"), nproc=2))
    assert code == 0, err[-3000:]
    one = invoke(*args)
    assert one.exit_code == 0, one.output
    assert json.loads(out) == json.loads(one.output)  # one JSON document: rank 0's alone


STUB_QUANTIZER = """import json, os, shutil, sys
job = json.load(open(sys.argv[2]))  # argv: quantizer_worker.py, job.json
with open(os.environ["SW_STUB_QUANTIZER_LOG"], "a") as log:
    log.write(json.dumps({"rank": os.environ.get("RANK"), "job": job["job"]}) + "\\n")
shutil.copytree(job["model_dir"], job["float_out"])  # 'dequantized': the float model as it is
json.dump({"size_bytes": 1, "values": {}, "unquantized_linear": sorted(job["keep"])}, open(job["result"], "w"))
"""


def test_two_ranks_run_a_real_quantizer_once_on_rank_0_alone(tiny_llama_dir, tmp_path, monkeypatch):
    """`sw quantize --quantizer` under torchrun: the quantizer (a stand-in Python that logs who ran
    it) runs once per mode, on rank 0, and one document is printed, as one process prints it."""
    stub, python = tmp_path / "stub.py", tmp_path / "python"
    stub.write_text(STUB_QUANTIZER)
    python.write_text(f'#!/bin/sh\nif [ "$1" = "-c" ]; then exit 0; fi\nexec "{sys.executable}" "{stub}" "$@"\n')
    python.chmod(0o755)  # the import probe finds the 'package'; a job runs the stand-in
    args = ("quantize", tiny_llama_dir, "--quantizer", "quanto", "--quantizer-path", python, "--coord", "1,3,5",
            "--task", "wikitext", "--limit", "1", *TINY, "--json")
    two_log, one_log = tmp_path / "two.log", tmp_path / "one.log"
    code, out, err = _finish(_torchrun(*args, env=_env(tmp_path / "cache", SW_STUB_QUANTIZER_LOG=str(two_log)),
                                       nproc=2), timeout=180)
    assert code == 0, err[-3000:]
    assert [json.loads(line) for line in two_log.read_text().splitlines()] == [{"rank": "0", "job": "quanto"}] * 2
    monkeypatch.setenv("SW_STUB_QUANTIZER_LOG", str(one_log))
    one = invoke(*args)
    assert one.exit_code == 0, one.output
    expected, got = json.loads(one.output), json.loads(out)  # one JSON document: rank 0's alone
    assert list(got["runs"]) == list(expected["runs"]) == ["unquantized", "naive", "protected"]
    for mode, run in expected["runs"].items():
        assert got["runs"][mode]["results"]["wikitext"]["word_perplexity"] == pytest.approx(
            run["results"]["wikitext"]["word_perplexity"], rel=1e-4)


def test_two_ranks_with_harness_tasks_equal_one_process(tiny_llama_dir, harness_tasks, tmp_path):
    """lm-eval's evaluator returns its results on LOCAL_RANK 0 alone under torchrun (None on rank 1,
    which then failed): rank 0 runs it and the other ranks receive its results."""
    args = ("eval", tiny_llama_dir, "--harness", "sw_piqa", "--harness-include", harness_tasks, "--task", "wikitext",
            "--limit", "3", "--batch-size", "2", *TINY, "--json")
    got = _ok(_torchrun(*args, env=_env(tmp_path / "cache"), nproc=2))
    one = invoke(*args)
    assert one.exit_code == 0, one.output
    [got], [expected] = got["configurations"], json.loads(one.output)["configurations"]
    assert set(got["results"]) == {"sw_piqa", "wikitext"} and got["config"]["ranks"] == 2
    assert got["results"] == expected["results"] and got["harness"] == expected["harness"]


def test_accelerate_launch_two_processes_equal_one_process(tiny_llama_dir, tmp_path):
    """`accelerate launch --multi_gpu` starts its workers through torch's elastic launcher; on a
    machine without GPUs they are CPU ranks on gloo, which is how this is tested here."""
    args = ("eval", tiny_llama_dir, "--task", "piqa", "--task", "wikitext", "--limit", "5", *TINY, "--json")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port())]
    process = subprocess.Popen([*launcher, "-m", "superweight", *map(str, args)], env=_env(tmp_path / "cache"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got = _ok(process)
    one = invoke(*args)
    assert one.exit_code == 0, one.output
    expected = json.loads(one.output)
    [got], [expected] = got["configurations"], expected["configurations"]
    assert got["config"]["ranks"] == 2 and expected["config"]["ranks"] == 1
    assert got["results"] == expected["results"]  # exactly, stderr and perplexity too


def test_help_and_version_print_once_under_a_launcher(tmp_path):
    """Parsed before any command runs: the other ranks print neither, rank 0 prints both."""
    for args in (["--version"], ["eval", "--help"]):
        (code0, out0, _), (code1, out1, _) = [_finish(rank, timeout=60)
                                              for rank in _launch_ranks(args, _env(tmp_path / "cache"), 2)]
        assert (code0, code1) == (0, 0)
        assert ("sw (superweight)" in out0 or "--task" in out0) and out1 == ""
