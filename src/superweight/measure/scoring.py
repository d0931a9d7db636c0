"""How requests are scored: the model run on batches of packed rows, each request's continuation
log-probabilities summed, as lm-evaluation-harness (HF backend) sums them.

Speed comes from doing less, not from approximating:
  * the choices of one document share one row (see `requests.pack`);
  * the output head and log-softmax run only on continuation positions, a chunk at a time, so
    full-vocabulary logits never exist for the whole batch;
  * rows are sorted by length and batched (`Batching`), identical requests are scored once.
Both shortcuts are checked against a plain forward pass on the model at hand before use and
switched off when the model does not reproduce it (see `Scorer._check_shortcuts`); packing is also
off while hooks compute a statistic per sequence (activation quantization's range).

Under a launcher (`torchrun ...`) the batches are shared out between the ranks by their tokens
and the scores gathered (see `superweight.distributed`): the same numbers, sooner.
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from .. import distributed
from ..errors import UsageError
from ..model import padding
from ..model.placement import execution_device
from .requests import Group, PackedBatch, Request, pack, packed_length, shared_prefix

CPU_TOKENS_PER_BATCH = 1024  # CPU time per token is flat from ~300 tokens per forward; smaller batches pad less
CUDA_TOKENS_PER_BATCH = 65536  # first try on accelerators; halved on out-of-memory
MAX_PADDING_RATIO = 1.05  # on CPUs, auto batches end where padded tokens would exceed 1.05x the real ones
MAX_PACKED_TOKENS = 2048  # longer choice rows are scored one request per row (the mask grows as its square)
HEAD_CHUNK_ELEMENTS = 1 << 27  # positions x vocab per log-softmax chunk (512 MiB in float32)


@dataclass
class Scored:
    logprob: float
    greedy: bool  # every continuation token is the argmax prediction


# ----------------------------------------------------------------------------- batching


@dataclass
class Batching:
    """Which rows go into one forward pass: `batch_size` requests, or in "auto" mode a token budget
    (halved on accelerator out-of-memory) and, on CPUs, a cap on padding."""

    batch_size: int | str
    token_budget: int
    padding_cap: float | None  # padded tokens / needed tokens; None: padding is not limited
    packing_limit: int  # longest row that may hold several requests

    @classmethod
    def for_model(cls, model, device: torch.device, batch_size: int | str) -> "Batching":
        on_cpu = device.type == "cpu"
        # On a CPU time is proportional to tokens, padding included; on an accelerator a batch's
        # padding is nearly free next to launching more, smaller batches (measured: capping it
        # there made sciq and hellaswag 4x slower on an H100).
        return cls(batch_size, CPU_TOKENS_PER_BATCH if on_cpu else CUDA_TOKENS_PER_BATCH,
                   MAX_PADDING_RATIO if on_cpu else None, _packing_limit(model.config))

    def rows(self, requests: list[Request], groups: list[Group], share_prefix: bool) -> list[Group]:
        """A row per group whose requests share a prefix (packed), else a row per request."""
        rows = []
        for group in groups:
            members = [requests[i] for i in group.requests]
            shared = shared_prefix(members) if share_prefix else 0
            row = Group(list(group.requests), shared)
            if shared and packed_length(requests, row) <= self.packing_limit:
                rows.append(row)
            else:
                rows += [Group([i]) for i in group.requests]
        return rows

    def plan(self, requests: list[Request], rows: list[Group]) -> list[list[Group]]:
        """The rows cut into batches, in order."""
        batches: list[list[Group]] = []
        position = 0
        while position < len(rows):
            batches.append(self._take_batch(requests, rows, position))
            position += len(batches[-1])
        return batches

    def _take_batch(self, requests: list[Request], rows: list[Group], start: int) -> list[Group]:
        """Rows from `start` (longest first) up to the batch size, or in auto mode the token budget."""
        batch: list[Group] = []
        n_requests = 0
        ideal = 0  # tokens the rows need without padding
        width = packed_length(requests, rows[start])
        for row in rows[start:]:
            length = packed_length(requests, row)
            if batch:
                # A packed row puts a custom mask on the whole batch, which would take a row longer
                # than the packing limit (only ever the first rows: longest first) out of the
                # model's own sliding-window or chunked mask.
                if len(row.requests) > 1 and width > self.packing_limit:
                    break
                if self.batch_size == "auto":
                    # Stop at the token budget, and on CPUs before padding outgrows the needed tokens.
                    computed = (len(batch) + 1) * width
                    too_big = (computed > self.token_budget
                               or (self.padding_cap is not None and computed > self.padding_cap * (ideal + length)))
                else:
                    too_big = n_requests + len(row.requests) > int(self.batch_size)
                if too_big:
                    break
            batch.append(row)
            n_requests += len(row.requests)
            ideal += length
        return batch

    def after_out_of_memory(self, requests: list[Request], pending: deque[list[Group]]) -> deque[list[Group]]:
        """The waiting batches re-planned at half the token budget, or why nothing smaller can fit."""
        if self.batch_size != "auto":
            raise UsageError(f"out of memory at batch size {self.batch_size}; lower --batch-size "
                             "or use --batch-size auto")
        if len(pending[0]) == 1:  # nothing smaller to try: retrying the same batch cannot fit
            tokens = packed_length(requests, pending[0][0])
            raise UsageError(f"out of memory even on one document's requests alone ({tokens} tokens); lower "
                             "--max-length, or spread the model with --device-map / --max-memory")
        self.token_budget //= 2  # kept for the batches after this one
        return deque(self.plan(requests, [row for waiting in pending for row in waiting]))


def _packing_limit(config) -> int:
    """Longest packed row: a custom mask replaces the model's own, so stay within any local window."""
    config = getattr(config, "text_config", None) or config
    windows = [getattr(config, attr, None) for attr in ("sliding_window", "attention_chunk_size")]
    return min([MAX_PACKED_TOKENS] + [int(w) for w in windows if isinstance(w, int) and w > 0])


# ----------------------------------------------------------------------------- the scorer


# model -> (split_head, share_prefix), so evaluating many tasks and ablations of one model checks once.
_SHORTCUTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[bool, bool]]" = weakref.WeakKeyDictionary()


class Scorer:
    """Runs the model on batches of request groups and returns summed continuation log-probs."""

    def __init__(self, model, batch_size: int | str = "auto"):
        self.model = model
        self.device = execution_device(model.get_input_embeddings())  # not its weight's: meta if offloaded
        self.batching = Batching.for_model(model, self.device, batch_size)
        self.base = model.base_model if model.base_model is not model else None
        self.head = model.get_output_embeddings()
        self.head_device = execution_device(self.head) if self.head is not None else self.device
        self.split_head = False
        self.share_prefix = False
        self._checked = False

    @property
    def packs_prefixes(self) -> bool:
        """Whether requests that share a prefix share a row: the shortcut reproduces this model's
        forward, and no hook computes a statistic per sequence (`padding.per_sequence_hooks`)."""
        return self.share_prefix and not padding.sequences_must_stand_alone(self.model)

    def score(self, requests: list[Request], groups: list[Group], on_batch: Callable[[int], None] | None = None) -> list[Scored]:
        """Each request's score, in order; `on_batch(n)` after each batch, n requests of all ranks further."""
        if not self._checked and requests:
            self._check_shortcuts(list(max(requests, key=lambda r: len(r.tokens)).tokens))
        # Longest first, as lm-eval: out-of-memory shows at once and padding stays small.
        rows = sorted(self.batching.rows(requests, groups, self.packs_prefixes), key=lambda row: -packed_length(requests, row))
        batches = self.batching.plan(requests, rows)
        # Under a launcher each rank scores whole batches of this one-process plan, balanced by the
        # tokens they compute, so every request is computed exactly as it would be in one process.
        mine = distributed.share([len(batch) * packed_length(requests, batch[0]) for batch in batches])
        results, reported = self._score_batches(requests, deque(batches[i] for i in mine), on_batch)
        for part in distributed.exchange(results):
            results.update(part)
        if on_batch and reported < len(requests):
            on_batch(len(requests) - reported)
        return [results[i] for i in range(len(requests))]

    def _score_batches(self, requests: list[Request], pending: deque[list[Group]],
                       on_batch: Callable[[int], None] | None) -> tuple[dict[int, Scored], int]:
        """This rank's batches scored, smaller ones tried on out-of-memory; also the requests of all
        ranks reported to `on_batch`."""
        results: dict[int, Scored] = {}
        progress = distributed.Progress()
        reported = 0
        while pending:
            try:
                with torch.inference_mode():
                    scored = self._score_batch(requests, pending[0])
            except torch.OutOfMemoryError:
                scored = None  # handled below, once the error no longer holds the batch's tensors
            if scored is None:
                _free_accelerator_memory()
                pending = self.batching.after_out_of_memory(requests, pending)
                continue
            results.update(scored)
            pending.popleft()
            done = progress.add(len(scored))
            if on_batch:
                on_batch(done - reported)
            reported = done
            distributed.check_peers()
        return results, reported

    # A model's own forward may scale or cap logits after its head, or ignore custom masks and
    # position ids; the shortcuts are only used when they reproduce the plain forward on this model.
    def _check_shortcuts(self, tokens: list[int]) -> None:
        if self.model in _SHORTCUTS:  # an architecture property: checked once per model, not per task
            self.split_head, self.share_prefix = _SHORTCUTS[self.model]
            self._checked = True
            return
        n = min(len(tokens), 16)
        while n >= 4 and n // 2 + 2 * (n - n // 2) > self.batching.packing_limit:  # the check's row must be packable
            n -= 1
        if n < 4:  # too short to check: shortcuts stay off, and the next task's requests may do
            return
        self._checked = True
        ids = torch.tensor([tokens[:n]], device=self.device)
        reference = self.model(ids).logits.float()[0]
        self.split_head = self._head_split_reproduces(ids, reference)
        self.share_prefix = self._shared_prefix_reproduces(tokens[:n], reference)
        _SHORTCUTS[self.model] = (self.split_head, self.share_prefix)

    def _head_split_reproduces(self, ids: torch.Tensor, reference: torch.Tensor) -> bool:
        if self.base is None or self.head is None:
            return False
        try:
            logits = self._logits(self.base(input_ids=ids).last_hidden_state).float()[0]
            return bool(torch.allclose(logits, reference.to(logits.device), rtol=1e-4, atol=1e-3))
        except Exception:
            return False

    def _shared_prefix_reproduces(self, tokens: list[int], reference: torch.Tensor) -> bool:
        try:
            # The same request twice behind a shared half: the second copy must not see the first.
            n, half = len(tokens), len(tokens) // 2
            request = Request(tuple(tokens) + (0,), n - half)
            packed = pack([request, request], [Group([0, 1], shared=half)])
            out = self._forward(packed)
            second = out[0, [packed.cols[pick] for pick, owner in zip(packed.picks, packed.owners) if owner == 1]]
            second = self._logits(second) if self.split_head else second
            return bool(torch.allclose(second.float(), reference[half:].to(second.device), rtol=1e-4, atol=1e-3))
        except Exception:
            return False

    def _forward(self, packed: PackedBatch) -> torch.Tensor:
        """Hidden states (logits without the head split) for every position of the batch."""
        kwargs = {}
        if packed.positions is not None:
            kwargs["position_ids"] = packed.positions.to(self.device)
            kwargs["attention_mask"] = packed.attention_mask(self.model.dtype).to(self.device)
        # Right padding needs no mask otherwise: causal attention never looks ahead at the pads. Hooks
        # that must leave the pads out (activation quantization's ranges) read them from `padding`.
        with padding.marked(self.model, packed.tokens):
            if self.split_head:
                return self.base(input_ids=packed.inputs.to(self.device), use_cache=False, **kwargs).last_hidden_state
            return self.model(input_ids=packed.inputs.to(self.device), use_cache=False, **kwargs).logits

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden.to(self.head_device))

    def _score_batch(self, requests: list[Request], batch: list[Group]) -> dict[int, Scored]:
        packed = pack(requests, batch)
        hidden = self._forward(packed)
        picked = hidden[torch.tensor(packed.rows, device=hidden.device), torch.tensor(packed.cols, device=hidden.device)]
        del hidden
        logprobs, greedy = self._target_logprobs(picked, torch.tensor(packed.picks), torch.tensor(packed.targets))
        # Per request: sum of its targets' log-probs, and whether none missed the argmax (one
        # pass over the scored positions, not one mask per request).
        owner = torch.tensor(packed.owners)
        n = len(packed.order)
        totals = torch.zeros(n, dtype=logprobs.dtype).index_add_(0, owner, logprobs).tolist()
        misses = torch.zeros(n, dtype=torch.long).index_add_(0, owner, (~greedy).long()).tolist()
        return {i: Scored(totals[k], misses[k] == 0) for k, i in enumerate(packed.order)}

    def _target_logprobs(self, picked: torch.Tensor, picks: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of each target at its position (`picks` into `picked`) and whether it is the
        argmax there; the head and log-softmax run once per position, a chunk of positions at a time."""
        vocab = self.head.weight.shape[0] if self.split_head else picked.shape[-1]
        chunk = max(1, HEAD_CHUNK_ELEMENTS // vocab)
        logprobs = torch.empty(len(picks), dtype=torch.float64)
        greedy = torch.empty(len(picks), dtype=torch.bool)
        for start in range(0, picked.shape[0], chunk):
            part = picked[start : start + chunk]
            logits = self._logits(part) if self.split_head else part
            log_softmax = torch.log_softmax(logits.float(), dim=-1)
            here = ((picks >= start) & (picks < start + len(part))).nonzero()[:, 0]
            at = (picks[here] - start).to(log_softmax.device)
            target = targets[here].to(log_softmax.device)
            logprobs[here] = log_softmax[at, target].double().cpu()
            greedy[here] = (log_softmax.argmax(-1)[at] == target).cpu()
        return logprobs, greedy



def _free_accelerator_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
