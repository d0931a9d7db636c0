"""What is scored: texts tokenised exactly as lm-evaluation-harness (HF backend) does, cut into
requests, and requests packed into model inputs.

Agreement with lm-eval comes from tokenising exactly as its `HFLM` does (see `Encoder`) and from
scoring the same token sequences: each request is `context + continuation`, left-truncated to
`max_length + 1` tokens, fed without its last token, and the continuation's log-probabilities summed.
Rolling windows for perplexity follow lm-eval's `get_rolling_token_windows` with `context_len=1`
followed by `make_disjoint_window`.

The choices of one document share their leading tokens (the context, and often the first words of
the choices): `pack` puts that prefix once in a row, then each choice's own tokens, with position
ids and an attention mask that make every choice see exactly the prefix and itself (lm-eval re-runs
the context per choice); a scored position in the prefix is scored once. Identical requests are
kept once (`build_requests`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UsageError
from .tasks import LoadedTask, Prompt


# ----------------------------------------------------------------------------- tokenisation


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


def check_continuations_fit(task: str, continuation_lengths: list[int], max_length: int) -> None:
    """A continuation longer than `max_length` cannot be scored whole (lm-eval's HF backend fails on
    it); scoring its last tokens alone would be a different metric, so it is refused in one line."""
    longest = max(continuation_lengths, default=0)
    if longest > max_length:
        raise UsageError(f"--max-length {max_length} is shorter than a {task} continuation ({longest} tokens), "
                         f"which could only be scored in part; give --max-length {longest} or more")


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
    tokens: torch.Tensor | None = None  # [rows, width] True at a token, False at padding

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
    packed = PackedBatch(torch.zeros((len(batch), width), dtype=torch.long),
                         tokens=torch.zeros((len(batch), width), dtype=torch.bool))
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
        packed.tokens[row, :start] = True
    return packed


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
        check_continuations_fit(loaded.task.name, [len(c) for pairs in doc_pairs for _, c in pairs], max_length)
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
