"""Rollout phase: parity with transformers' greedy generate and with the trainer's log-probs,
first-token sampling statistics, end tokens, sharding, and compile-count bucketing."""

import dataclasses
import functools
import re

import jax
import numpy as np
import pytest
import scipy.special
import scipy.stats

from grpo import sharding
from grpo.models import loading, presets
from grpo.models import transformer as tf
from grpo.phases import rollout as ro
from grpo.phases.stop_strings import StopStrings
from grpo.types import Rollout
from tests.models.jaxpr_utils import all_eqns

CONFIG = presets.preset("tiny-qwen2", dtype="float32")
PROMPTS = [[5, 17, 3], [9, 8, 7, 6, 5, 4, 3], [42], [11, 12, 13, 14, 15]]  # mixed lengths
BUCKETS = (8, 16)
# One id in eight ends a sequence, so completions stop at mixed lengths; pad 0 is an end id too.
END_IDS = tuple(range(0, CONFIG.vocab_size, 8))
WIDTH = 8


def _sampling(**overrides) -> ro.SamplingConfig:
    kwargs = dict(max_new_tokens=WIDTH, end_ids=END_IDS, pad_id=0)
    return ro.SamplingConfig(**{**kwargs, **overrides})


GREEDY = _sampling(temperature=0.0)
# Greedy with an end id the tiny model's greedy path never emits (checked where used).
GREEDY_NO_END = _sampling(temperature=0.0, end_ids=(2,), pad_id=1)


@pytest.fixture(scope="module")
def params():
    # std 0.3 gives peaked but not degenerate next-token distributions (top prob ~0.2-0.4).
    return tf.init_params(CONFIG, jax.random.key(0), std=0.3)


@pytest.fixture(scope="module")
def prompts():
    return ro.pad_prompts(PROMPTS, pad_id=0, buckets=BUCKETS)


def _generate(params, prompts, sampling, seed=1, num_samples=2, config=CONFIG, mesh=None):
    tokens, mask = prompts
    rollout = ro.generate(
        params,
        tokens,
        mask,
        jax.random.key(seed),
        model=config,
        sampling=sampling,
        num_samples=num_samples,
        mesh=mesh,
    )
    return jax.tree.map(np.asarray, rollout)


_completion_logprobs = jax.jit(
    tf.completion_logprobs, static_argnames=("config", "temperature", "chunk")
)


# ----------------------------------------------------------------------------- host helpers


def test_pad_prompts_left_pads_to_bucket():
    tokens, mask = ro.pad_prompts([[7, 8], [1, 2, 3, 4, 5]], pad_id=9, buckets=[8, 4])
    np.testing.assert_array_equal(tokens, [[9, 9, 9, 9, 9, 9, 7, 8], [9, 9, 9, 1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(mask, tokens != 9)
    assert tokens.dtype == np.int32 and mask.dtype == np.bool_


@pytest.mark.parametrize(
    "ids, message", [([[1] * 9], "exceeds the largest bucket 8"), ([[1], []], "prompt 1 is empty")]
)
def test_pad_prompts_rejects(ids, message):
    with pytest.raises(ValueError, match=message):
        ro.pad_prompts(ids, pad_id=0, buckets=[4, 8])


@pytest.mark.parametrize(
    "lengths, buckets, expected_width",
    [([2, 5], (4, 8), 8), ([9, 1], (4, 8), 12), ([3, 4], (4, 32), 4), ([12], (16,), 12)],
)
def test_trim_completions_cuts_to_bucket(lengths, buckets, expected_width):
    width = 12
    mask = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
    tokens = np.where(mask, np.arange(1, width + 1), 0).astype(np.int32)
    rollout = Rollout(
        prompt_tokens_BxP=np.ones((len(lengths), 3), np.int32),
        prompt_mask_BxP=np.ones((len(lengths), 3), bool),
        completion_tokens_BxC=tokens,
        completion_mask_BxC=mask,
        logps_BxC=np.where(mask, -1.0, 0.0).astype(np.float32),
        lengths_B=np.asarray(lengths, np.int32),
        truncated_B=np.zeros(len(lengths), bool),
    )
    trimmed = ro.trim_completions(rollout, buckets)
    assert trimmed.completion_tokens_BxC.shape == (len(lengths), expected_width)
    np.testing.assert_array_equal(trimmed.completion_tokens_BxC, tokens[:, :expected_width])
    np.testing.assert_array_equal(trimmed.completion_mask_BxC.sum(1), lengths)
    np.testing.assert_array_equal(trimmed.prompt_tokens_BxP, rollout.prompt_tokens_BxP)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(end_ids=()), "end_ids must name"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(temperature=0.0, top_p=0.9), "temperature=0 is greedy"),
        (dict(temperature=0.0, min_p=0.1), "temperature=0 is greedy"),
        (dict(min_p=1.0), "min_p must be in"),
        (dict(min_p=-0.1), "min_p must be in"),
        (dict(decode_segments=0), "decode_segments must be >= 1"),
        (dict(compact_rows=True), "set decode_segments > 1"),
        (dict(compact_rows=True, decode_segments=2, shared_prompt_decode=True), "pick one"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    ],
)
def test_sampling_config_rejects(overrides, message):
    with pytest.raises(ValueError, match=message):
        _sampling(**overrides)


def test_generate_rejects_out_of_vocab_end_id(params, prompts):
    with pytest.raises(ValueError, match=r"end/pad ids \[128\] outside the vocabulary"):
        _generate(params, prompts, _sampling(end_ids=(1, CONFIG.vocab_size)))


# ----------------------------------------------------------------------------- log-probs


def _assert_logps_recomputed(params, rollout: Rollout, temperature: float) -> None:
    """The sampler's recorded log-probs equal the trainer's recomputation on every real token."""
    logps, _ = _completion_logprobs(
        params,
        rollout.prompt_tokens_BxP,
        rollout.prompt_mask_BxP,
        rollout.completion_tokens_BxC,
        rollout.completion_mask_BxC,
        config=CONFIG,
        temperature=temperature,
    )
    expected = np.where(rollout.completion_mask_BxC, logps, 0.0)
    np.testing.assert_allclose(rollout.logps_BxC, expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    "sampling",
    [_sampling(temperature=1.0), _sampling(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05)],
    ids=["T1", "T0.7-topk-topp"],
)
def test_logps_equal_trainer_recomputation(params, prompts, sampling):
    rollout = _generate(params, prompts, sampling)
    assert len(set(rollout.lengths_B.tolist())) > 2, "want mixed completion lengths"
    np.testing.assert_array_equal(rollout.prompt_mask_BxP.sum(1), np.repeat([3, 7, 1, 5], 2))
    _assert_logps_recomputed(params, rollout, sampling.logp_temperature)
    assert rollout.logps_BxC.dtype == np.float32


def test_fixed_key_reproduces_and_other_key_differs(params, prompts):
    first = _generate(params, prompts, _sampling(), seed=1)
    again = _generate(params, prompts, _sampling(), seed=1)
    other = _generate(params, prompts, _sampling(), seed=2)
    jax.tree.map(np.testing.assert_array_equal, first, again)
    assert (first.completion_tokens_BxC != other.completion_tokens_BxC).any()
    # Samples of one prompt draw independently.
    assert (first.completion_tokens_BxC[0::2] != first.completion_tokens_BxC[1::2]).any()


@pytest.mark.parametrize("decode", ["copied", "shared"])
def test_shared_prefill_equals_prefilling_every_copy(params, prompts, decode):
    # num_samples=3 prefills each prompt once, and copies its cache per sample or (shared) has
    # every decode step read it once for the three; the same key over the prompts repeated on
    # the host (one prefill per row) must sample the same completions.
    sampling = _sampling(shared_prompt_decode=decode == "shared")
    shared = _generate(params, prompts, sampling, num_samples=3)
    repeated = tuple(np.repeat(x, 3, axis=0) for x in prompts)
    per_row = _generate(params, repeated, _sampling(), num_samples=1)
    np.testing.assert_array_equal(shared.completion_tokens_BxC, per_row.completion_tokens_BxC)
    np.testing.assert_array_equal(shared.prompt_tokens_BxP, per_row.prompt_tokens_BxP)
    np.testing.assert_allclose(shared.logps_BxC, per_row.logps_BxC, atol=1e-5, rtol=0)
    # What the decode loop carries per layer: each row's prompt and completion slots, or (shared)
    # the completion's alone.
    tokens, mask = prompts
    generate = functools.partial(
        ro._generate, model=CONFIG, sampling=sampling, num_samples=3, mesh=None
    )
    jaxpr = str(jax.make_jaxpr(generate)(params, tokens, mask, jax.random.key(1)))
    rows, kv = 3 * len(tokens), f"{CONFIG.num_kv_heads},{CONFIG.head_dim}]"
    carried = {
        slots for slots in (WIDTH, tokens.shape[1] + WIDTH) if f"f32[{rows},{slots},{kv}" in jaxpr
    }
    assert carried == {WIDTH if decode == "shared" else tokens.shape[1] + WIDTH}


def test_decode_segments_sample_the_same_completions(params, prompts):
    # Three loops, each attending to a longer prefix of the cache (the slots filled so far):
    # masked-out slots had weight 0, so the same key gives the same completions (log-probs to
    # float rounding: softmax sums over fewer terms).
    segmented = _sampling(decode_segments=3)
    assert ro.segment_ends(WIDTH, 3) == [3, 6, 8]
    tokens, mask = prompts
    jaxpr = jax.make_jaxpr(
        lambda p: ro._generate(
            p,
            tokens,
            mask,
            jax.random.key(1),
            model=CONFIG,
            sampling=segmented,
            num_samples=2,
            mesh=None,
        )  # fmt: skip
    )(params)
    assert str(jaxpr).count(" while[") == 3
    # Each loop carries a cache of the slots filled by its segment's end: none attends to a
    # prefix sliced out of a longer cache (XLA's GPU compile copied such slices every step).
    cache_shape = lambda slots: (2 * len(tokens), slots, CONFIG.num_kv_heads, CONFIG.head_dim)
    carried = [
        [v.aval.shape for v in eqn.invars if v.aval.ndim == 4]
        for eqn in all_eqns(jaxpr.jaxpr)
        if eqn.primitive.name == "while"
    ]
    layers = 2 * CONFIG.num_layers  # keys and values
    assert carried == [[cache_shape(tokens.shape[1] + end)] * layers for end in (3, 6, 8)]
    split = _generate(params, prompts, segmented)
    whole = _generate(params, prompts, _sampling())
    assert len(set(whole.lengths_B.tolist())) > 2, "want completions ending in every segment"
    np.testing.assert_array_equal(split.completion_tokens_BxC, whole.completion_tokens_BxC)
    np.testing.assert_allclose(split.logps_BxC, whole.logps_BxC, atol=1e-5, rtol=0)  # ulps


# Sixteen rows, and one id in four ends a row: most rows end early, a few run on (a long tail).
TAIL_PROMPTS = ro.pad_prompts(
    [
        list(np.random.default_rng(row).integers(1, CONFIG.vocab_size, 1 + row % 7))
        for row in range(16)
    ],
    pad_id=0,
    buckets=BUCKETS,
)
TAIL_ENDS = tuple(range(0, CONFIG.vocab_size, 4))


def _tail_sampling(**overrides) -> ro.SamplingConfig:
    return _sampling(end_ids=TAIL_ENDS, decode_segments=4, **overrides)  # segments end at 2 4 6 8


def _live_rows_BxSeg(rollout: Rollout) -> np.ndarray:
    """Which rows still decode as each segment after the first starts (at steps 2, 4, 6)."""
    return np.asarray(rollout.lengths_B)[:, None] > np.array([2, 4, 6])


def test_compacted_decode_gives_the_greedy_tokens(params):
    plain = _generate(params, TAIL_PROMPTS, _tail_sampling(temperature=0.0), num_samples=1)
    compact = _tail_sampling(temperature=0.0, compact_rows=True)
    compacted = _generate(params, TAIL_PROMPTS, compact, num_samples=1)
    # The tail the test needs: half the rows or fewer decode into the second segment, and one or
    # two into the last (it runs on an eighth of the rows). Another tail? Change TAIL_PROMPTS.
    live = _live_rows_BxSeg(plain).sum(0)
    assert live[0] <= 8 and 0 < live[-1] <= 2, live
    for field in ("completion_tokens_BxC", "completion_mask_BxC", "lengths_B", "truncated_B"):
        np.testing.assert_array_equal(getattr(compacted, field), getattr(plain, field), field)
    np.testing.assert_allclose(compacted.logps_BxC, plain.logps_BxC, atol=1e-5, rtol=0)
    # Each later segment switches between loops over 16, 8, 4 and 2 rows.
    generate = functools.partial(
        ro._generate, model=CONFIG, sampling=compact, num_samples=1, mesh=None
    )
    jaxpr = jax.make_jaxpr(generate)(params, *TAIL_PROMPTS, jax.random.key(1))
    loop_rows = [
        {v.aval.shape[0] for v in eqn.invars if v.aval.ndim == 4}
        for eqn in all_eqns(jaxpr.jaxpr)
        if eqn.primitive.name == "while"
    ]
    assert sorted(rows for (rows,) in loop_rows) == [2] * 3 + [4] * 3 + [8] * 3 + [16] * 4


def test_compacted_decode_records_the_trainers_logps(params):
    # Sampled: the rows moved to the front decode from their own cache, at their own positions.
    rollout = _generate(params, TAIL_PROMPTS, _tail_sampling(compact_rows=True), num_samples=1)
    assert _live_rows_BxSeg(rollout).sum(0)[-1] <= 4, "want the last segment compacted"
    _assert_logps_recomputed(params, rollout, temperature=1.0)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_ids():
    logits = np.array([[2.0, 1.9, -1.0, -3.0], [-1.0, -1.2, -5.0, -6.0]], np.float32)
    seen = np.array([[True, False, False, False], [True, False, False, True]])
    penalized = _sampling(temperature=0.0, repetition_penalty=1.5)
    token, logp, _ = ro.sample_tokens(logits, jax.random.key(0), penalized, seen)
    # Row 0: 2.0 / 1.5 = 1.33 < 1.9; row 1: -1.0 * 1.5 = -1.5 < -1.2. Each keeps the model's
    # own log-prob of what it drew.
    np.testing.assert_array_equal(token, [1, 1])
    np.testing.assert_allclose(logp, scipy.special.log_softmax(logits, axis=1)[:, 1], rtol=1e-6)
    assert ro.sample_tokens(logits, jax.random.key(0), GREEDY)[0].tolist() == [0, 0]
    # Sampled at T = 2: the penalty acts on the tempered logits, drawing token 0 of row 0 with
    # probability softmax([1.0 / 1.5, 0.95, -0.5, -1.5])[0], and records log softmax(x / 2).
    hot = _sampling(temperature=2.0, repetition_penalty=1.5)
    keys = jax.random.split(jax.random.key(1), 4000)
    draw = jax.vmap(lambda k: ro.sample_tokens(logits[:1], k, hot, seen[:1]))
    tokens, logps, _ = draw(keys)
    expected = scipy.special.softmax([1.0 / 1.5, 0.95, -0.5, -1.5])
    counts = np.bincount(np.asarray(tokens).ravel(), minlength=4)
    assert scipy.stats.chisquare(counts, expected * len(keys)).pvalue > 1e-3, counts
    tempered = scipy.special.log_softmax(logits[0] / 2.0)
    np.testing.assert_allclose(logps[:, 0], tempered[np.asarray(tokens)[:, 0]], rtol=1e-5)


def test_ids_seen_holds_each_rows_real_prompt_ids_not_its_padding():
    tokens = np.array([[0, 0, 5, 7], [3, 3, 3, 9]], np.int32)
    mask = np.array([[False, False, True, True], [True, True, True, True]])
    seen = ro._ids_seen(tokens, mask, 10, _sampling(repetition_penalty=1.2), mesh=None)
    assert [np.flatnonzero(row).tolist() for row in np.asarray(seen)] == [[5, 7], [3, 9]]
    assert ro._ids_seen(tokens, mask, 10, _sampling(), mesh=None).shape == (2, 0)


def test_repetition_penalty_samples_and_records_the_trainers_logps(params, prompts):
    plain = _generate(params, prompts, _sampling(temperature=0.0), num_samples=1)
    penalized = _sampling(temperature=0.0, repetition_penalty=5.0)
    rollout = _generate(params, prompts, penalized, num_samples=1)
    assert (rollout.completion_tokens_BxC != plain.completion_tokens_BxC).any()
    _assert_logps_recomputed(params, rollout, temperature=1.0)
    sampled = _generate(params, prompts, _sampling(repetition_penalty=5.0))
    _assert_logps_recomputed(params, sampled, temperature=1.0)
    # The prompt's real ids count as seen, its padding not: a prompt holding the id its greedy
    # reply starts with starts elsewhere when penalized.
    first = plain.completion_tokens_BxC[:, 0]
    echo = [[int(t), *p] for t, p in zip(first, PROMPTS, strict=True)]
    echo_prompts = ro.pad_prompts(echo, pad_id=0, buckets=BUCKETS)
    echo_plain = _generate(params, echo_prompts, _sampling(temperature=0.0), num_samples=1)
    echo_first = echo_plain.completion_tokens_BxC[:, 0]
    echoed = [row for row, prompt in enumerate(echo) if echo_first[row] in prompt]
    assert echoed, "want a prompt whose greedy reply starts with one of its ids"
    echo_penalized = _generate(params, echo_prompts, penalized, num_samples=1)
    for row in echoed:
        assert echo_penalized.completion_tokens_BxC[row, 0] not in echo[row], row
    # Segments, compacted or not, carry what each row has seen.
    for decode in (dict(decode_segments=3), dict(decode_segments=3, compact_rows=True)):
        split = _generate(params, prompts, dataclasses.replace(penalized, **decode), num_samples=1)
        np.testing.assert_array_equal(split.completion_tokens_BxC, rollout.completion_tokens_BxC)


def test_top_k_one_is_greedy(params, prompts):
    greedy = _generate(params, prompts, GREEDY, num_samples=1)
    top1 = _generate(params, prompts, _sampling(temperature=1.0, top_k=1), num_samples=1)
    jax.tree.map(np.testing.assert_array_equal, greedy, top1)


# ----------------------------------------------------------------------------- statistics

NUM_DRAWS = 8192
STAT_PROMPT = [3, 1, 4, 1, 5]


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic, pooling categories expected fewer than 5 times into one bin."""
    expected = probs * counts.sum()
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    stat = np.sum((observed[keep] - expected[keep]) ** 2 / expected[keep])
    return float(stat), int(keep.sum() - 1)


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The renormalised top-p distribution (smallest prefix by probability with mass >= top_p)."""
    order = np.argsort(-probs, kind="stable")
    mass_before = np.cumsum(probs[order]) - probs[order]
    kept = np.zeros_like(probs)
    kept[order[mass_before < top_p]] = probs[order[mass_before < top_p]]
    return kept / kept.sum()


def _min_p(probs: np.ndarray, min_p: float) -> np.ndarray:
    """The renormalised distribution over tokens at least min_p times as likely as the top one."""
    kept = np.where(probs >= min_p * probs.max(), probs, 0.0)
    return kept / kept.sum()


@pytest.mark.parametrize(
    "temperature, top_p, min_p",
    [(0.7, 1.0, 0.0), (1.3, 0.8, 0.0), (1.3, 1.0, 0.3), (1.3, 0.8, 0.3)],
)
def test_first_token_frequencies_follow_softmax(params, temperature, top_p, min_p):
    sampling = _sampling(max_new_tokens=1, temperature=temperature, top_p=top_p, min_p=min_p)
    prompt = (np.asarray([STAT_PROMPT], np.int32), np.ones((1, len(STAT_PROMPT)), bool))
    rollout = _generate(params, prompt, sampling, num_samples=NUM_DRAWS)
    counts = np.bincount(rollout.completion_tokens_BxC[:, 0], minlength=CONFIG.vocab_size)

    hidden, _ = tf.forward(
        params, prompt[0], tf.positions_from_mask(prompt[1]), prompt[1], config=CONFIG
    )
    logits = np.asarray(tf.logits(params, hidden[:, -1:], config=CONFIG)[0, 0], np.float64)
    tempered = scipy.special.softmax(logits / temperature)
    expected = _nucleus(_min_p(tempered, min_p), top_p)  # min_p first, as the sampler
    # A correct sampler fails this with probability 1e-6 (Pearson's chi-square, pooled bins).
    stat, dof = _chi_square(counts, expected)
    assert stat < scipy.stats.chi2.isf(1e-6, dof), (stat, dof)
    assert counts[expected == 0].sum() == 0, "sampled outside the kept tokens"
    # ...and the same check rejects the untempered / untruncated distribution (the test has power).
    baseline = scipy.special.softmax(logits) if top_p == 1 and not min_p else tempered
    wrong_stat, wrong_dof = _chi_square(counts, baseline)
    assert wrong_stat > scipy.stats.chi2.isf(1e-6, wrong_dof), (wrong_stat, wrong_dof)


# ----------------------------------------------------------------------------- end tokens


def test_end_tokens_mask_pad_and_flag_truncation(params, prompts):
    free = _generate(params, prompts, GREEDY_NO_END, num_samples=1)
    free_tokens = free.completion_tokens_BxC
    assert not np.isin(free_tokens, GREEDY_NO_END.end_ids).any(), "pick a never-emitted end id"
    assert (
        free.truncated_B.all()
        and (free.lengths_B == WIDTH).all()
        and free.completion_mask_BxC.all()
    )

    # Two end ids emitted mid-way by greedy decoding; pad equals one of them (as in Qwen).
    ends = (int(free_tokens[0, 2]), int(free_tokens[3, 4]))
    ended = _generate(
        params, prompts, _sampling(temperature=0.0, end_ids=ends, pad_id=ends[1]), num_samples=1
    )
    is_end = np.isin(free_tokens, ends)
    has_end = is_end.any(1)
    assert has_end.any() and not has_end.all(), "want both ended and truncated rows"
    lengths = np.where(has_end, is_end.argmax(1) + 1, WIDTH)
    mask = np.arange(WIDTH)[None, :] < lengths[:, None]
    np.testing.assert_array_equal(ended.lengths_B, lengths)
    np.testing.assert_array_equal(ended.truncated_B, ~has_end)
    np.testing.assert_array_equal(ended.completion_mask_BxC, mask)
    np.testing.assert_array_equal(ended.completion_tokens_BxC, np.where(mask, free_tokens, ends[1]))
    np.testing.assert_array_equal(ended.logps_BxC, np.where(mask, free.logps_BxC, 0.0))
    assert (ended.logps_BxC[mask] < 0).all()


@pytest.mark.parametrize(
    "sampling",
    [GREEDY_NO_END, dataclasses.replace(GREEDY_NO_END, decode_segments=4, compact_rows=True)],
    ids=["one-loop", "compacted"],
)
def test_row_budgets_cut_rows_and_a_zero_budget_samples_nothing(params, prompts, sampling):
    free = _generate(params, prompts, GREEDY_NO_END, num_samples=1)
    budget = np.array([0, 3, WIDTH, 5], np.int32)
    run = functools.partial(
        ro.generate, params, *prompts, jax.random.key(1), model=CONFIG, num_samples=1
    )
    cut = jax.tree.map(np.asarray, run(sampling=sampling, budget_B=budget))
    kept = np.arange(WIDTH)[None, :] < budget[:, None]
    np.testing.assert_array_equal(cut.lengths_B, budget)
    np.testing.assert_array_equal(cut.completion_mask_BxC, kept)
    np.testing.assert_array_equal(
        cut.completion_tokens_BxC, np.where(kept, free.completion_tokens_BxC, sampling.pad_id)
    )
    np.testing.assert_allclose(cut.logps_BxC, np.where(kept, free.logps_BxC, 0.0), atol=1e-5)
    assert cut.truncated_B.all()  # no end token: every row stopped at its budget

    # A row that ends before its budget ends there, not truncated.
    end = int(free.completion_tokens_BxC[1, 1])
    ended = run(sampling=dataclasses.replace(sampling, end_ids=(end,)), budget_B=budget)
    assert int(ended.lengths_B[1]) == 2 and not bool(ended.truncated_B[1])
    with pytest.raises(
        ValueError, match=re.escape("budget_B has shape (3,), the output rows (4,)")
    ):
        run(sampling=sampling, budget_B=budget[:3])


# What the host appends to each prompt's two rows after the first round (say, a tool's result).
APPENDED = [[7, 30], [44, 45, 46], [21], [11, 10]]
ROUND_BUDGETS = (np.full(8, 3, np.int32), np.array([4, 4, 4, 0, 4, 2, 4, 4], np.int32))


def _rounds(params, prompts, sampling, mesh=None, placed=None):
    """Two rounds: 2 samples of at most 3 tokens per prompt, then each row on after APPENDED;
    both rollouts and the contexts, on the host."""
    tokens, mask = prompts
    run = functools.partial(ro.generate_in_rounds, model=CONFIG, sampling=sampling, mesh=mesh)
    if mesh is not None:
        params, tokens, mask, _ = _on_mesh(mesh, params, prompts)
    first, context = run(
        params, tokens, mask, jax.random.key(1), num_samples=2, budget_B=ROUND_BUDGETS[0]
    )
    # Each row's last token (not in its context), then what is appended.
    tokens_BxC, lengths_B = np.asarray(first.completion_tokens_BxC), np.asarray(first.lengths_B)
    last = [int(tokens_BxC[i, lengths_B[i] - 1]) for i in range(8)]
    appended = [[last[i], *APPENDED[i // 2]] for i in range(8)]
    window = ro.pad_prompts(appended, pad_id=0, buckets=(4,))
    if mesh is not None:
        window = sharding.shard_batch(mesh, window)
    context_on_host = jax.tree.map(np.asarray, context)
    second, after = run(
        params, *window, jax.random.key(2), num_samples=1, budget_B=ROUND_BUDGETS[1],
        context=context,
    )  # fmt: skip
    return [jax.tree.map(np.asarray, x) for x in (first, context_on_host, second, after)]


@pytest.mark.parametrize(
    "decode",
    [
        {},
        dict(shared_prompt_decode=True),
        dict(decode_segments=3, compact_rows=True),
        dict(repetition_penalty=3.0),
    ],
    ids=str,
)
def test_a_round_on_a_context_samples_as_a_prefill_of_all_before_it(params, prompts, decode):
    # The second round reads each row's keys and values from the first's context and computes
    # only the appended tokens'; greedy, it must sample what a fresh prefill of the whole text
    # (prompt, first round, appended) samples, the log-probs to float rounding. The context's
    # slots (prompt bucket 8 + budget 8) bound each row: a row with 13 tokens before its second
    # round samples 3 at most, whatever its budget.
    # Greedy, 9 ends the rows of the first prompt after one token and of the third after two,
    # while the others run on: their contexts must drop what the loop fed after their end.
    sampling = _sampling(temperature=0.0, end_ids=(*END_IDS, 9), **decode)
    first, context, second, after = _rounds(params, prompts, sampling)
    np.testing.assert_array_equal(first.lengths_B, [1, 1, 3, 3, 2, 2, 3, 3])
    tokens, mask = prompts
    so_far = [
        tokens[i // 2][mask[i // 2]].tolist()
        + first.completion_tokens_BxC[i, : first.lengths_B[i]].tolist()
        + APPENDED[i // 2]
        for i in range(8)
    ]
    assert max(len(row) for row in so_far) == 13, "want a row whose budget the slots cut"
    room = np.minimum(ROUND_BUDGETS[1], 16 - np.array([len(row) for row in so_far]))
    whole = ro.generate(
        params,
        *ro.pad_prompts(so_far, pad_id=0, buckets=(16,)),
        jax.random.key(2),
        model=CONFIG,
        sampling=sampling,
        num_samples=1,
        budget_B=room,
    )
    whole = jax.tree.map(np.asarray, whole)
    np.testing.assert_array_equal(second.lengths_B, whole.lengths_B)
    np.testing.assert_array_equal(second.completion_tokens_BxC, whole.completion_tokens_BxC)
    np.testing.assert_allclose(second.logps_BxC, whole.logps_BxC, atol=1e-5, rtol=0)
    assert second.lengths_B[3] == 0 and (np.delete(second.lengths_B, 3) > 0).all()
    # Each context: the row's tokens so far but the last, whose keys and values come with the
    # next round's tokens (a row that sampled nothing: its appended tokens' last).
    expected = np.array([len(row) for row in so_far]) + second.lengths_B - 1
    np.testing.assert_array_equal(after.lengths_B, expected)
    np.testing.assert_array_equal(after.cache.valid_BxS.sum(axis=1), expected)
    assert after.cache.valid_BxS.shape == context.cache.valid_BxS.shape == (8, 16)
    np.testing.assert_array_equal(
        context.lengths_B, mask.sum(axis=1).repeat(2) + first.lengths_B - 1
    )


@pytest.mark.eight_devices
def test_rounds_on_a_mesh_sample_as_on_one_device(params, prompts):
    sampling = _sampling(temperature=0.0, shared_prompt_decode=True)
    mesh = sharding.make_mesh(dp=2, fsdp=2, tp=2)
    on_mesh, alone = _rounds(params, prompts, sampling, mesh), _rounds(params, prompts, sampling)
    assert on_mesh[1].cache.k_layers[0].shape == alone[1].cache.k_layers[0].shape
    for got, expected in zip(on_mesh[::2], alone[::2], strict=True):  # the two rollouts
        np.testing.assert_array_equal(got.completion_tokens_BxC, expected.completion_tokens_BxC)
        np.testing.assert_allclose(got.logps_BxC, expected.logps_BxC, atol=1e-5)


def test_stop_strings_end_rows_where_their_text_first_holds_one(params, prompts):
    # Token i reads "<i>" here, so "<a><b>" appears exactly where a is followed by b. A row
    # stops on that b and keeps what it drew before: each row's draws depend on its own logits
    # and the step's key only.
    spelled = [f"<{i}>".encode() for i in range(CONFIG.vocab_size)]
    sampling = _sampling(temperature=1.0, end_ids=(2,), pad_id=1)
    free = _generate(params, prompts, sampling)
    a, b = (int(t) for t in free.completion_tokens_BxC[0, 2:4])
    stop = StopStrings.build([f"<{a}><{b}>", "<never>"], spelled)
    stopped = _generate(params, prompts, dataclasses.replace(sampling, stop=stop))
    rows = zip(free.completion_tokens_BxC, free.lengths_B, strict=True)
    for row, (tokens, length) in enumerate(rows):
        pair = [j for j in range(1, length) if (tokens[j - 1], tokens[j]) == (a, b)]
        want = pair[0] + 1 if pair else length
        assert stopped.lengths_B[row] == want, row
        assert stopped.truncated_B[row] == (free.truncated_B[row] and not pair)
        np.testing.assert_array_equal(stopped.completion_tokens_BxC[row, :want], tokens[:want])
        np.testing.assert_allclose(stopped.logps_BxC[row, :want], free.logps_BxC[row, :want])
        assert not stopped.completion_mask_BxC[row, want:].any()
        assert (stopped.completion_tokens_BxC[row, want:] == 1).all()
    assert stopped.lengths_B[0] <= 4 and (stopped.lengths_B < free.lengths_B).any()
    with pytest.raises(ValueError, match="stop strings built for 4 token ids, the model has 128"):
        _generate(
            params, prompts, dataclasses.replace(sampling, stop=stop.build(["x"], spelled[:4]))
        )


# ----------------------------------------------------------------------------- sharding, shapes


def _on_mesh(mesh, params, prompts):
    """generate's positional arguments, laid out on `mesh` as the trainer lays them out."""
    placed = jax.device_put(params, sharding.tree_shardings(mesh, tf.logical_axes(CONFIG), params))
    return (placed, *sharding.shard_batch(mesh, prompts), jax.random.key(1))


def _sharded_kwargs(mesh, **sampling):
    return dict(model=CONFIG, sampling=_sampling(**sampling), num_samples=2, mesh=mesh)


@pytest.mark.eight_devices
@pytest.mark.parametrize(
    "decode",
    [{}, dict(shared_prompt_decode=True), dict(decode_segments=3), dict(repetition_penalty=3.0)],
    ids=str,
)
def test_sharded_generation_equals_unsharded(params, prompts, decode):
    expected = _generate(params, prompts, _sampling(**decode))
    mesh = sharding.make_mesh(dp=2, fsdp=2, tp=2)
    rollout = ro.generate(*_on_mesh(mesh, params, prompts), **_sharded_kwargs(mesh, **decode))
    assert rollout.completion_tokens_BxC.sharding.spec[0] == sharding.BATCH_AXES
    got = jax.tree.map(np.asarray, rollout)
    np.testing.assert_array_equal(got.completion_tokens_BxC, expected.completion_tokens_BxC)
    np.testing.assert_array_equal(got.completion_mask_BxC, expected.completion_mask_BxC)
    np.testing.assert_allclose(got.logps_BxC, expected.logps_BxC, atol=1e-5)


@pytest.mark.eight_devices
def test_sharded_compacted_decode_compacts_each_devices_rows(params):
    # dp 2 x fsdp 2: four shards of four rows; each moves its own live rows to its front.
    mesh = sharding.make_mesh(dp=2, fsdp=2, tp=2)
    compact = _tail_sampling(temperature=0.0, compact_rows=True)
    kwargs = dict(model=CONFIG, sampling=compact, num_samples=1, mesh=mesh)
    rollout = ro.generate(*_on_mesh(mesh, params, TAIL_PROMPTS), **kwargs)
    plain = _generate(params, TAIL_PROMPTS, _tail_sampling(temperature=0.0), num_samples=1)
    got = jax.tree.map(np.asarray, rollout)
    np.testing.assert_array_equal(got.completion_tokens_BxC, plain.completion_tokens_BxC)
    np.testing.assert_allclose(got.logps_BxC, plain.logps_BxC, atol=1e-5, rtol=0)
    assert _live_rows_BxSeg(plain).reshape(4, 4, 3).sum(1).max(0)[-1] == 1, "want a 1-row cut"
    # The rows stay on their devices: no cache-sized array crosses devices.
    hlo = ro._generate.lower(*_on_mesh(mesh, params, TAIL_PROMPTS), **kwargs).compile().as_text()
    moved = re.findall(r"= (\S+) (?:all-gather|all-to-all|collective-permute)(?:-start)?\(", hlo)
    slots = "|".join(str(TAIL_PROMPTS[0].shape[1] + end) for end in (2, 4, 6, 8))
    cache_sized = rf",({slots}),\d+,{CONFIG.head_dim}\]"  # [..., slots, kv_heads, head_dim]
    assert moved and not [shape for shape in moved if re.search(cache_sized, shape)], moved


@pytest.mark.eight_devices
def test_decode_sums_no_logits_across_devices(params, prompts):
    # The trainer's fsdp layout splits the model dimension; decoding with it would all-reduce
    # [rows, vocab] logits every token (_unembedding_split_over_vocab).
    mesh = sharding.make_mesh(fsdp=8)
    prompts = tuple(np.tile(x, (2, 1)) for x in prompts)  # 8 prompts: one per device
    lowered = ro._generate.lower(*_on_mesh(mesh, params, prompts), **_sharded_kwargs(mesh))
    summed = re.findall(r"= (.*?) all-reduce(?:-start)?\(", lowered.compile().as_text())
    last_dims = {
        int(dims.split(",")[-1]) for s in summed for dims in re.findall(r"\[([\d,]+)\]", s)
    }
    assert summed and CONFIG.vocab_size not in last_dims, summed


def test_prompt_lengths_in_one_bucket_compile_once(params):
    sampling = _sampling(max_new_tokens=2)  # a shape no other test uses
    before = ro._generate._cache_size()
    for batch in ([[1, 2, 3], [4]], [[5] * 8, [6, 7]], [[8] * 5, [9] * 6]):
        _generate(params, ro.pad_prompts(batch, pad_id=0, buckets=BUCKETS), sampling)
    assert ro._generate._cache_size() == before + 1


# ----------------------------------------------------------------------------- transformers parity


def _hf_greedy(model, prompts, sampling: ro.SamplingConfig) -> np.ndarray:
    """transformers' greedy generate on left-padded prompts, padded out to max_new_tokens."""
    import torch

    tokens, mask = prompts
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(tokens.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            max_new_tokens=sampling.max_new_tokens,
            do_sample=False,
            repetition_penalty=sampling.repetition_penalty,
            eos_token_id=list(sampling.end_ids),
            pad_token_id=sampling.pad_id,
        )
    new = out[:, tokens.shape[1] :].numpy()
    return np.pad(
        new, ((0, 0), (0, sampling.max_new_tokens - new.shape[1])), constant_values=sampling.pad_id
    )


def test_greedy_matches_transformers_tiny_qwen2(prompts):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.Qwen2Config(**{**CONFIG.to_hf(), "initializer_range": 0.2})
    torch.manual_seed(0)
    hf_model = transformers.Qwen2ForCausalLM(hf_config).eval()
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    params = loading.params_from_hf_state_dict(state, CONFIG)  # the HF config was made from it
    for sampling in (GREEDY_NO_END, GREEDY):
        ours = _generate(params, prompts, sampling, num_samples=1)
        theirs = _hf_greedy(hf_model, prompts, sampling)
        np.testing.assert_array_equal(ours.completion_tokens_BxC, theirs)
    assert 0 < ours.truncated_B.sum() < len(PROMPTS), "want both ended and truncated rows"
    # With a repetition penalty, prompt by prompt: transformers penalizes every id in its input,
    # the left padding's too, so each prompt goes in alone.
    penalized = dataclasses.replace(GREEDY_NO_END, repetition_penalty=2.0)
    ours = _generate(params, prompts, penalized, num_samples=1)
    plain = _generate(params, prompts, GREEDY_NO_END, num_samples=1)
    assert (ours.completion_tokens_BxC != plain.completion_tokens_BxC).any()
    for row, prompt in enumerate(PROMPTS):
        alone = np.asarray([prompt], np.int32), np.ones((1, len(prompt)), bool)
        theirs = _hf_greedy(hf_model, alone, penalized)
        np.testing.assert_array_equal(ours.completion_tokens_BxC[row], theirs[0], str(row))


@pytest.mark.slow
def test_greedy_matches_transformers_smollm2():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, params = loading.load_gguf(loading.smollm2_gguf_path(), dtype="float32")
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf())).eval()
    state = loading.hf_state_dict_from_params(params, config)
    result = hf_model.load_state_dict(
        {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=False
    )
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    # The SmolLM2 tokenizer's ids for "The capital of France is", "1, 2, 3, 4," and
    # "def fibonacci(n):" (hard-coded: building the tokenizer takes longer than the test).
    ids = [
        [504, 3575, 282, 4649, 314],
        [33, 28, 216, 34, 28, 216, 35, 28, 216, 36, 28],
        [1604, 3987, 46477, 24, 94, 727],
    ]
    prompts = ro.pad_prompts(ids, pad_id=0, buckets=(16,))
    sampling = ro.SamplingConfig(
        max_new_tokens=20, temperature=0.0, end_ids=config.eos_token_ids, pad_id=0
    )
    ours = _generate(params, prompts, sampling, num_samples=1, config=config)
    theirs = _hf_greedy(hf_model, prompts, sampling)
    np.testing.assert_array_equal(ours.completion_tokens_BxC, theirs)
    assert ours.lengths_B.min() >= 16, "compare at least 16 tokens per prompt"
