"""Prompt encoding through a small, self-built ChatML tokenizer (no files, no network)."""

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BatchEncoding, PreTrainedTokenizerFast

from grpo.data.prompts import SYSTEM_PROMPT, build_messages, encode_prompts, plain_prompt

_SPECIALS = ["<|im_start|>", "<|im_end|>"]
_WORDS = "system user assistant how many apples ? be brief Question Answer :".split()
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3's switch, in miniature: `enable_thinking=False` pre-fills part of the reply.
_CHATML_THINKING = _CHATML.replace(
    "assistant\n{% endif %}",
    "assistant\n{% if enable_thinking is defined and not enable_thinking %}Answer :{% endif %}"
    "{% endif %}",
)


def _tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["[UNK]", *_SPECIALS, *_WORDS])}
    model = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()  # drops the template's newlines
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, unk_token="[UNK]", additional_special_tokens=_SPECIALS
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def _ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(text.split())
    assert 0 not in ids, f"test vocabulary lacks a word of {text!r}"  # [UNK] would hide errors
    return ids


@pytest.fixture(scope="module")
def chatml():
    return _tokenizer(_CHATML)


def test_build_messages():
    assert build_messages("how many?") == [{"role": "user", "content": "how many?"}]
    assert build_messages("how many?", "be brief") == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "how many?"},
    ]


def test_chat_template_with_and_without_system_prompt(chatml):
    got = encode_prompts(chatml, ["how many apples?", "how many?"], system_prompt="be brief")
    system = "<|im_start|> system be brief <|im_end|> "
    assistant = " <|im_end|> <|im_start|> assistant"
    assert got == [
        _ids(chatml, system + "<|im_start|> user how many apples ?" + assistant),
        _ids(chatml, system + "<|im_start|> user how many ?" + assistant),
    ]
    assert encode_prompts(chatml, ["how many?"]) == [
        _ids(chatml, "<|im_start|> user how many ?" + assistant)
    ]


class _ReturnsAs:
    """The chatml tokenizer, with apply_chat_template's result rewrapped as other versions do."""

    def __init__(self, tokenizer, wrap):
        self.tokenizer, self.wrap = tokenizer, wrap
        self.chat_template = tokenizer.chat_template

    def apply_chat_template(self, messages, **kwargs):
        ids = self.tokenizer.apply_chat_template(messages, return_dict=False, **kwargs)
        return self.wrap(ids)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda ids: ids,  # transformers 4
        lambda ids: BatchEncoding({"input_ids": ids, "attention_mask": [1] * len(ids)}),  # 5
        lambda ids: {"input_ids": [ids]},  # a batch of one in a dict
        lambda ids: np.asarray([ids]),  # return_tensors="np" style
    ],
)
def test_chat_template_return_types(chatml, wrap):
    expected = _ids(chatml, "<|im_start|> user how many ? <|im_end|> <|im_start|> assistant")
    assert encode_prompts(_ReturnsAs(chatml, wrap), ["how many?"]) == [expected]


def test_unusable_return_is_rejected(chatml):
    with pytest.raises(ValueError, match="tokenizer returned"):
        encode_prompts(_ReturnsAs(chatml, lambda ids: [ids, ids]), ["how many?"])


def test_no_template_falls_back_to_plain_text():
    tokenizer = _tokenizer(None)
    assert plain_prompt("how many?") == "Question: how many?\nAnswer:"
    assert plain_prompt("how many?", "be brief") == "be brief\n\nQuestion: how many?\nAnswer:"
    assert encode_prompts(tokenizer, ["how many apples?"], system_prompt="be brief") == [
        _ids(tokenizer, "be brief Question : how many apples ? Answer :")
    ]


def test_system_prompt_asks_for_think_and_answer_tags():
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert tag in SYSTEM_PROMPT


def test_chat_template_variables_reach_the_template():
    tokenizer = _tokenizer(_CHATML_THINKING)
    prompt = "<|im_start|> user how many ? <|im_end|> <|im_start|> assistant"
    assert encode_prompts(tokenizer, ["how many?"]) == [_ids(tokenizer, prompt)]
    off = encode_prompts(tokenizer, ["how many?"], template_kwargs={"enable_thinking": False})
    assert off == [_ids(tokenizer, prompt + " Answer :")]


def test_tools_reach_the_template():
    # A template that names each tool first, as a tool-calling template lists their schemas.
    tokenizer = _tokenizer(
        "{% for t in tools or [] %}{{ t['function']['name'] }} {% endfor %}" + _CHATML
    )
    schema = {"type": "function", "function": {"name": "apples", "parameters": {}}}
    prompt = "<|im_start|> user how many ? <|im_end|> <|im_start|> assistant"
    assert encode_prompts(tokenizer, ["how many?"], tools=[schema]) == [
        _ids(tokenizer, "apples " + prompt)
    ]
    assert encode_prompts(tokenizer, ["how many?"]) == [_ids(tokenizer, prompt)]


@pytest.mark.parametrize(
    "extra", [dict(template_kwargs={"enable_thinking": False}), dict(tools=[{"type": "function"}])]
)
def test_chat_template_variables_or_tools_without_a_template_are_refused(extra):
    with pytest.raises(ValueError, match="need a chat template"):
        encode_prompts(_tokenizer(None), ["how many?"], **extra)


def test_question_template_wraps_the_user_turn(chatml):
    got = encode_prompts(chatml, ["how many ?"], question_template="Question : {question} be brief")
    assert got == [
        _ids(
            chatml,
            "<|im_start|> user Question : how many ? be brief <|im_end|> <|im_start|> assistant",
        )
    ]
    plain = _tokenizer(None)
    assert encode_prompts(plain, ["apples ?"], question_template="how many {question}") == [
        _ids(plain, "Question : how many apples ? Answer :")
    ]


def test_without_the_chat_template_the_question_template_is_the_prompt(chatml):
    template = "be brief : {question} Answer :"
    for tokenizer in (chatml, _tokenizer(None)):  # a template of its own or not
        got = encode_prompts(
            tokenizer, ["how many ?"], question_template=template, chat_template=False
        )
        assert got == [_ids(tokenizer, "be brief : how many ? Answer :")]
    for extra in (
        dict(system_prompt="be brief"),
        dict(template_kwargs={"enable_thinking": False}),
        dict(tools=[{"type": "function"}]),
    ):
        with pytest.raises(ValueError, match="without the chat template has no system turn"):
            encode_prompts(chatml, ["how many ?"], chat_template=False, **extra)


def test_question_template_keeps_braces_and_needs_one_placeholder():
    # LaTeX braces stay as written: the template is not a str.format pattern.
    tokenizer = _tokenizer(_CHATML)
    seen = []
    tokenizer.apply_chat_template = lambda messages, **kw: seen.append(messages) or [1]
    encode_prompts(tokenizer, ["x"], question_template="{question} Put it in \\boxed{}.")
    assert seen[0][-1]["content"] == "x Put it in \\boxed{}."
    for bad in ("no placeholder", "{question} and {question}"):
        with pytest.raises(ValueError, match="must hold {question} once"):
            encode_prompts(tokenizer, ["x"], question_template=bad)
