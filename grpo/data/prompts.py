"""Questions -> prompt token ids, through the tokenizer's chat template.

A tokenizer with a chat template gets `[system?, user]` messages and the assistant turn opened
(`add_generation_prompt=True`), so the model continues as the assistant. A tokenizer without one
(a base model) gets plain text instead: the system prompt (if any) and a blank line, then
`"Question: <question>\\nAnswer:"`, encoded with the tokenizer's own special tokens (e.g. BOS).
With `chat_template=False` the question template alone is the prompt, whatever the tokenizer
has (a base model trained R1-Zero style, whose prompt spells out the reply's format).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# The usual GRPO GSM8K recipe: reasoning in <think>, the final number alone in <answer>.
SYSTEM_PROMPT = (
    "You solve math word problems. First reason step by step inside <think> </think> tags. "
    "Then give only the final number inside <answer> </answer> tags, for example: "
    "<think> 3 bags of 4 apples is 12 apples </think> <answer> 12 </answer>"
)


def build_messages(question: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """Chat messages for one question: an optional system turn, then the user turn."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": question}]


def plain_prompt(question: str, system_prompt: str | None = None) -> str:
    """The no-chat-template prompt text."""
    prefix = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{prefix}Question: {question}\nAnswer:"


QUESTION = "{question}"  # where a user-turn template puts the question


def check_question_template(template: str) -> None:
    """ValueError unless `template` holds `{question}` exactly once."""
    if template.count(QUESTION) != 1:
        raise ValueError(f"the question template must hold {QUESTION} once, got {template!r}")


def encode_prompts(
    tokenizer: Any,
    questions: Sequence[str],
    *,
    system_prompt: str | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
    question_template: str = QUESTION,
    chat_template: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[list[int]]:
    """Token ids of each question's prompt (chat template, else the plain fallback; with
    `chat_template=False`, the question template's text alone).

    `template_kwargs` are variables for the chat template, e.g. Qwen3's `enable_thinking`;
    `tools` the JSON schemas of functions the model may call, which the template renders.
    `question_template` is the user turn, the question where it says `{question}` (plain text
    otherwise, so LaTeX braces need no escaping), e.g. `"{question} Put your final answer
    within \\boxed{}."`."""
    check_question_template(question_template)
    questions = [question_template.replace(QUESTION, q) for q in questions]
    if not chat_template:
        if system_prompt is not None or template_kwargs or tools:
            raise ValueError(
                "a prompt without the chat template has no system turn, variables or tools"
            )
        return [as_token_ids(tokenizer.encode(q)) for q in questions]
    if getattr(tokenizer, "chat_template", None):
        return [
            as_token_ids(
                tokenizer.apply_chat_template(
                    build_messages(q, system_prompt),
                    tools=tools,
                    add_generation_prompt=True,
                    tokenize=True,
                    **(template_kwargs or {}),
                )
            )
            for q in questions
        ]
    if template_kwargs or tools:
        raise ValueError("chat template variables and tools need a chat template")
    return [as_token_ids(tokenizer.encode(plain_prompt(q, system_prompt))) for q in questions]


def as_token_ids(output: Any) -> list[int]:
    """A flat id list from what a tokenizer returned: a list, a batch of one, or (transformers
    5) a dict / BatchEncoding holding `input_ids`."""
    if isinstance(output, Mapping):
        output = output["input_ids"]
    ids = np.asarray(output)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"tokenizer returned {type(output).__name__} of shape {ids.shape}")
    return ids.tolist()
