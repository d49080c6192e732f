"""Stop strings: the per-token automaton against hand-computed states and against searching the
text itself, and the token bytes of a real byte-level tokenizer."""

import jax.numpy as jnp
import numpy as np
import pytest

from grpo.models import loading
from grpo.phases.stop_strings import StopStrings, token_bytes

VOCAB = [b"</", b"answer", b">", b">\n", b"</answer>", b"x", b"", b"a", b"b", b"aa", b"ab"]


def _states(stop: StopStrings, tokens: list[int]) -> list[tuple[list[int], bool]]:
    states = jnp.zeros((1, len(stop.strings)), jnp.int32)
    seen = []
    for token in tokens:
        states, stopped = stop.advance(states, jnp.array([token]))
        seen.append((states[0].tolist(), bool(stopped[0])))
    return seen


def test_a_string_is_found_across_tokens_and_inside_one():
    stop = StopStrings.build(["</answer>"], VOCAB)
    # "</" + "answer" + ">\n": 2, then 8 bytes matched, then matched inside the last token.
    assert _states(stop, [0, 1, 3]) == [([2], False), ([8], False), ([9], True)]
    assert _states(stop, [4, 5]) == [([9], True), ([9], True)]  # whole, then stays found
    assert _states(stop, [0, 5, 6, 0]) == [([2], False), ([0], False), ([0], False), ([2], False)]
    assert stop.next_SxNxV.dtype == np.uint8 and stop.next_SxNxV.shape == (1, 10, len(VOCAB))


def test_overlapping_prefixes_fall_back_as_kmp_does():
    stop = StopStrings.build(["aab"], VOCAB)
    # a, a, a, b: the third a keeps "aa" matched, so the b completes "aab".
    assert [s for s, _ in _states(stop, [7, 7, 7, 8])] == [[1], [2], [2], [3]]
    assert _states(stop, [9, 10])[-1] == ([3], True)  # "aa" + "ab" = "aaab"
    assert _states(stop, [10, 8])[-1] == ([0], False)  # "abb"


def test_rows_stop_at_the_first_token_whose_text_holds_a_string():
    strings = ["</answer>", "aab", "b>"]
    stop = StopStrings.build(strings, VOCAB)
    rows = np.random.default_rng(0).integers(0, len(VOCAB), (500, 12))
    states = jnp.zeros((len(rows), len(strings)), jnp.int32)
    first = np.full(len(rows), -1)
    for j in range(rows.shape[1]):
        states, stopped = stop.advance(states, jnp.asarray(rows[:, j]))
        first = np.where((first < 0) & np.asarray(stopped), j, first)
    for row, got in zip(rows, first, strict=True):
        texts = [b"".join(VOCAB[t] for t in row[: j + 1]) for j in range(len(row))]
        found = [j for j, t in enumerate(texts) if any(s.encode() in t for s in strings)]
        assert got == (found[0] if found else -1), row
    assert (first >= 0).sum() > 100 and (first < 0).sum() > 10


def test_tables_compare_by_content_and_refuse_empty_strings():
    assert StopStrings.build(["ab"], VOCAB) == StopStrings.build(("ab",), list(VOCAB))
    assert hash(StopStrings.build(["ab"], VOCAB)) == hash(StopStrings.build(["ab"], VOCAB))
    assert StopStrings.build(["ab"], VOCAB) != StopStrings.build(["aab"], VOCAB)
    for bad in ([], [""], ["a", ""]):
        with pytest.raises(ValueError, match="stop strings must be non-empty strings"):
            StopStrings.build(bad, VOCAB)


def test_token_bytes_spell_what_the_tokenizer_decodes():
    tokenizer = loading.load_tokenizer(loading.SMOLLM2_NAME)
    spelled = token_bytes(tokenizer, len(tokenizer) + 3)  # a model vocabulary with spare ids
    assert len(spelled) == len(tokenizer) + 3 and spelled[-3:] == [b""] * 3
    text = "héllo wörld ✓ <answer>12,5</answer>\n\n中文"
    ids = [tokenizer.convert_tokens_to_ids("<|im_start|>")] + tokenizer.encode(text)
    assert b"".join(spelled[i] for i in ids).decode() == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    stop = StopStrings.build(["</answer>"], spelled)
    found = [stopped for _, stopped in _states(stop, ids)]
    first = found.index(True)
    assert tokenizer.decode(ids[: first + 1], skip_special_tokens=True).endswith("</answer>")
    assert not tokenizer.decode(ids[:first], skip_special_tokens=True).endswith("</answer>")
