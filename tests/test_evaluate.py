"""The scoring engine on tiny random models: windows, tokenisation, batching, metrics."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from superweight.errors import DataError, UsageError
from superweight.measure.evaluate import evaluate
from superweight.measure.metrics import task_metrics
from superweight.measure.requests import Encoder, Group, Request, build_requests, rolling_windows
from superweight.measure.scoring import Scored, Scorer
from superweight.measure.tasks import TASKS, Prompt, load_task

from synthetic import single_threaded

WORDS = "Question: Answer: the a cat dog sat on mat ran fast slow red blue is was and it".split()


def word_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:  # like Llama tokenizers: BOS prepended by default
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def reference_logprob(model, request: Request) -> tuple[float, bool]:
    """Plain lm-eval-style scoring of one request: full forward pass, log-softmax everywhere."""
    ids = torch.tensor([request.tokens[:-1]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    positions = range(request.n_inputs - request.n_scored, request.n_inputs)
    targets = request.tokens[-request.n_scored :]
    total = sum(logprobs[p, t].item() for p, t in zip(positions, targets))
    greedy = all(logprobs[p].argmax().item() == t for p, t in zip(positions, targets))
    return total, greedy


# ----------------------------------------------------------------------------- rolling windows


@pytest.mark.parametrize("n_tokens", [1, 5, 7, 8, 9, 16, 17, 40])
@pytest.mark.parametrize("max_length", [1, 2, 8])
def test_rolling_windows_cover_every_token_once(n_tokens, max_length):
    tokens = list(range(100, 100 + n_tokens))
    windows = rolling_windows(tokens, prefix_token=0, max_length=max_length)
    predicted = [t for _, continuation in windows for t in continuation]
    assert predicted == tokens
    for context, continuation in windows:
        assert 1 <= len(context)
        assert len(context) + len(continuation) - 1 <= max_length  # model input fits
    # Every window conditions on exactly the tokens that precede its predictions.
    assert windows[0][0] == [0]
    start = len(windows[0][1])
    for context, continuation in windows[1:]:
        assert context == tokens[start - len(context) : start]
        assert len(context) + len(continuation) == max_length + 1  # later windows use the full length
        start += len(continuation)


def test_rolling_windows_empty_text():
    assert rolling_windows([], 0, 8) == []


# ----------------------------------------------------------------------------- tokenisation


def test_encode_pair_moves_trailing_space_to_continuation():
    tokenizer = word_tokenizer()
    encoder = Encoder(tokenizer)
    context, continuation = encoder.encode_pair("the cat ", "sat")
    assert context == tokenizer.encode("the cat")
    assert tokenizer.decode(continuation) == "sat"


def test_encode_pair_keeps_tokenizer_default_bos():
    tokenizer = word_tokenizer(add_bos=True)
    encoder = Encoder(tokenizer)
    context, continuation = encoder.encode_pair("the cat", " sat on")
    assert context[0] == 1 and context.count(1) == 1
    assert continuation == tokenizer.convert_tokens_to_ids(["sat", "on"])
    # Text already starting with the BOS text is not given a second BOS.
    assert encoder.encode("<s> the")[0] == 1 and encoder.encode("<s> the").count(1) == 1


def test_empty_context_is_conditioned_on_prefix_token():
    encoder = Encoder(word_tokenizer())
    context, continuation = encoder.encode_pair("", " the cat")
    assert context == [encoder.prefix_token_id] == [1]
    assert len(continuation) == 2


def test_empty_context_and_empty_continuation_is_a_usage_error():
    from superweight.measure.requests import make_request

    encoder = Encoder(word_tokenizer())
    context, continuation = encoder.encode_pair("", "")
    assert context == [encoder.prefix_token_id] and continuation == []
    with pytest.raises(UsageError, match="tokenised to nothing"):
        make_request(context, continuation, 8)


def test_a_prefix_token_that_decodes_to_nothing_prefixes_every_text():
    class SilentBos:  # lm-eval's check is `text.startswith(decode(prefix))`, true for "" on any text
        bos_token_id, eos_token_id = 1, 2

        def __init__(self):
            self.kwargs = []

        def decode(self, token_id):
            return ""

        def __call__(self, texts, **kwargs):
            self.kwargs.append(kwargs)
            return {"input_ids": [[1, len(text)] for text in texts]}

    tokenizer = SilentBos()
    Encoder(tokenizer).encode_many(["the cat", "a dog"])
    assert tokenizer.kwargs == [{"add_special_tokens": False}]


@pytest.mark.parametrize("add_bos", [False, True])
def test_bulk_encode_pairs_equal_lm_eval_one_pair_at_a_time(add_bos):
    tokenizer = word_tokenizer(add_bos)
    encoder = Encoder(tokenizer)
    prefix = encoder.prefix_token_id

    def one_pair(context, continuation):  # lm-eval: empty context as given -> prefix token
        if context == "":
            enc = tokenizer.encode(continuation, add_special_tokens=False)
            return (enc[:1], enc[1:]) if enc[0] == prefix else ([prefix], enc)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        kwargs = {"add_special_tokens": False} if context.startswith("<s>") else {}
        whole, context_enc = tokenizer.encode(context + continuation, **kwargs), tokenizer.encode(context, **kwargs)
        return context_enc, whole[len(context_enc):]

    pairs = [("the cat ", "sat"), ("the cat", " sat on"), ("", " the cat"), ("  ", "the cat"), ("<s> the", " cat"),
             ("the cat", " sat on"), ("a dog", " ran"), ("", "<s> red")]
    assert encoder.encode_pairs(pairs) == [one_pair(c, x) for c, x in pairs]
    assert [encoder.encode_pair(c, x) for c, x in pairs] == encoder.encode_pairs(pairs)


# ----------------------------------------------------------------------------- scoring


def _requests_and_groups():
    encoder = Encoder(word_tokenizer())
    prompts = [
        Prompt(pairs=(("Question: the cat\nAnswer:", " sat"), ("Question: the cat\nAnswer:", " ran fast on the mat")),
               choices=("sat", "ran fast on the mat"), gold=0),
        Prompt(pairs=(("the dog was", " red"), ("the dog was", " blue and slow"), ("the dog was", " fast")),
               choices=("red", "blue and slow", "fast"), gold=2),
        Prompt(pairs=(("a cat", " is on the mat"), ("a dog", " is on the mat")), choices=("a cat", "a dog"), gold=1),
        # Choices that start alike, and one-token choices: the shared prefix reaches into them.
        Prompt(pairs=(("the dog", " sat on the mat"), ("the dog", " sat on the cat")), choices=("mat", "cat"), gold=0),
        Prompt(pairs=(("a cat is", " red"), ("a cat is", " blue")), choices=("red", "blue"), gold=1),
    ]
    requests, groups = [], []
    from superweight.measure.requests import Group, make_request

    for prompt in prompts:
        group = Group([])
        for context, continuation in prompt.pairs:
            group.requests.append(len(requests))
            requests.append(make_request(*encoder.encode_pair(context, continuation), max_length=64))
        groups.append(group)
    return prompts, requests, groups


@pytest.mark.parametrize("batch_size", [1, 2, 3, "auto"])
def test_batched_scores_equal_unbatched_reference(tiny_model, batch_size):
    _, requests, groups = _requests_and_groups()
    scored = Scorer(tiny_model, batch_size).score(requests, groups)
    for request, result in zip(requests, scored):
        expected, greedy = reference_logprob(tiny_model, request)
        assert result.logprob == pytest.approx(expected, abs=1e-4)
        assert result.greedy == greedy


def test_shortcuts_are_enabled_for_llama_and_match_plain_path(tiny_model):
    _, requests, groups = _requests_and_groups()
    fast = Scorer(tiny_model, "auto")
    fast_scores = fast.score(requests, groups)
    assert fast.split_head and fast.share_prefix
    plain = Scorer(tiny_model, "auto")
    plain._checked = True  # skip the check: both shortcuts stay off
    plain_scores = plain.score(requests, [type(g)(list(g.requests)) for g in groups])
    for a, b in zip(fast_scores, plain_scores):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_pack_puts_the_prefix_once_and_keeps_each_choice_own_positions():
    from superweight.measure.requests import Group, pack, packed_length

    requests = [Request((5, 6, 7, 8, 9), 2), Request((5, 6, 7, 3, 4, 2), 3), Request((1, 2, 3), 1)]
    batch = [Group([0, 1], shared=2), Group([2])]
    packed = pack(requests, batch)
    assert packed_length(requests, batch[0]) == 2 + 2 + 3
    assert packed.inputs.tolist() == [[5, 6, 7, 8, 7, 3, 4], [1, 2, 0, 0, 0, 0, 0]]
    assert packed.positions[0].tolist() == [0, 1, 2, 3, 2, 3, 4]
    assert packed.segments.tolist() == [[0, 0, 1, 1, 2, 2, 2], [1, 1, -1, -1, -1, -1, -1]]
    assert packed.tokens.tolist() == (packed.segments != -1).tolist()  # what hooks read (model.padding)
    # Scored positions predict each request's last n_scored tokens, from its own columns.
    assert packed.picks == list(range(6)) and packed.owners == [0, 0, 1, 1, 1, 2]
    assert list(zip(packed.rows, packed.cols, packed.targets)) == [
        (0, 2, 8), (0, 3, 9), (0, 4, 3), (0, 5, 4), (0, 6, 2), (1, 1, 3)]
    allowed = packed.attention_mask(torch.float32)[0, 0] == 0
    assert allowed[4].tolist() == [True, True, False, False, True, False, False]  # 2nd choice: prefix + itself
    assert allowed[3].tolist() == [True, True, True, True, False, False, False]



def test_scored_positions_inside_the_shared_prefix_are_computed_once_and_counted_for_each():
    from superweight.measure.requests import Group, pack, shared_prefix

    requests = [Request((5, 6, 7, 8, 9), 3), Request((5, 6, 7, 8, 4), 3)]
    assert shared_prefix(requests) == 4  # all inputs shared: only the last targets differ
    packed = pack(requests, [Group([0, 1], shared=4)])
    assert packed.inputs.tolist() == [[5, 6, 7, 8]]
    assert list(zip(packed.rows, packed.cols)) == [(0, 1), (0, 2), (0, 3)]
    assert packed.picks == [0, 1, 2, 0, 1, 2]
    assert packed.targets == [7, 8, 9, 7, 8, 4]
    assert packed.owners == [0, 0, 0, 1, 1, 1]

def test_sliding_window_models_are_packed_only_within_the_window():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           sliding_window=6, bos_token_id=1, eos_token_id=2)
    model = MistralForCausalLM(config).eval()
    _, requests, groups = _requests_and_groups()
    scorer = Scorer(model, "auto")
    scored = scorer.score(requests, groups)
    assert scorer.share_prefix and scorer.batching.packing_limit == 6
    assert max(r.n_inputs for r in requests) > 6  # some requests reach beyond the window
    for request, result in zip(requests, scored):  # the window is the model's own, not the packing mask's
        expected, _ = reference_logprob(model, request)
        assert result.logprob == pytest.approx(expected, abs=1e-4)


def test_a_row_longer_than_the_window_never_shares_a_batch_with_a_packed_row():
    from transformers import MistralConfig, MistralForCausalLM

    from superweight.measure.requests import make_request

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           sliding_window=8, bos_token_id=1, eos_token_id=2)
    model = MistralForCausalLM(config).eval()
    long = make_request(list(range(3, 22)), [50, 51], 63)  # 20 inputs, alone in its group, past the window
    choices = [make_request([5, 6, 7], [8, 9], 63), make_request([5, 6, 7], [10, 11], 63)]  # a packed row
    requests = [long, *choices]
    scorer = Scorer(model, 100)  # room for all rows in one batch: only the mask split keeps them apart
    scored = scorer.score(requests, [Group([0]), Group([1, 2])])
    assert scorer.share_prefix and scorer.batching.packing_limit == 8
    for request, result in zip(requests, scored):  # the long row keeps the model's own window mask
        expected, _ = reference_logprob(model, request)
        assert result.logprob == pytest.approx(expected, abs=1e-4)


def test_a_short_first_request_does_not_switch_the_shortcuts_off():
    from synthetic import tiny_model as synthetic_model

    from superweight.measure.requests import make_request

    model = synthetic_model("llama")  # a fresh model: nothing cached from other tests
    requests = [make_request([5], [6, 7], 63), make_request(list(range(5, 25)), [30], 63)]
    scorer = Scorer(model, "auto")
    scorer.score(requests, [Group([0]), Group([1])])
    assert scorer.split_head and scorer.share_prefix  # checked on the request long enough to check


def test_truncation_keeps_the_last_max_length_plus_one_tokens():
    from superweight.measure.requests import make_request

    request = make_request(list(range(10)), [10, 11, 12], max_length=5)
    assert request.tokens == (6, 7, 8, 9, 10, 11, 12)[-6:]
    assert request.n_scored == 3


# ----------------------------------------------------------------------------- metrics


def test_acc_and_acc_norm_from_known_loglikelihoods():
    # Doc 0: raw argmax is choice 1 (-2.0); per character choice 0 wins (-3/10 > -2/2).
    # Doc 1: both pick choice 0, which is gold.
    prompts = [
        Prompt(pairs=(("c", " x"), ("c", " y")), choices=("abcdefghij", "ab"), gold=0),
        Prompt(pairs=(("c", " x"), ("c", " y")), choices=("abc", "abc"), gold=0),
    ]
    doc_scores = [[Scored(-3.0, False), Scored(-2.0, False)], [Scored(-1.0, True), Scored(-5.0, False)]]
    results = task_metrics(TASKS["piqa"].metrics, prompts, doc_scores, seed=0)
    assert results["acc"] == 0.5
    assert results["acc_norm"] == 1.0
    assert results["acc_stderr"] == pytest.approx(0.5)  # sample std 0.7071 / sqrt(2)
    assert results["acc_norm_stderr"] == 0.0
    # Each metric with its stderr beside it, as lm-eval lays out a task's results.
    assert list(results) == ["acc", "acc_stderr", "acc_norm", "acc_norm_stderr"]


def test_winogrande_reports_acc_only():
    prompts = [Prompt(pairs=(("a", " z"), ("b", " z")), choices=("a", "b"), gold=1)]
    results = task_metrics(TASKS["winogrande"].metrics, prompts, [[Scored(-2, 0), Scored(-1, 0)]], 0)
    assert results == {"acc": 1.0, "acc_stderr": "N/A"}  # one document: no stderr


def test_lambada_metrics():
    prompts = [Prompt(pairs=(("a", " b"),)), Prompt(pairs=(("c", " d"),))]
    doc_scores = [[Scored(-1.0, True)], [Scored(-3.0, False)]]
    results = task_metrics(TASKS["lambada_openai"].metrics, prompts, doc_scores, seed=0)
    assert results["acc"] == 0.5  # greedy match, not the most likely of one choice (always right)
    assert results["perplexity"] == pytest.approx(math.exp(2.0))
    assert results["perplexity_stderr"] > 0
    assert results["perplexity_stderr"] == task_metrics(TASKS["lambada_openai"].metrics, prompts, doc_scores,
                                                        seed=0)["perplexity_stderr"]  # seeded bootstrap


def test_wikitext_metrics_weight_by_words_and_bytes():
    prompts = [Prompt(text="x", words=3, bytes=10), Prompt(text="y", words=1, bytes=6)]
    doc_scores = [[Scored(-2.0, 0), Scored(-2.0, 0)], [Scored(-4.0, 0)]]  # document 0 in two windows
    results = task_metrics(TASKS["wikitext"].metrics, prompts, doc_scores, seed=0)
    assert results["word_perplexity"] == pytest.approx(math.exp(8 / 4))
    assert results["byte_perplexity"] == pytest.approx(math.exp(8 / 16))
    assert results["bits_per_byte"] == pytest.approx(0.5 / math.log(2))
    assert results["word_perplexity_stderr"] == "N/A"  # lm-eval reports none for weighted perplexities


def test_every_task_reports_exactly_the_metrics_its_row_declares():
    """The task table is the one place that says what a task reports: the names lm-eval reports."""
    declared = {name: [m.name for m in task.metrics] for name, task in TASKS.items()}
    assert declared == {
        "wikitext": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
        "lambada_openai": ["acc", "perplexity"],
        "piqa": ["acc", "acc_norm"], "arc_easy": ["acc", "acc_norm"], "arc_challenge": ["acc", "acc_norm"],
        "hellaswag": ["acc", "acc_norm"], "sciq": ["acc", "acc_norm"], "winogrande": ["acc"],
    }


def test_a_new_metric_is_one_row():
    from superweight.measure.metrics import Metric, mean, mean_stderr

    gold_is_first = Metric("gold_is_first", lambda prompt, scores: float(prompt.gold == 0), mean, mean_stderr)
    prompts = [Prompt(gold=0), Prompt(gold=1), Prompt(gold=0), Prompt(gold=0)]
    results = task_metrics([gold_is_first], prompts, [[]] * 4)
    assert results == {"gold_is_first": 0.75, "gold_is_first_stderr": pytest.approx(0.25)}


# ----------------------------------------------------------------------------- end to end


def _write_piqa(root, rows):
    task_dir = root / "piqa"
    task_dir.mkdir(parents=True)
    (task_dir / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task_dir / "valid-labels.lst").write_text("".join(f"{r['label']}\n" for r in rows))


def test_evaluate_end_to_end_matches_reference(tiny_model, tmp_path):
    rows = [
        {"goal": "the cat", "sol1": "sat on the mat", "sol2": "ran", "label": 0},
        {"goal": "the dog", "sol1": "was red", "sol2": "was blue and it ran fast", "label": 1},
        {"goal": "a cat is", "sol1": "slow", "sol2": "fast", "label": 1},
    ]
    _write_piqa(tmp_path, rows)
    tokenizer = word_tokenizer()
    calls = []
    out = evaluate(tiny_model, tokenizer, ["piqa"], data_dir=str(tmp_path), batch_size=2,
                   progress=lambda task, done, total: calls.append((task, done, total)))
    encoder = Encoder(tokenizer)
    acc, acc_norm = [], []
    for row in rows:
        context = f"Question: {row['goal']}\nAnswer:"
        lls = [reference_logprob(tiny_model, Request(tuple(sum(encoder.encode_pair(context, " " + s), [])),
                                                     len(encoder.encode_pair(context, " " + s)[1])))[0]
               for s in (row["sol1"], row["sol2"])]
        lengths = [len(row["sol1"]), len(row["sol2"])]
        acc.append(float(max(range(2), key=lambda i: lls[i]) == row["label"]))
        acc_norm.append(float(max(range(2), key=lambda i: lls[i] / lengths[i]) == row["label"]))
    assert out["results"]["piqa"]["acc"] == pytest.approx(sum(acc) / 3)
    assert out["results"]["piqa"]["acc_norm"] == pytest.approx(sum(acc_norm) / 3)
    assert out["n_samples"]["piqa"] == {"original": 3, "effective": 3}
    assert set(out["data_sha256"]) == {"piqa/valid.jsonl", "piqa/valid-labels.lst"}
    assert calls[0] == ("piqa", 0, 6) and calls[-1] == ("piqa", 6, 6)


def test_rolling_loglikelihood_equals_sum_over_tokens(tiny_model, tmp_path):
    """Wikitext scoring with windows much shorter than the text equals token-by-token scoring."""
    text = " ".join(WORDS[2:] * 3)
    (tmp_path / "wikitext").mkdir()
    (tmp_path / "wikitext" / "wikitext-2-raw-v1_test_documents.jsonl").write_text(json.dumps({"page": text}) + "\n")
    tokenizer = word_tokenizer()
    out = evaluate(tiny_model, tokenizer, ["wikitext"], data_dir=str(tmp_path), max_length=8)
    tokens = tokenizer.encode(text)
    expected = 0.0
    for context, continuation in rolling_windows(tokens, 1, 8):
        expected += reference_logprob(tiny_model, Request(tuple(context + continuation), len(continuation)))[0]
    words = len(text.split())
    assert out["results"]["wikitext"]["word_perplexity"] == pytest.approx(math.exp(-expected / words), rel=1e-5)
    assert out["config"]["max_length"] == 8


def test_limit_and_bad_options(tiny_model, tmp_path):
    _write_piqa(tmp_path, [{"goal": "the cat", "sol1": "sat", "sol2": "ran", "label": 0}] * 3)
    tokenizer = word_tokenizer()
    out = evaluate(tiny_model, tokenizer, "piqa", data_dir=str(tmp_path), limit=2)
    assert out["n_samples"]["piqa"] == {"original": 3, "effective": 2}
    with pytest.raises(UsageError, match="--limit must be a positive number of documents, got 0"):
        evaluate(tiny_model, tokenizer, ["piqa"], data_dir=str(tmp_path), limit=0)
    with pytest.raises(UsageError, match="--max-length must be at least 2 tokens, got 1"):
        evaluate(tiny_model, tokenizer, ["piqa"], data_dir=str(tmp_path), max_length=1)
    with pytest.raises(UsageError, match="batch size"):
        evaluate(tiny_model, tokenizer, ["piqa"], data_dir=str(tmp_path), batch_size=0)
    with pytest.raises(DataError, match="arc_easy"):
        evaluate(tiny_model, tokenizer, ["arc_easy"], data_dir=str(tmp_path))


def test_max_length_shorter_than_a_continuation_is_refused_before_any_scoring(tiny_model, tmp_path):
    """PIQA's second solution is 5 tokens: --max-length 4 could score only its last 4 (a different
    metric, where lm-eval's HF backend fails); refused in one line before wikitext, which comes first
    and fits, is scored. --max-length 5 scores it whole."""
    _write_wikitext(tmp_path)
    _write_piqa(tmp_path, [{"goal": "the cat", "sol1": "sat", "sol2": "ran fast on the mat", "label": 0}])
    scored = []
    with pytest.raises(UsageError) as error:
        evaluate(tiny_model, word_tokenizer(), ["wikitext", "piqa"], data_dir=str(tmp_path), max_length=4,
                 progress=lambda task, done, total: scored.append(task))
    assert str(error.value) == ("--max-length 4 is shorter than a piqa continuation (5 tokens), which could only "
                                "be scored in part; give --max-length 5 or more")
    assert scored == []
    out = evaluate(tiny_model, word_tokenizer(), ["piqa"], data_dir=str(tmp_path), max_length=5)
    assert out["n_samples"]["piqa"]["effective"] == 1


def test_max_length_past_the_models_context_is_refused_in_one_line(tmp_path):
    """GPT-2's family has no position past n_positions (64 here): --max-length 65 would put a token
    there (an IndexError in the position embedding mid-evaluation); it is refused before scoring,
    by the built-in engine and before lm-eval's. 64 itself evaluates."""
    from synthetic import tiny_model as synthetic_model
    from superweight.measure.harness import HarnessTasks, evaluate_harness

    _write_wikitext(tmp_path, n_words=200)
    model = synthetic_model("gpt2", vocab_size=len(WORDS) + 3)
    tokenizer = word_tokenizer()
    with pytest.raises(UsageError) as error:
        evaluate(model, tokenizer, ["wikitext"], data_dir=str(tmp_path), max_length=65)
    assert str(error.value) == ("--max-length 65 is more than this model reads (64 tokens); "
                                "give --max-length 64 or less, or leave it out")
    with pytest.raises(UsageError, match="--max-length 65 is more than this model reads"):
        evaluate_harness(model, tokenizer, HarnessTasks(("lambada_openai",)), max_length=65)
    out = evaluate(model, tokenizer, ["wikitext"], data_dir=str(tmp_path), max_length=64)
    assert out["config"]["max_length"] == 64 and math.isfinite(out["results"]["wikitext"]["word_perplexity"])


def test_model_is_left_in_its_training_mode(tiny_model, tmp_path):
    _write_piqa(tmp_path, [{"goal": "the cat", "sol1": "sat", "sol2": "ran", "label": 0}])
    tiny_model.train()
    try:
        evaluate(tiny_model, word_tokenizer(), ["piqa"], data_dir=str(tmp_path))
        assert tiny_model.training
    finally:
        tiny_model.eval()


def test_load_task_limit_reads_first_documents(tmp_path):
    _write_piqa(tmp_path, [{"goal": f"g{i}", "sol1": "a", "sol2": "b", "label": i % 2} for i in range(5)])
    loaded = load_task("piqa", str(tmp_path), limit=2)
    assert [d["goal"] for d in loaded.docs] == ["g0", "g1"] and loaded.n_total == 5


def test_build_requests_deduplicates_identical_choices():
    from superweight.measure.tasks import LoadedTask

    doc = {"goal": "the cat", "sol1": "sat", "sol2": "sat", "label": 0}
    built = build_requests(LoadedTask(TASKS["piqa"], [doc], 1, {}), Encoder(word_tokenizer()), 64)
    assert len(built.requests) == 1 and built.doc_requests == [[0, 0]]


# ----------------------------------------------------------------------------- out of memory


class _SimulatedMemory:
    """A forward pre-hook on the base model: more than `limit` input tokens at once raise CUDA's
    out-of-memory error, as a too large batch would on a GPU."""

    def __init__(self, model, limit: int):
        self.limit, self.fitted = limit, []
        self.handle = model.base_model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids.numel() > self.limit:
            raise torch.cuda.OutOfMemoryError(f"simulated: {ids.numel()} tokens")
        self.fitted.append(ids.numel())


def _write_wikitext(tmp_path, n_words: int = 90):
    (tmp_path / "wikitext").mkdir(exist_ok=True)
    text = " ".join((WORDS[2:] * 10)[:n_words])
    (tmp_path / "wikitext" / "wikitext-2-raw-v1_test_documents.jsonl").write_text(json.dumps({"page": text}) + "\n")


def test_auto_batch_size_halves_on_out_of_memory_with_the_same_results(tiny_model, tmp_path):
    """90 tokens in windows of 8: the first 'auto' batch (all of them) does not fit in 40 tokens;
    the budget halves from CPU_TOKENS_PER_BATCH until a batch of 4 windows (32 tokens) fits."""
    _write_wikitext(tmp_path)
    options = dict(data_dir=str(tmp_path), max_length=8)
    with single_threaded():
        expected = evaluate(tiny_model, word_tokenizer(), ["wikitext"], batch_size=1, **options)
    memory = _SimulatedMemory(tiny_model, limit=40)
    try:
        with single_threaded():
            got = evaluate(tiny_model, word_tokenizer(), ["wikitext"], batch_size="auto", **options)
    finally:
        memory.handle.remove()
    assert got["results"]["wikitext"]["word_perplexity"] == pytest.approx(
        expected["results"]["wikitext"]["word_perplexity"], rel=1e-6)
    assert max(memory.fitted) == 32  # the largest power-of-two budget that fits, not a batch of one


def test_out_of_memory_that_no_batch_avoids_is_a_usage_error(tiny_model, tmp_path):
    _write_wikitext(tmp_path)
    options = dict(data_dir=str(tmp_path), max_length=32)
    memory = _SimulatedMemory(tiny_model, limit=20)  # a window is 32 tokens; the shortcut check 16
    try:
        with single_threaded(), pytest.raises(UsageError, match="--max-length"):
            evaluate(tiny_model, word_tokenizer(), ["wikitext"], batch_size="auto", **options)
        with single_threaded(), pytest.raises(UsageError, match="--batch-size"):
            evaluate(tiny_model, word_tokenizer(), ["wikitext"], batch_size=2, **options)
    finally:
        memory.handle.remove()


# ----------------------------------------------------------------------------- precision

# Word perplexity in half precision vs float32, relative. Measured on CPU (wikitext, 1 document):
# the planted tiny Llama below differs by 2.2e-4 (bfloat16) and 5e-5 (float16); SmolLM2-135M
# (max length 256) by 4.5e-4 and 2e-4. The bounds leave 5-20x room, yet catch a log-softmax taken
# in the model's dtype (+1.0% in bfloat16, +0.13% in float16 on the tiny model).
HALF_PRECISION_RTOL = {"bfloat16": 2.5e-3, "float16": 1e-3}


@pytest.mark.parametrize("dtype", sorted(HALF_PRECISION_RTOL))
def test_half_precision_perplexity_is_close_to_float32(dtype):
    from conftest import DATA_DIR, PROMPT_WORDS, build_word_tokenizer
    from synthetic import plant_super_weight
    from synthetic import tiny_model as synthetic_model

    model = synthetic_model("llama")
    plant_super_weight(model, 1, 7, 13)  # a massive activation, as in real models
    half = copy.deepcopy(model).to(getattr(torch, dtype))
    tokenizer = build_word_tokenizer(PROMPT_WORDS)
    options = dict(data_dir=str(DATA_DIR), limit=1, max_length=64)
    with single_threaded():
        reference = evaluate(model, tokenizer, ["wikitext"], **options)["results"]["wikitext"]["word_perplexity"]
        got = evaluate(half, tokenizer, ["wikitext"], **options)
    assert got["config"]["model_dtype"] == dtype
    assert got["results"]["wikitext"]["word_perplexity"] == pytest.approx(reference, rel=HALF_PRECISION_RTOL[dtype])
