"""Data-parallel runs on torch.distributed, launched by `torchrun`, `accelerate launch` or Slurm.

The launcher sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; `session` starts the process
group from them (NCCL on CUDA, gloo on CPU) and stops it on every exit path. Without a launcher
every function here is a no-op and the code runs as one process.

One primitive moves data: `exchange`, an all-gather of one object per rank. Every collective is
that same operation, so a rank that fails can join whichever one the others reach next, carrying
its error instead of its data; every rank then raises `RankFailed`, rank 0 names the failing rank,
and nobody waits for data that will never come. A failing rank also sets a flag in the process
group's store, which `check_peers` (called after each scoring batch) reads, so the others stop
within one batch rather than at the end of their share. A rank that hangs or dies is given up on
after the process group's timeout (`SUPERWEIGHT_DIST_TIMEOUT`, seconds, default 1800). Work that rank 0
does alone (a detection, a save, lm-eval's tasks, its writing after `main_proceeds`) has no such bound,
as in one process: the others wait for it in the store (`_wait_for`), not in a collective that would time
out and end the job under rank 0's feet. Each session keeps to its own part of the launcher's store,
which outlives it: a script that caught `RankFailed` may start another. Before the
group is destroyed, a gloo rank waits until gloo's threads have let go of the tensors its
collectives were given: one still releasing them as the interpreter exits aborts the process.

Work is split by `share`: each rank takes the items (scoring batches) that the greedy
longest-first assignment gives it, balanced by cost (tokens), and the same batches are scored as
in one process, so every number is the same.
"""

from __future__ import annotations

import atexit
import functools
import os
import pickle
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import torch

from .errors import RankFailed, SuperweightError, UsageError, first_line

T = TypeVar("T")

TIMEOUT_ENV = "SUPERWEIGHT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800  # torch's own default: long enough for one rank's share of a large task
EXIT_WAIT_S = 30  # how long the other ranks wait for rank 0 to report a failure before they exit
RELEASE_WAIT_S = 5.0  # how long a rank waits at exit for gloo's threads to let go of its tensors
FAIL_ENV = "SUPERWEIGHT_TEST_FAIL_RANK"  # tests only: "R" raises on rank R while scoring, "R:hang" hangs
# A process manager that starts N copies itself, without torch's launcher, and where each copy reads
# N: every copy would run the whole job as one process and write the same outputs.
UNLAUNCHED_COPIES = {"SLURM_STEP_NUM_TASKS": "srun", "OMPI_COMM_WORLD_SIZE": "mpirun",
                     "PMI_SIZE": "mpiexec"}  # PMI_SIZE: MPICH's and Intel MPI's mpiexec
_FAILED_KEY = "superweight/failed"
_MAIN_EXITED_KEY = "superweight/main-exited"
_SPEAKER_KEY = "superweight/speaker"
_SPEAKS_ATTR = "superweight_speaks_for_main"
POLL_S = 0.2  # how often a rank waiting for rank 0's work alone looks in the store


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the job (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_current = Ranks()
_rounds = 0  # scoring rounds so far; names each round's progress counter in the store
_waits = 0  # stretches of work some ranks did while the others waited; names each one's counter
_sessions = 0  # sessions started by this process (the same on every rank): names the part of the store each one uses
_main_leaving: Any = None  # rank 0, after a failed session: that session's store, where the others wait for it
_behind_main: str | None = None  # after main_proceeds: the counter rank 0 adds 1 to at its next collective
_handed: list[weakref.ref] = []  # the tensors given to collectives that their threads may still hold


def launched() -> Ranks:
    """The ranks the launcher's environment describes (one process when it sets none)."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    values = {name: os.environ.get(name) for name in names}
    if values["WORLD_SIZE"] is None:
        _refuse_unlaunched_copies()
        return Ranks()
    try:
        world_size = int(values["WORLD_SIZE"])
        rank = int(values["RANK"] or 0)
        local_rank = int(values["LOCAL_RANK"] or 0)
        # accelerate and torchrun set LOCAL_WORLD_SIZE; a launcher that does not runs one node's worth
        local_world_size = int(values["LOCAL_WORLD_SIZE"] or world_size)
    except ValueError:
        raise UsageError("the launcher's RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE are not integers: "
                         + ", ".join(f"{k}={v}" for k, v in values.items() if v is not None)) from None
    if not (0 <= rank < world_size and 0 <= local_rank < local_world_size <= world_size):
        raise UsageError(f"inconsistent launcher environment: RANK={rank} WORLD_SIZE={world_size} "
                         f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world_size}")
    return Ranks(rank, world_size, local_rank, local_world_size)


def _refuse_unlaunched_copies() -> None:
    for variable, manager in UNLAUNCHED_COPIES.items():
        copies = os.environ.get(variable, "")
        if copies.isdigit() and int(copies) > 1:
            raise UsageError(f"{manager} started {copies} copies of this command ({variable}={copies}) without "
                             "torchrun: each would run the whole job and write the same outputs; start one torchrun "
                             "per node (`srun --ntasks-per-node 1 torchrun --nproc-per-node N -m superweight ...`; "
                             "README: Many GPUs and many machines) or a single task")


def current() -> Ranks:
    """The ranks of the running session (rank 0 of 1 outside one)."""
    return _current


def is_main() -> bool:
    return _current.is_main


def timeout_seconds() -> float:
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"{TIMEOUT_ENV} must be a positive number of seconds, got '{text}'")
    return value


# ----------------------------------------------------------------------------- the session


@contextmanager
def session() -> Iterator[Ranks]:
    """Run the body as one rank of the launched job: the process group exists inside, and is gone
    after, however the body ends. On error, every rank learns which rank failed and why."""
    global _current, _rounds, _waits, _sessions, _behind_main
    ranks = launched()
    if ranks.world_size == 1:
        yield ranks
        return
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(_local_gpu(ranks))  # where NCCL keeps this rank's buffers
    timeout = timedelta(seconds=timeout_seconds())
    _main_left()  # before the rendezvous: the other ranks of a failed session come to it only after this
    # The launcher's store outlives a session (torchrun's agent holds it; a store rank 0 hosts is shared by
    # the sessions of its process): each session, torch's keys and ours, keeps to its own part of it, so that
    # a script that caught RankFailed starts another one without reading the last one's keys.
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    _sessions += 1
    dist.init_process_group(backend, store=dist.PrefixStore(f"superweight/session-{_sessions}", store), rank=rank,
                            world_size=world_size, timeout=timeout)
    _current, _rounds, _waits = ranks, 0, 0
    interrupted = False
    try:
        with _done_by(ranks.is_main) as done:  # rank 0 may still be writing what the others computed
            yield ranks
        _wait_for(done)
        exchange(None)  # every rank finished: nobody leaves while another still needs it
    except KeyboardInterrupt:  # Ctrl-C or the launcher's SIGTERM: every rank is being stopped anyway
        interrupted = True
        raise
    except BaseException as error:
        if not isinstance(error, RankFailed):
            _report(error)
        if not _exit_after_main(ranks) and _first_to_speak():
            try:
                setattr(error, _SPEAKS_ATTR, True)
            except AttributeError:  # an exception type without a __dict__: nobody prints it
                pass
        raise
    finally:
        _current, _behind_main = Ranks(), None
        if backend == "gloo" and not interrupted:  # a stopped collective may hold its tensors until killed
            _wait_for_release()
        dist.destroy_process_group()


def _describe(error: BaseException) -> str:
    if isinstance(error, SuperweightError):
        return str(error)
    return f"{type(error).__name__}: {first_line(error)}"


@dataclass(frozen=True)
class _Failure:
    rank: int
    message: str
    exit_code: int


def _report(error: BaseException) -> None:
    """Tell the other ranks this one failed: a flag they poll, and its error in the collective
    they are in or reach next (which returns once they all have)."""
    failure = _Failure(_current.rank, _describe(error), getattr(error, "exit_code", 1))
    try:
        _store().set(_FAILED_KEY, str(_current.rank))
        _all_gather_objects(failure)
    except Exception:  # a peer or the store is already gone: the timeout or the launcher ends the rest
        pass


def _exit_after_main(ranks: Ranks) -> bool:
    """A launcher stops every rank as soon as one exits non-zero: the others leave only after rank 0
    (which prints the error) is on its way out, or after EXIT_WAIT_S. False when rank 0 did not get
    there: it hung (the launcher then stops it without a word about why) or died."""
    try:
        global _main_leaving
        store = _store()
        if ranks.is_main:
            _main_leaving = store
            atexit.register(_set_quietly, store, _MAIN_EXITED_KEY)
            return True
        # polled: a store.wait that times out prints two lines of torch's own warnings
        deadline = time.monotonic() + EXIT_WAIT_S
        while not store.check([_MAIN_EXITED_KEY]):
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)
        return True
    except Exception:  # rank 0's process (and a store it hosted) is gone
        return ranks.is_main


def _first_to_speak() -> bool:
    """One rank prints the error that rank 0 could not: the first to ask."""
    try:
        return int(_store().add(_SPEAKER_KEY, 1)) == 1
    except Exception:  # no store to agree in: each says it
        return True


def speaks_for_main(error: BaseException) -> bool:
    """Whether this rank, not rank 0, prints `error`: rank 0 hung or died before it could."""
    return getattr(error, _SPEAKS_ATTR, False)


def _main_left() -> None:
    """Rank 0 starts another session (a script caught the last one's error): the other ranks of the
    failed one, still waiting for rank 0 to exit, may go on (and join it)."""
    global _main_leaving
    if _main_leaving is not None:
        _set_quietly(_main_leaving, _MAIN_EXITED_KEY)
        _main_leaving = None


def _set_quietly(store, key: str) -> None:
    try:
        store.set(key, "1")
    except Exception:
        pass


def _store():
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


# ----------------------------------------------------------------------------- collectives


def exchange(payload: Any) -> list[Any]:
    """Every rank's `payload`, in rank order, on every rank (one process: `[payload]`).

    Raises `RankFailed` when a rank sent its failure instead, or when a rank did not answer
    within the timeout or lost its connection.
    """
    if _current.world_size == 1:
        return [payload]
    if _behind_main is not None:
        _catch_up_with_main()
    try:
        gathered = _all_gather_objects(payload)
    except Exception as e:  # DistBackendError and friends: a timeout, or a peer that died
        raise RankFailed(f"rank {_current.rank} lost contact with the other ranks (a rank hung past "
                         f"{TIMEOUT_ENV}={timeout_seconds():g} s, or was killed): {first_line(e)}") from None
    failures = [g for g in gathered if isinstance(g, _Failure)]
    if failures:
        first = failures[0]
        error = RankFailed(f"rank {first.rank} of {_current.world_size} failed: {first.message}")
        error.exit_code = first.exit_code
        raise error
    return gathered


def _all_gather_objects(payload: Any) -> list[Any]:
    """torch's `all_gather_object`, with every tensor it hands to the process group remembered.

    Gloo's worker threads release a collective's tensors after the caller has its result, and
    releasing a tensor Python made takes the GIL: a thread still doing so when the interpreter shuts
    down aborts the whole process ("terminate called without an active exception", about one
    two-rank run in a hundred here). `_wait_for_release` waits for these tensors before exit.
    """
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    data = torch.frombuffer(bytearray(pickle.dumps(payload)), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.long, device=device)
    sizes = [torch.empty_like(size) for _ in range(_current.world_size)]
    dist.all_gather(sizes, size)
    lengths = [int(s) for s in sizes]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data.to(device)
    gathered = [torch.empty_like(padded) for _ in range(_current.world_size)]
    dist.all_gather(gathered, padded)
    _handed[:] = [r for r in _handed if r() is not None] + [weakref.ref(t) for t in (size, *sizes, padded, *gathered)]
    # the same trust as torch's own object collectives: every peer is a rank of this one job
    return [pickle.loads(t[:n].cpu().numpy().tobytes()) for t, n in zip(gathered, lengths)]


def _wait_for_release(limit_s: float = RELEASE_WAIT_S) -> None:
    """Until the process group's threads have let go of every tensor a collective was given (or
    `limit_s` passed): sleeping hands them the GIL they need for it."""
    deadline = time.monotonic() + limit_s
    while any(r() is not None for r in _handed) and time.monotonic() < deadline:
        time.sleep(0.001)
    _handed.clear()


def on_main(compute: Callable[[], T]) -> T:
    """`compute()` run once, on rank 0; its result on every rank."""
    if _current.world_size == 1:
        return compute()
    result = None
    with _done_by(_current.is_main) as done:
        if _current.is_main:
            result = compute()
    _wait_for(done)
    return exchange(result)[0]


@contextmanager
def _done_by(working: bool) -> Iterator[tuple[str, int]]:
    """A stretch of work that the ranks where `working` is true do while the others wait for it:
    yields (the store counter each of them adds 1 to as it ends, however it ends; how many do it).
    Every rank enters it at the same point of the job, so the counters' names agree."""
    if _current.world_size == 1:
        yield "", 0
        return
    key = _new_done_key()
    workers = sum(exchange(bool(working)))  # also: every rank has reached this point
    try:
        yield key, workers
    finally:
        if working:
            _count_done(key)


def _new_done_key() -> str:
    """The counter of a new stretch of work alone: every rank starts the same ones in the same order."""
    global _waits
    _waits += 1
    return f"superweight/done/{_waits}"


def _count_done(key: str) -> None:
    try:
        _store().add(key, 1)
    except Exception:  # the store is gone: the waiting ranks learn it in _wait_for
        pass


def _wait_for(done: tuple[str, int]) -> None:
    """Until every rank of a `_done_by` stretch has ended it, or a rank has failed: however long that
    takes (a detection or a save on rank 0 takes what it takes in one process), but never in a
    collective, which would time out after SUPERWEIGHT_DIST_TIMEOUT and stop the job."""
    key, workers = done
    if workers == 0:
        return
    try:
        store = _store()
        while int(store.add(key, 0)) < workers and not store.check([_FAILED_KEY]):
            time.sleep(POLL_S)
    except Exception as e:  # the store's host (rank 0 when started by hand, else the launcher) is gone
        raise RankFailed(f"rank {_current.rank} lost contact with the other ranks (a rank was killed): "
                         f"{first_line(e)}") from None


def main_proceeds() -> bool:
    """Every rank reports in; True on rank 0 only, which goes on alone to write and print. Called before
    any output is written, so a failure anywhere leaves nothing written. The other ranks wait for rank 0
    in the store at their next collective (or the session's end): what it does alone takes what it takes."""
    global _behind_main
    exchange(None)
    if _current.world_size > 1:
        _behind_main = _new_done_key()
    return _current.is_main


def _catch_up_with_main() -> None:
    """The first collective after `main_proceeds`: rank 0, there, is done with its work alone."""
    global _behind_main
    key, _behind_main = _behind_main, None
    if _current.is_main:
        _count_done(key)
    else:
        _wait_for((key, 1))


@contextmanager
def alone() -> Iterator[None]:
    """The body runs as one process on this rank by itself: work that rank 0 does while the other
    ranks wait at the session's end (a detection, a save) must not enter a collective that they
    never join (a GGUF load's turns, a scoring split), which would pair with their last one."""
    global _current
    ranks, _current = _current, Ranks()
    try:
        yield
    finally:
        _current = ranks


def main_alone(command: Callable[..., T]) -> Callable[..., T | None]:
    """`command` run by rank 0 alone, as one process, once every rank has reported in; the other
    ranks return None (a command with one writer and nothing to share out: detect, ablate, export)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> T | None:
        result = None
        main = _current.is_main
        with _done_by(main) as done:  # every rank reports in before rank 0 writes anything
            if main:
                with alone():
                    result = command(*args, **kwargs)
        _wait_for(done)
        return result

    return run


def in_turns(work: Callable[[], T]) -> T:
    """`work()` on every rank, first on rank 0, then on the first rank of each other node, then on
    the rest: what the first writes to a cache (shared or one per node) the others only read."""
    if _current.world_size == 1:
        return work()
    turn = 0 if _current.is_main else 1 if _current.local_rank == 0 else 2
    result = None
    for this_turn in range(3):
        with _done_by(this_turn == turn) as done:
            if this_turn == turn:
                result = work()
        _wait_for(done)
    return result  # type: ignore[return-value]


def check_peers() -> None:
    """Join the failing rank's collective as soon as a rank has failed (`exchange` then raises)."""
    if _current.world_size == 1:
        return
    _test_failure()
    if _store().check([_FAILED_KEY]):
        exchange(None)


def _test_failure() -> None:
    rank, _, how = os.environ.get(FAIL_ENV, "").partition(":")
    if rank != str(_current.rank):
        return
    if how == "hang":
        import time

        while True:
            time.sleep(1)
    raise RuntimeError(f"injected failure ({FAIL_ENV}={rank})")


# ----------------------------------------------------------------------------- splitting work


def share(costs: list[int]) -> list[int]:
    """Indices of the items this rank does, in their original order.

    Greedy longest-first: the costliest item goes to the least-loaded rank (lowest rank on ties),
    which keeps the ranks' totals within one item of each other. Every rank computes the same
    assignment from the same costs, so none needs to be sent.
    """
    if _current.world_size == 1:
        return list(range(len(costs)))
    return assign(costs, _current.world_size)[_current.rank]


def assign(costs: list[int], world_size: int) -> list[list[int]]:
    loads = [0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        loads[rank] += costs[index]
        owned[rank].append(index)
    return [sorted(items) for items in owned]


class Progress:
    """Items done by all ranks together in one scoring round, counted in the process group's store."""

    def __init__(self) -> None:
        global _rounds
        _rounds += 1
        self.key = f"superweight/progress/{_rounds}"
        self.done = 0

    def add(self, n: int) -> int:
        """Count `n` more items done here; returns how many all ranks have done so far."""
        if _current.world_size == 1:
            self.done += n
            return self.done
        return int(_store().add(self.key, n))


# ----------------------------------------------------------------------------- placement


def gpu_share(ranks: Ranks | None = None, device_count: int | None = None) -> list[int]:
    """The GPU indices of this node that belong to this rank: an equal, contiguous slice each
    (8 GPUs, 2 ranks per node: rank 0 has 0-3, rank 1 has 4-7)."""
    ranks = ranks or _current
    count = torch.cuda.device_count() if device_count is None else device_count
    per_rank = count // ranks.local_world_size
    if per_rank < 1:
        raise UsageError(f"{ranks.local_world_size} ranks on this node but {count} GPU(s): start at most one rank "
                         "per GPU (torchrun --nproc-per-node), or use --device cpu")
    start = ranks.local_rank * per_rank
    return list(range(start, start + per_rank))


def rank_device(device: str) -> str:
    """`--device` for this rank: "auto"/"cuda" mean the rank's own GPU, cuda:LOCAL_RANK."""
    if _current.world_size == 1 or device not in ("auto", "cuda") or not torch.cuda.is_available():
        return device
    return f"cuda:{_local_gpu(_current)}"


def _local_gpu(ranks: Ranks) -> int:
    count = torch.cuda.device_count()
    if ranks.local_rank >= count:
        raise UsageError(f"{ranks.local_world_size} ranks on this node but {count} GPU(s): start at most one rank "
                         "per GPU (torchrun --nproc-per-node), or use --device cpu")
    return ranks.local_rank


def rank_max_memory(max_memory: dict | None) -> dict | None:
    """accelerate's `max_memory` limited to this rank's GPUs, so `--device-map auto` spreads each
    rank's copy over its own share of the node. GPU keys the user gave count from the rank's first
    GPU (0 = its first); without a budget each of its GPUs may be filled."""
    if _current.world_size == 1 or not torch.cuda.is_available():
        return max_memory
    share_ = gpu_share()
    budget: dict[int | str, Any] = {}
    if max_memory is None:
        from accelerate.utils import get_max_memory

        available = get_max_memory()
        budget = {gpu: available[gpu] for gpu in share_}
        budget["cpu"] = available["cpu"] // _current.local_world_size  # the node's RAM is shared too
        return budget
    for device, amount in max_memory.items():
        if isinstance(device, int):
            if device >= len(share_):
                raise UsageError(f"--max-memory names GPU {device}, but each rank has {len(share_)} GPU(s) "
                                 f"(GPU keys count from the rank's first GPU)")
            budget[share_[device]] = amount
        else:
            budget[device] = amount
    return budget
