"""--chat-template: the detection prompt wrapped in the tokenizer's chat template (instruct models)."""

import pytest

from conftest import PROMPT_WORDS, build_word_tokenizer
from superweight.errors import UsageError
from superweight.find.detect import DEFAULT_PROMPT, chat_prompt, detect, encode_prompt

TEMPLATE = "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s>{% endfor %}" \
           "{% if add_generation_prompt %} <s> assistant{% endif %}"


def test_a_tokenizer_without_a_chat_template_is_refused_in_one_line():
    tokenizer = build_word_tokenizer(PROMPT_WORDS)
    assert not tokenizer.chat_template
    with pytest.raises(UsageError) as error:
        encode_prompt(tokenizer, "Apple Inc. is a worldwide tech company .", chat_template=True)
    message = str(error.value)
    assert "\n" not in message and "has no chat template" in message and "drop --chat-template" in message
    assert encode_prompt(tokenizer, "Apple Inc. is a worldwide tech company .").shape[-1] == 8  # raw: unchanged


def test_the_prompt_is_wrapped_as_one_user_turn_with_the_assistant_turn_opened():
    tokenizer = build_word_tokenizer([*PROMPT_WORDS, "user", "assistant"])
    tokenizer.chat_template = TEMPLATE
    raw = encode_prompt(tokenizer, "Apple Inc. is a worldwide tech company .")
    wrapped = encode_prompt(tokenizer, "Apple Inc. is a worldwide tech company .", chat_template=True)
    words = tokenizer.convert_ids_to_tokens(wrapped[0].tolist())
    assert words == ["<s>", "user", *"Apple Inc. is a worldwide tech company .".split(), "</s>", "<s>", "assistant"]
    assert wrapped.shape[-1] == raw.shape[-1] + 5  # no special token added twice


@pytest.mark.integration
def test_smollm2_instruct_has_a_template_and_its_super_weight_is_found_through_it(smollm2):
    """The default model is SmolLM2-135M-Instruct: its tokenizer carries the ChatML template."""
    text = chat_prompt(smollm2.tokenizer, DEFAULT_PROMPT)
    assert text.count("<|im_start|>") == 3 and f"<|im_start|>user\n{DEFAULT_PROMPT}<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    ids = encode_prompt(smollm2.tokenizer, DEFAULT_PROMPT, chat_template=True)
    assert ids.shape[-1] > encode_prompt(smollm2.tokenizer, DEFAULT_PROMPT).shape[-1] + 10
    found = {w.key[:3] for w in detect(smollm2.model, ids, prompt=DEFAULT_PROMPT).super_weights}
    assert (11, 507, 1229) in found
