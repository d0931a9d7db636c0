"""`generate`: greedy continuations per configuration; the restoration hook acts with a KV cache."""

import pytest
import torch

from superweight.coords import SuperWeight
from superweight.errors import UsageError
from superweight.measure.configurations import Configuration, comparison_configurations
from superweight.measure.generate import DEFAULT_PROMPT, check_max_new_tokens, check_prompts, generate, greedy_continuation

from conftest import build_word_tokenizer
from synthetic import VOCAB, plant_super_weight, snapshot, tiny_model

PLANTED = SuperWeight(1, 7, 13)


@pytest.fixture(scope="module")
def planted():
    """A tiny Llama whose [1, 7, 13] is a genuine super weight (a spike at every token), and a
    word tokenizer that names every id of its vocabulary."""
    model = tiny_model("llama")
    plant_super_weight(model, 1, 7, 13, input_spike=100.0, weight=10.0)
    tokenizer = build_word_tokenizer([f"w{i}" for i in range(VOCAB - 3)])
    return model, tokenizer


PROMPT = "w10 w11 w12 w13 w14"


def _configurations():
    weights = (PLANTED,)
    return [Configuration("original"), Configuration("super weights zeroed", weights),
            Configuration("zeroed + activation restored", weights, restore_activation=True)]


def test_restoration_acts_on_every_new_token_with_the_kv_cache(planted):
    model, tokenizer = planted
    before = snapshot(model)
    cached = generate(model, tokenizer, _configurations(), [PROMPT], max_new_tokens=8)
    uncached = generate(model, tokenizer, _configurations(), [PROMPT], max_new_tokens=8, use_cache=False)
    tokens = {g.configuration: g.token_ids for g in cached}
    assert [g.token_ids for g in cached] == [g.token_ids for g in uncached]
    assert tokens["super weights zeroed"] != tokens["original"]  # the planted weight matters
    # the spike is at every position, new ones included: restored only in the prompt, the
    # continuation would drift from the original's
    assert tokens["zeroed + activation restored"] == tokens["original"]
    assert all(len(ids) >= 1 for ids in tokens.values())
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())  # undone bit-exactly


def test_generation_layout(planted):
    model, tokenizer = planted
    result = generate(model, tokenizer, _configurations(), [PROMPT, "w20 w21"], max_new_tokens=3)
    assert [(g.prompt, g.configuration) for g in result] == [
        (p, c.name) for p in (PROMPT, "w20 w21") for c in _configurations()]
    for g in result:
        assert 1 <= len(g.token_ids) <= 3
        assert g.text == tokenizer.decode(g.token_ids, skip_special_tokens=True)
        assert g.to_dict()["token_ids"] == g.token_ids


def test_greedy_stops_at_end_of_sequence(planted):
    model, tokenizer = planted
    first = greedy_continuation(model, tokenizer, PROMPT, 1)[0]
    eos = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = first
        assert greedy_continuation(model, tokenizer, PROMPT, 5) == [first]
    finally:
        model.generation_config.eos_token_id = eos


def test_prompt_and_continuation_past_a_gpt2_context_are_refused_before_decoding():
    """64 learned positions: 60 prompt tokens + 5 new ones use all 64 (the last is never fed back);
    one more token, or a prompt past 64, is refused in one line (before: an IndexError)."""
    model = tiny_model("gpt2")
    tokenizer = build_word_tokenizer([f"w{i}" for i in range(VOCAB - 3)])
    prompt = " ".join(f"w{i}" for i in range(60))
    [fits] = generate(model, tokenizer, [Configuration("original")], [prompt], max_new_tokens=5)
    assert len(fits.token_ids) == 5
    with pytest.raises(UsageError, match="the prompt is 60 tokens and --max-new-tokens 6; this model reads at most 64; "
                                         "give at most 5 --max-new-tokens"):
        generate(model, tokenizer, [Configuration("original")], [prompt], max_new_tokens=6)
    with pytest.raises(UsageError, match="the prompt is 70 tokens; this model reads at most 64"):
        generate(model, tokenizer, [Configuration("original")], [" ".join(f"w{i}" for i in range(70))], max_new_tokens=1)


@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_max_new_tokens_must_be_positive(bad):
    with pytest.raises(UsageError, match="--max-new-tokens"):
        check_max_new_tokens(bad)


@pytest.mark.parametrize("prompts", [[""], ["  \n"], [DEFAULT_PROMPT, ""]])
def test_empty_prompt_is_refused(prompts):
    with pytest.raises(UsageError, match="empty"):
        check_prompts(prompts)


def test_default_prompt_is_the_papers():
    assert check_prompts(None) == ["My favourite condiment is"]


@pytest.mark.integration
def test_smollm2_generations_side_by_side(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    weights = [SuperWeight(11, 507, 1229), SuperWeight(11, 507, 1487)]
    configurations = comparison_configurations(model, weights, control=None, seed=0, top=None)
    before = snapshot(model)
    cached = generate(model, tokenizer, configurations, max_new_tokens=6)
    texts = {g.configuration: g.text for g in cached}
    # rows named by what they zeroed: two weights given by coordinate (no measured role), and as many random ones
    assert list(texts) == ["original", "2 weights zeroed", "2 weights zeroed + activation restored",
                           "2 random weights zeroed"]
    assert texts["original"].startswith(" often a blend of spices")  # measured, docs/benchmarks.md
    assert texts["2 weights zeroed"] != texts["original"]
    assert texts["2 weights zeroed + activation restored"] == texts["original"]
    restored = configurations[2:3]
    uncached = generate(model, tokenizer, restored, max_new_tokens=6, use_cache=False)
    assert uncached[0].token_ids == cached[2].token_ids
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())


# ----------------------------------------------------------------------------- CLI


def test_cli_generate_json_and_table(tiny_llama_dir):
    from test_cli import invoke

    import json

    result = invoke("generate", tiny_llama_dir, "--coord", "1,3,5", "--prompt", "Apple Inc. is", "--prompt",
                    "the of", "--max-new-tokens", "2", "--json", "-q")
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["max_new_tokens"] == 2 and document["decoding"] == "greedy"
    names = [c["name"] for c in document["configurations"]]
    assert names == ["original", "weight [1, 3, 5] zeroed", "weight [1, 3, 5] zeroed + activation restored",
                     "1 random weight zeroed"]
    assert [c["kind"] for c in document["configurations"]] == ["unchanged", "ablated", "restored", "control"]
    assert [(g["prompt"], g["configuration"]) for g in document["generations"]] == [
        (p, n) for p in ("Apple Inc. is", "the of") for n in names]
    assert all(1 <= len(g["token_ids"]) <= 2 for g in document["generations"])

    table = invoke("generate", tiny_llama_dir, "--coord", "1,3,5", "--max-new-tokens", "1", "-q")
    assert table.exit_code == 0, table.output
    assert "condiment is" in table.output and "weight [1, 3, 5] zeroed + activation restored" in table.output


@pytest.mark.parametrize("args, fragment, code", [
    (("--max-new-tokens", "0"), "--max-new-tokens must be a positive", 2),
    (("--prompt", ""), "--prompt is empty", 2),
    (("--prompt", "ok", "--prompt", "   "), "--prompt is empty", 2),
    (("--coord", "99,0,0"), "layer 99 is out of range", 1),
    (("--coord", "1,3"), "bad coordinate", 2),  # bad option syntax: a usage error
])
def test_cli_generate_bad_input_is_one_line(tiny_llama_dir, args, fragment, code):
    from test_cli import assert_one_line_error, invoke

    result = invoke("generate", tiny_llama_dir, *(("--coord", "1,3,5") if "--coord" not in args else ()), *args, "-q")
    assert_one_line_error(result, fragment)
    assert result.exit_code == code


def test_candidates_of_a_model_verification_calls_broken_are_not_blamed_on_a_file(byte_llama_dir):
    """Without coordinates, a model whose verification gives no roles (this random tiny model reads
    prose far above perplexity 1000) has every candidate taken; the note says why, and does not
    tell the reader to remake a coordinates file with `sw detect --verify` (there is none)."""
    from test_cli import invoke

    result = invoke("generate", byte_llama_dir, "--prompt", "Apple Inc. is", "--max-new-tokens", "1", "--json")
    assert result.exit_code == 0, result.output
    [note] = [line for line in result.output.splitlines() if line.startswith("note: acting on")]
    assert "of the detection: verification gave no roles" in note and "sw detect --verify" not in note
