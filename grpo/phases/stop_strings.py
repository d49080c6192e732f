"""Stop strings: a sampled row ends once its text contains one of them (say '</answer>', where a
base model would ramble on to the token budget), as vLLM's `stop` does.

Text arrives a token at a time inside the jitted decode loop, and a string may span tokens
(`</` + `answer` + `>`) or end inside one (`>\n`). So each string is a KMP automaton over bytes
whose state is how many of the string's bytes the text ends with, and its table is stepped a
whole token at a time: `next_SxNxV[s, state, token]` is string s's state after the token's
bytes, `len(s)` once the string has appeared (it stays there). One gather per string and
decode step; the tables are built on the host from each token id's bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class StopStrings:
    """The automata of `strings` over a vocabulary. Compared and hashed by content, so it can
    sit in the sampler's static config."""

    strings: tuple[str, ...]
    next_SxNxV: np.ndarray  # unsigned ints: the state after a token, per string and state
    lengths_S: np.ndarray  # int32: each string's byte length, its matched state
    digest: str

    @classmethod
    def build(cls, strings: Sequence[str], token_bytes: Sequence[bytes]) -> StopStrings:
        """The tables for `strings` over a vocabulary whose token id i adds `token_bytes[i]`
        to the text (b'' for a token the text leaves out, such as a special one)."""
        strings = tuple(strings)
        if not strings or not all(isinstance(s, str) and s for s in strings):
            raise ValueError(f"stop strings must be non-empty strings, got {strings!r}")
        patterns = [s.encode() for s in strings]
        longest = max(map(len, patterns))
        tables = np.zeros(
            (len(patterns), longest + 1, len(token_bytes)), np.min_scalar_type(longest)
        )
        for s, pattern in enumerate(patterns):
            tables[s, : len(pattern) + 1] = _token_transitions(pattern, token_bytes)
        digest = hashlib.sha256(repr(strings).encode() + tables.tobytes()).hexdigest()
        lengths = np.array(list(map(len, patterns)), np.int32)
        return cls(strings=strings, next_SxNxV=tables, lengths_S=lengths, digest=digest)

    @property
    def vocab_size(self) -> int:
        return self.next_SxNxV.shape[2]

    def advance(self, states_BxS: jax.Array, token_B: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(each row's states after its token, whether a string has appeared in the row)."""
        strings = jnp.arange(len(self.strings))[None, :]
        table = jnp.asarray(self.next_SxNxV)
        states_BxS = table[strings, states_BxS, token_B[:, None]].astype(jnp.int32)
        return states_BxS, (states_BxS == jnp.asarray(self.lengths_S)[None, :]).any(axis=1)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StopStrings) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)


def _byte_transitions(pattern: bytes) -> np.ndarray:
    """KMP's automaton: [state, byte] -> state, states 0..len(pattern), the last absorbing."""
    n = len(pattern)
    next_NxB = np.zeros((n + 1, 256), np.int64)
    next_NxB[0, pattern[0]] = 1
    fallback = 0  # the state the text would be in without its first byte
    for state in range(1, n):
        next_NxB[state] = next_NxB[fallback]
        next_NxB[state, pattern[state]] = state + 1
        fallback = next_NxB[fallback, pattern[state]]
    next_NxB[n] = n
    return next_NxB


def _token_transitions(pattern: bytes, token_bytes: Sequence[bytes]) -> np.ndarray:
    """[state, token] -> state after all of the token's bytes, stepping every token at once.
    Tokens go longest first, so byte j steps only the tokens that have one."""
    next_NxB = _byte_transitions(pattern)
    lengths = np.array([len(b) for b in token_bytes])
    order = np.argsort(-lengths, kind="stable")
    width = int(lengths.max(initial=0))
    bytes_VxL = np.zeros((len(token_bytes), width), np.uint8)
    for row, token in enumerate(order):
        bytes_VxL[row, : lengths[token]] = np.frombuffer(token_bytes[token], np.uint8)
    states_NxV = np.repeat(np.arange(len(pattern) + 1)[:, None], len(token_bytes), axis=1)
    for j in range(width):
        live = int((lengths > j).sum())  # the first `live` tokens in `order` have byte j
        states_NxV[:, :live] = next_NxB[states_NxV[:, :live], bytes_VxL[None, :live, j]]
    by_id = np.empty_like(states_NxV)
    by_id[:, order] = states_NxV
    return by_id


def token_bytes(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """What each token id adds to a reply's text as `sampling.decode` writes it (special tokens
    skipped): exact for byte-level BPE (Qwen, Llama 3, SmolLM2), whose pieces spell bytes;
    another piece decoded alone. Ids past the tokenizer's add nothing."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    count = min(len(tokenizer), vocab_size)
    added = tokenizer.added_tokens_decoder
    byte_of = (
        {char: byte for byte, char in bytes_to_unicode().items()} if _byte_level(tokenizer) else {}
    )
    out = []
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(count)))):
        if i in added:
            out.append(b"" if added[i].special else added[i].content.encode())
        elif byte_of and all(char in byte_of for char in piece):
            out.append(bytes(byte_of[char] for char in piece))
        else:
            out.append(tokenizer.decode([i], skip_special_tokens=True).encode())
    return out + [b""] * (vocab_size - count)


def _byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer decodes its pieces as GPT-2's byte alphabet (alone, or as one step
    of a sequence, as transformers 5.17 converts a GGUF tokenizer)."""
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    return any(step.get("type") == "ByteLevel" for step in decoder.get("decoders", [decoder]))
