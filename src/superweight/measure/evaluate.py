"""One engine for every task: log-likelihood scoring that reproduces lm-evaluation-harness (HF backend).

Agreement with lm-eval comes from tokenising exactly as its `HFLM` does (see `Encoder`) and from
scoring the same token sequences: each request is `context + continuation`, left-truncated to
`max_length + 1` tokens, fed without its last token, and the continuation's log-probabilities summed.
Rolling windows for perplexity follow lm-eval's `get_rolling_token_windows` with `context_len=1`
followed by `make_disjoint_window`.

Speed comes from doing less, not from approximating:
  * the choices of one document share their leading tokens (the context, and often the first words
    of the choices): one input row holds that prefix once, then each choice's own tokens, with
    position ids and an attention mask that make every choice see exactly the prefix and itself
    (lm-eval re-runs the context per choice); a scored position in the prefix is scored once;
  * the output head and log-softmax run only on continuation positions, a chunk at a time, so
    full-vocabulary logits never exist for the whole batch;
  * requests are sorted by length and batched, identical requests are scored once.
Both shortcuts are checked against a plain forward pass on the model at hand before use and
switched off when the model does not reproduce it (see `Scorer._check_shortcuts`).

Under a launcher (`torchrun ...`) the batches are shared out between the ranks by their tokens
and the scores gathered (see `superweight.distributed`): the same numbers, sooner.
"""

from __future__ import annotations

import math
import platform
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .. import distributed
from ..errors import UsageError
from ..model.placement import execution_device
from .tasks import TASKS, LoadedTask, Prompt, load_task, resolve_task_names

Progress = Callable[[str, int, int], None]

CPU_TOKENS_PER_BATCH = 1024  # CPU time per token is flat from ~300 tokens per forward; smaller batches pad less
CUDA_TOKENS_PER_BATCH = 65536  # first try on accelerators; halved on out-of-memory
MAX_PADDING_RATIO = 1.05  # on CPUs, auto batches end where padded tokens would exceed 1.05x the real ones
MAX_PACKED_TOKENS = 2048  # longer choice rows are scored one request per row (the mask grows as its square)
HEAD_CHUNK_ELEMENTS = 1 << 27  # positions x vocab per log-softmax chunk (512 MiB in float32)
BOOTSTRAP_RESAMPLES = 1000  # perplexity stderr (lm-eval also bootstraps perplexity)
DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer says
TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "model_max_length unset"


# ----------------------------------------------------------------------------- tokenisation


def model_max_length(model, tokenizer) -> int:
    """lm-eval's `resolve_max_length`: config length attributes, then the tokenizer, then 2048."""
    config = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit != TOKENIZER_INFINITY else DEFAULT_MAX_LENGTH


class Encoder:
    """Tokenises exactly like lm-eval's HFLM.

    Special tokens are added as the tokenizer does by default, except when the text already starts
    with the prefix token; the prefix token is BOS, else EOS, and conditions empty contexts and the
    first rolling window.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise UsageError("the tokenizer has neither a BOS nor an EOS token; evaluation needs one to start texts")
        self.prefix_token_id = int(prefix)
        self._prefix_text = tokenizer.decode(self.prefix_token_id)

    def _special_tokens(self, text: str, add_special_tokens: bool | None) -> bool | None:
        # As lm-eval's `has_bos_prefix`: a prefix token that decodes to "" prefixes every text.
        if add_special_tokens is None and text.startswith(self._prefix_text):
            return False
        return add_special_tokens

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        return self.encode_many([text], add_special_tokens)[0]

    def encode_many(self, texts: list[str], add_special_tokens: bool | None = None) -> list[list[int]]:
        """`encode` of each text, with one tokenizer call per special-token setting.

        A fast tokenizer encodes a list in one Rust call; one call per text costs more in Python
        than in tokenising (measured in docs/benchmarks.md).
        """
        out: list[list[int]] = [[] for _ in texts]
        by_setting: dict[bool | None, list[int]] = {}
        for i, text in enumerate(texts):
            by_setting.setdefault(self._special_tokens(text, add_special_tokens), []).append(i)
        for setting, indices in by_setting.items():
            kwargs = {} if setting is None else {"add_special_tokens": setting}
            encoded = self.tokenizer([texts[i] for i in indices], **kwargs)["input_ids"]
            for i, ids in zip(indices, encoded):
                out[i] = list(ids)
        return out

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return self.encode_pairs([(context, continuation)])[0]

    def encode_pairs(self, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """lm-eval's `_encode_pair` for each (context, continuation), the texts encoded in bulk, each once."""
        # Trailing context spaces belong to the continuation, so the word boundary tokenises alike.
        split = []  # (context, continuation, whether the context was empty as given)
        for context, continuation in pairs:
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            split.append((context, continuation, not (context or n_spaces)))
        texts = list(dict.fromkeys(t for c, x, empty in split if not empty for t in (c, c + x)))
        encoded = dict(zip(texts, self.encode_many(texts)))
        alone = list(dict.fromkeys(x for _, x, empty in split if empty))  # conditioned on the prefix token instead
        encoded_alone = dict(zip(alone, self.encode_many(alone, add_special_tokens=False)))
        out = []
        for context, continuation, empty in split:
            if empty:
                continuation_enc = encoded_alone[continuation]
                if continuation_enc[:1] == [self.prefix_token_id]:  # an empty one fails in make_request
                    out.append((continuation_enc[:1], continuation_enc[1:]))
                else:
                    out.append(([self.prefix_token_id], continuation_enc))
                continue
            context_enc = encoded[context]
            out.append((context_enc, encoded[context + continuation][len(context_enc) :]))
        return out


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that predict every token once, each input <= max_length.

    The first window predicts the first `max_length` tokens after the prefix token; each later one
    predicts the next `max_length` tokens (fewer at the end), conditioned on as many preceding
    tokens as fit. Same windows as lm-eval's rolling windows made disjoint.
    """
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix_token], tokens[:first])]
    start = first
    while start < len(tokens):
        end = min(len(tokens), start + max_length)
        windows.append((tokens[end - 1 - max_length : start], tokens[start:end]))
        start = end
    return windows


# ----------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Request:
    tokens: tuple[int, ...]  # context + continuation, left-truncated to max_length + 1
    n_scored: int  # trailing continuation tokens whose log-probabilities are summed

    @property
    def n_inputs(self) -> int:
        return len(self.tokens) - 1


@dataclass
class Group:
    """Requests scored together: the choices of one document, or one rolling window."""

    requests: list[int]  # indices into the unique request list
    shared: int = 0  # leading input tokens common to all, computed once (set by the scorer)


def make_request(context_enc: list[int], continuation_enc: list[int], max_length: int) -> Request:
    if not continuation_enc:
        raise UsageError("a continuation tokenised to nothing; the task text is empty")
    tokens = tuple((context_enc + continuation_enc)[-(max_length + 1) :])
    return Request(tokens, min(len(continuation_enc), len(tokens) - 1))


def packed_length(requests: list[Request], group: Group) -> int:
    """Input tokens of the group's row: the shared prefix once, then each request's own tokens."""
    return group.shared + sum(requests[i].n_inputs - group.shared for i in group.requests)


def shared_prefix(requests: list[Request]) -> int:
    """Leading input tokens common to all requests (0 for a lone request).

    The prefix may reach into the continuations (PIQA's two solutions often start alike): a
    position there has the same hidden state and, but for the last, the same target in every
    request, so it is computed and scored once and counted for each.
    """
    if len(requests) < 2:
        return 0
    limit = min(r.n_inputs for r in requests)
    first = requests[0].tokens
    n = 0
    while n < limit and all(r.tokens[n] == first[n] for r in requests):
        n += 1
    return n


# ----------------------------------------------------------------------------- scoring


@dataclass
class Scored:
    logprob: float
    greedy: bool  # every continuation token is the argmax prediction


@dataclass
class PackedBatch:
    """Model inputs for a batch of rows, the positions to score, and which request each counts for."""

    inputs: torch.Tensor  # [rows, width] token ids, right-padded with 0
    order: list[int] = field(default_factory=list)  # request ids in packing order
    rows: list[int] = field(default_factory=list)  # per scored position (each once): its row ...
    cols: list[int] = field(default_factory=list)  # ... and column in `inputs`
    picks: list[int] = field(default_factory=list)  # per (request, target): index into rows/cols ...
    targets: list[int] = field(default_factory=list)  # ... the token predicted there
    owners: list[int] = field(default_factory=list)  # ... and the request's index in `order`
    positions: torch.Tensor | None = None  # [rows, width] position ids, only when a row holds choices
    segments: torch.Tensor | None = None  # [rows, width] 0 prefix, k the k-th request, -1 padding

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive [rows, 1, width, width] mask: causal, and a request sees only the prefix and itself."""
        index = torch.arange(self.inputs.shape[1])
        causal = index[:, None] >= index[None, :]
        keys, queries = self.segments[:, None, :], self.segments[:, :, None]
        allowed = causal & ((keys == 0) | (keys == queries))
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]


def pack(requests: list[Request], batch: list[Group]) -> PackedBatch:
    """One row per group: its shared prefix, then each request's remaining input tokens.

    Each request keeps the positions it has on its own (its suffix continues from the prefix), so
    with `PackedBatch.attention_mask` every scored position sees exactly the tokens it would see
    in a row of its own. A scored position inside the prefix is listed once, for every request.
    """
    width = max(packed_length(requests, group) for group in batch)
    packed = PackedBatch(torch.zeros((len(batch), width), dtype=torch.long))
    if any(len(group.requests) > 1 for group in batch):
        packed.positions = torch.zeros((len(batch), width), dtype=torch.long)
        packed.segments = torch.full((len(batch), width), -1, dtype=torch.long)
    pick_of: dict[tuple[int, int], int] = {}
    for row, group in enumerate(batch):
        shared = group.shared
        packed.inputs[row, :shared] = torch.tensor(requests[group.requests[0]].tokens[:shared], dtype=torch.long)
        if packed.positions is not None:
            packed.positions[row, :shared] = torch.arange(shared)
            packed.segments[row, :shared] = 0
        start = shared  # where the current request's own tokens begin in the row
        for segment, i in enumerate(group.requests, start=1):
            request = requests[i]
            own = request.tokens[shared : request.n_inputs]
            end = start + len(own)
            packed.inputs[row, start:end] = torch.tensor(own, dtype=torch.long)
            if packed.positions is not None:
                packed.positions[row, start:end] = torch.arange(shared, request.n_inputs)
                packed.segments[row, start:end] = segment
            for position in range(request.n_inputs - request.n_scored, request.n_inputs):
                col = position if position < shared else start + position - shared
                if (row, col) not in pick_of:
                    pick_of[row, col] = len(packed.rows)
                    packed.rows.append(row)
                    packed.cols.append(col)
                packed.picks.append(pick_of[row, col])
                packed.targets.append(request.tokens[position + 1])
                packed.owners.append(len(packed.order))
            packed.order.append(i)
            start = end
    return packed


# model -> (split_head, share_prefix), so evaluating many tasks and ablations of one model checks once.
_SHORTCUTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[bool, bool]]" = weakref.WeakKeyDictionary()


class Scorer:
    """Runs the model on batches of request groups and returns summed continuation log-probs."""

    def __init__(self, model, batch_size: int | str = "auto"):
        self.model = model
        self.device = execution_device(model.get_input_embeddings())  # not its weight's: meta if offloaded
        self.batch_size = batch_size
        on_cpu = self.device.type == "cpu"
        self.token_budget = CPU_TOKENS_PER_BATCH if on_cpu else CUDA_TOKENS_PER_BATCH
        # On a CPU time is proportional to tokens, padding included; on an accelerator a batch's
        # padding is nearly free next to launching more, smaller batches (measured: capping it
        # there made sciq and hellaswag 4x slower on an H100).
        self.padding_cap = MAX_PADDING_RATIO if on_cpu else None
        self.base = model.base_model if model.base_model is not model else None
        self.head = model.get_output_embeddings()
        self.head_device = execution_device(self.head) if self.head is not None else self.device
        self.packing_limit = _packing_limit(model.config)
        self.split_head = False
        self.share_prefix = False
        self._checked = False

    # A model's own forward may scale or cap logits after its head, or ignore custom masks and
    # position ids; the shortcuts are only used when they reproduce the plain forward on this model.
    def _check_shortcuts(self, tokens: list[int]) -> None:
        if self.model in _SHORTCUTS:  # an architecture property: checked once per model, not per task
            self.split_head, self.share_prefix = _SHORTCUTS[self.model]
            self._checked = True
            return
        n = min(len(tokens), 16)
        while n >= 4 and n // 2 + 2 * (n - n // 2) > self.packing_limit:  # the check's row must be packable
            n -= 1
        if n < 4:  # too short to check: shortcuts stay off, and the next task's requests may do
            return
        self._checked = True
        ids = torch.tensor([tokens[:n]], device=self.device)
        reference = self.model(ids).logits.float()[0]
        if self.base is not None and self.head is not None:
            try:
                logits = self._logits(self.base(input_ids=ids).last_hidden_state).float()[0]
                self.split_head = bool(torch.allclose(logits, reference.to(logits.device), rtol=1e-4, atol=1e-3))
            except Exception:
                self.split_head = False
        try:
            # The same request twice behind a shared half: the second copy must not see the first.
            half = n // 2
            request = Request(tuple(tokens[:n]) + (0,), n - half)
            packed = pack([request, request], [Group([0, 1], shared=half)])
            out = self._forward(packed)
            second = out[0, [packed.cols[pick] for pick, owner in zip(packed.picks, packed.owners) if owner == 1]]
            second = self._logits(second) if self.split_head else second
            self.share_prefix = bool(torch.allclose(second.float(), reference[half:].to(second.device), rtol=1e-4, atol=1e-3))
        except Exception:
            self.share_prefix = False
        _SHORTCUTS[self.model] = (self.split_head, self.share_prefix)

    def _forward(self, packed: PackedBatch) -> torch.Tensor:
        """Hidden states (logits without the head split) for every position of the batch."""
        kwargs = {}
        if packed.positions is not None:
            kwargs["position_ids"] = packed.positions.to(self.device)
            kwargs["attention_mask"] = packed.attention_mask(self.model.dtype).to(self.device)
        # Right padding needs no mask otherwise: causal attention never looks ahead at the pads.
        if self.split_head:
            return self.base(input_ids=packed.inputs.to(self.device), use_cache=False, **kwargs).last_hidden_state
        return self.model(input_ids=packed.inputs.to(self.device), use_cache=False, **kwargs).logits

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden.to(self.head_device))

    def _rows(self, requests: list[Request], groups: list[Group]) -> list[Group]:
        """A row per group whose requests share a prefix (packed), else a row per request."""
        rows = []
        for group in groups:
            members = [requests[i] for i in group.requests]
            shared = shared_prefix(members) if self.share_prefix else 0
            row = Group(list(group.requests), shared)
            if shared and packed_length(requests, row) <= self.packing_limit:
                rows.append(row)
            else:
                rows += [Group([i]) for i in group.requests]
        return rows

    def score(self, requests: list[Request], groups: list[Group], on_batch: Callable[[int], None] | None = None) -> list[Scored]:
        if not self._checked and requests:
            self._check_shortcuts(list(max(requests, key=lambda r: len(r.tokens)).tokens))
        # Longest first, as lm-eval: out-of-memory shows at once and padding stays small.
        rows = sorted(self._rows(requests, groups), key=lambda row: -packed_length(requests, row))
        batches = self._plan(requests, rows)
        # Under a launcher each rank scores whole batches of this one-process plan, balanced by the
        # tokens they compute, so every request is computed exactly as it would be in one process.
        mine = distributed.share([len(batch) * packed_length(requests, batch[0]) for batch in batches])
        pending = deque(batches[i] for i in mine)
        results: dict[int, Scored] = {}
        progress = distributed.Progress()
        reported = 0  # requests of all ranks already passed to on_batch
        while pending:
            batch = pending[0]
            try:
                with torch.inference_mode():
                    scored = self._score_batch(requests, batch)
            except torch.OutOfMemoryError:
                _free_accelerator_memory()
                if self.batch_size != "auto":
                    raise UsageError(f"out of memory at batch size {self.batch_size}; lower --batch-size "
                                     "or use --batch-size auto") from None
                if len(batch) == 1:  # nothing smaller to try: retrying the same batch cannot fit
                    tokens = packed_length(requests, batch[0])
                    raise UsageError(f"out of memory even on one document's requests alone ({tokens} tokens); lower "
                                     "--max-length, or spread the model with --device-map / --max-memory") from None
                self.token_budget //= 2  # kept for the batches after this one
                pending = deque(self._plan(requests, [row for waiting in pending for row in waiting]))
                continue
            results.update(scored)
            pending.popleft()
            done = progress.add(len(scored))
            if on_batch:
                on_batch(done - reported)
            reported = done
            distributed.check_peers()
        for part in distributed.exchange(results):
            results.update(part)
        if on_batch and reported < len(requests):
            on_batch(len(requests) - reported)
        return [results[i] for i in range(len(requests))]

    def _plan(self, requests: list[Request], rows: list[Group]) -> list[list[Group]]:
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


def _packing_limit(config) -> int:
    """Longest packed row: a custom mask replaces the model's own, so stay within any local window."""
    config = getattr(config, "text_config", None) or config
    windows = [getattr(config, attr, None) for attr in ("sliding_window", "attention_chunk_size")]
    return min([MAX_PACKED_TOKENS] + [int(w) for w in windows if isinstance(w, int) and w > 0])


def _free_accelerator_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- tasks -> requests


@dataclass
class TaskRequests:
    """A task's prompts turned into unique requests; `doc_requests[d]` lists doc d's request ids."""

    prompts: list[Prompt]
    requests: list[Request] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)
    doc_requests: list[list[int]] = field(default_factory=list)


def build_requests(loaded: LoadedTask, encoder: Encoder, max_length: int) -> TaskRequests:
    built = TaskRequests([loaded.task.prompt(doc) for doc in loaded.docs])
    index: dict[Request, int] = {}

    def add(request: Request, group: Group) -> int:
        if request not in index:  # identical requests are scored once
            index[request] = len(built.requests)
            built.requests.append(request)
            group.requests.append(index[request])
        return index[request]

    # Each document's input pairs: its rolling windows, or its (context, choice) pairs, all
    # tokenised in one bulk call.
    if loaded.task.scoring == "rolling":
        texts = encoder.encode_many([prompt.text for prompt in built.prompts])
        doc_pairs = [rolling_windows(tokens, encoder.prefix_token_id, max_length) for tokens in texts]
    else:
        encoded = iter(encoder.encode_pairs([pair for prompt in built.prompts for pair in prompt.pairs]))
        doc_pairs = [[next(encoded) for _ in prompt.pairs] for prompt in built.prompts]
    for pairs in doc_pairs:
        # A rolling window is scored on its own; the choices of a document together.
        together = [[pair] for pair in pairs] if loaded.task.scoring == "rolling" else [pairs]
        ids = []
        for members in together:
            group = Group([])
            ids += [add(make_request(*pair, max_length), group) for pair in members]
            if group.requests:
                built.groups.append(group)
        built.doc_requests.append(ids)
    return built


# ----------------------------------------------------------------------------- metrics


def _mean_and_stderr(values: list[float]) -> tuple[float, float | str]:
    arr = np.asarray(values, dtype=float)
    stderr = float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else "N/A"
    return float(arr.mean()), stderr


def _perplexity_stderr(logprobs: np.ndarray, seed: int) -> float | str:
    """Bootstrap stderr of exp(-mean log-likelihood), seeded for reproducibility."""
    if len(logprobs) < 2:
        return "N/A"
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(logprobs), size=(BOOTSTRAP_RESAMPLES, len(logprobs)))
    return float(np.exp(-logprobs[samples].mean(axis=1)).std(ddof=1))


def task_metrics(task_name: str, built: TaskRequests, scored: list[Scored], seed: int) -> dict[str, Any]:
    task = TASKS[task_name]
    per_doc = [[scored[i] for i in ids] for ids in built.doc_requests]
    results: dict[str, Any] = {}
    if task.scoring == "rolling":
        logprob = sum(s.logprob for doc in per_doc for s in doc)
        words = sum(p.words for p in built.prompts)
        n_bytes = sum(p.bytes for p in built.prompts)
        results["word_perplexity"] = math.exp(-logprob / words)
        results["byte_perplexity"] = math.exp(-logprob / n_bytes)
        results["bits_per_byte"] = -logprob / n_bytes / math.log(2)
        for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            results[metric + "_stderr"] = "N/A"  # lm-eval reports none for these weighted metrics
    elif task.scoring == "greedy":
        logprobs = np.array([doc[0].logprob for doc in per_doc])
        results["acc"], results["acc_stderr"] = _mean_and_stderr([float(doc[0].greedy) for doc in per_doc])
        results["perplexity"] = float(np.exp(-logprobs.mean()))
        results["perplexity_stderr"] = _perplexity_stderr(logprobs, seed)
    else:
        acc, acc_norm = [], []
        for prompt, doc in zip(built.prompts, per_doc):
            lls = np.array([s.logprob for s in doc])
            lengths = np.array([float(len(c)) for c in prompt.choices])
            acc.append(float(np.argmax(lls) == prompt.gold))  # ties go to the first, as np.argmax
            acc_norm.append(float(np.argmax(lls / lengths) == prompt.gold))
        results["acc"], results["acc_stderr"] = _mean_and_stderr(acc)
        if "acc_norm" in task.metrics:
            results["acc_norm"], results["acc_norm_stderr"] = _mean_and_stderr(acc_norm)
    return results


# ----------------------------------------------------------------------------- entry point


def evaluate(
    model,
    tokenizer,
    tasks: list[str] | str,
    *,
    data_dir: str | None = None,
    limit: int | None = None,
    batch_size: int | str = "auto",
    max_length: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Score `model` on lm-eval tasks; returns lm-eval's results layout plus data checksums.

    `limit` keeps the first N documents of each task; `batch_size` is the number of sequences per
    forward pass or "auto" (a token budget, halved on accelerator out-of-memory); `max_length`
    overrides the model's context length used for truncation and rolling windows.
    """
    names = resolve_task_names(tasks)
    if limit is not None and limit <= 0:
        raise UsageError(f"--limit must be a positive number of documents, got {limit}")
    if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size <= 0):
        raise UsageError(f"batch size must be a positive integer or 'auto', got {batch_size!r}")
    if max_length is not None and max_length < 2:
        raise UsageError(f"max length must be at least 2 tokens, got {max_length}")
    length = max_length or model_max_length(model, tokenizer)
    loaded = [load_task(name, data_dir, limit) for name in names]  # fail on missing data before any scoring
    encoder = Encoder(tokenizer)
    scorer = Scorer(model, batch_size)
    was_training = model.training
    model.eval()
    out: dict[str, Any] = {"results": {}, "n_samples": {}, "data_sha256": {}}
    try:
        for name, task_data in zip(names, loaded):
            built = build_requests(task_data, encoder, length)
            total, done = len(built.requests), 0
            if progress:
                progress(name, 0, total)

            def advance(n: int, name: str = name, total: int = total) -> None:
                nonlocal done
                done += n
                if progress:
                    progress(name, done, total)

            scored = scorer.score(built.requests, built.groups, advance)
            # Rank 0 computes the metrics (every rank holds all scores); the others receive them.
            out["results"][name] = distributed.on_main(lambda: task_metrics(name, built, scored, seed))
            out["n_samples"][name] = {"original": task_data.n_total, "effective": len(task_data.docs)}
            out["data_sha256"].update(task_data.sha256)
    finally:
        model.train(was_training)
    out["config"] = {
        "model": getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None),
        "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(scorer.device),
        "ranks": distributed.current().world_size,
        "batch_size": batch_size,
        "max_length": length,
        "limit": limit,
        "seed": seed,
        "prefix_token_id": encoder.prefix_token_id,
        "shared_prefix": scorer.share_prefix,
        "versions": {"torch": torch.__version__, "transformers": _version("transformers"), "python": platform.python_version()},
    }
    return out


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
