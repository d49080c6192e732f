"""DeepSeek-V3.2's keep sampling mask (`make_sampling.keep_sampling_mask`): the sampler records
the ids each token was drawn from and its log-prob over them; the trainer's log-probs, their
gradient, the reference's and the ratio keep the same support."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from grpo import metrics as metrics_lib
from grpo import train
from grpo.models import log_softmax, presets
from grpo.models import transformer as tf
from grpo.phases import dynamic_sampling
from grpo.phases import rollout as ro
from grpo.types import Rollout
from tests.tiny_experiment import tiny_experiment

CONFIG = presets.preset("tiny-qwen2", dtype="float32")
END_IDS = tuple(range(0, CONFIG.vocab_size, 8))
NOT_KEPT = ro.NOT_KEPT


def _sampling(**overrides) -> ro.SamplingConfig:
    kwargs = dict(max_new_tokens=8, end_ids=END_IDS, pad_id=0, keep_sampling_mask=True)
    return ro.SamplingConfig(**{**kwargs, **overrides})


@pytest.mark.parametrize(
    "overrides, message",
    [(dict(top_k=0, top_p=0.9), "top_k > 0"), (dict(temperature=0.0), "temperature > 0")],
)
def test_the_mask_needs_a_top_k_bound_and_a_draw(overrides, message):
    with pytest.raises(ValueError, match=message):
        _sampling(**overrides)


def test_a_draw_records_its_kept_ids_and_its_log_prob_over_them():
    # Top-3 of 6 at T = 0.5: the kept ids are the 3 largest logits, the log-prob is the drawn
    # one's under the softmax of those 3 alone (by hand, with scipy).
    logits = np.array([[0.1, 2.0, -1.0, 1.5, 0.3, 1.9], [3.0, 0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    sampling = _sampling(temperature=0.5, top_k=3)
    token, logp, kept = ro.sample_tokens(jnp.asarray(logits), jax.random.key(0), sampling)
    assert sorted(kept[0].tolist()) == [1, 3, 5]
    assert int(token[0]) in kept[0].tolist() and int(token[1]) in kept[1].tolist()
    for row in range(2):
        scaled = logits[row] / 0.5
        expected = scaled[token[row]] - scipy.special.logsumexp(scaled[np.asarray(kept[row])])
        np.testing.assert_allclose(logp[row], expected, rtol=1e-6)
    # top_p = 0.5 keeps row 1's likeliest id alone: its log-prob is 0.
    token, logp, kept = ro.sample_tokens(
        jnp.asarray(logits), jax.random.key(0), _sampling(top_k=3, top_p=0.5)
    )
    assert kept[1].tolist() == [0, NOT_KEPT, NOT_KEPT] and int(token[1]) == 0
    assert float(logp[1]) == 0.0


def test_keep_only_leaves_the_kept_logits_on_a_vocabulary_slice_too():
    z = jnp.arange(5, dtype=jnp.float32).reshape(1, 1, 5)
    kept = jnp.array([[[3, 1, NOT_KEPT]]], jnp.int32)
    out = np.asarray(log_softmax.keep_only(z, kept))[0, 0]
    np.testing.assert_array_equal(out[[1, 3]], [1.0, 3.0])
    assert (out[[0, 2, 4]] < -1e29).all()
    # The slice of ids 2..6: id 3 is its slot 1; id 1 lies in another slice (never wrapped).
    sliced = np.asarray(log_softmax.keep_only(z, kept, offset=2))[0, 0]
    assert sliced[1] == 1.0 and (np.delete(sliced, 1) < -1e29).all()
    np.testing.assert_array_equal(log_softmax.keep_only(z, kept[..., :0]), z)


@pytest.fixture(scope="module")
def params():
    return tf.init_params(CONFIG, jax.random.key(0), std=0.3)


@pytest.mark.parametrize("decode", [{}, dict(decode_segments=2, compact_rows=True)])
def test_the_sampler_records_what_the_trainer_recomputes_over_the_kept_ids(params, decode):
    # Also where later decode segments move the live rows (their kept ids move with them).
    tokens, mask = ro.pad_prompts([[5, 17, 3], [9, 8, 7, 6, 5, 4, 3]], pad_id=0, buckets=(8,))
    sampling = _sampling(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, **decode)
    rollout = ro.generate(
        params, tokens, mask, jax.random.key(1), model=CONFIG, sampling=sampling, num_samples=2
    )
    rollout = jax.tree.map(np.asarray, rollout)
    kept, real = rollout.kept_ids_BxCxK, rollout.completion_mask_BxC
    assert kept.shape == (4, 8, 20)
    # Each real token is one of its kept ids; the padding after the end keeps none.
    assert (kept == rollout.completion_tokens_BxC[..., None]).any(-1)[real].all()
    assert (kept[~real] == NOT_KEPT).all()
    counts = (kept != NOT_KEPT).sum(-1)[real]
    assert counts.min() >= 1 and counts.max() < 20, "want top-p and min-p to cut below top-k"
    recompute = jax.jit(tf.completion_logprobs, static_argnames=("config", "temperature"))
    args = (params, rollout.prompt_tokens_BxP, rollout.prompt_mask_BxP)
    args += (rollout.completion_tokens_BxC, real)
    logps, entropy = recompute(*args, config=CONFIG, temperature=0.7, kept_BxCxK=kept)
    np.testing.assert_allclose(rollout.logps_BxC, np.where(real, logps, 0.0), atol=2e-5, rtol=0)
    assert np.isfinite(entropy).all()
    # Over the whole vocabulary the log-probs are lower: the kept ids hold part of the mass.
    full, _ = recompute(*args, config=CONFIG, temperature=0.7)
    assert (full[real] < rollout.logps_BxC[real] - 1e-3).mean() > 0.5


def test_the_kept_log_probs_gradient_is_the_masked_softmaxs(params):
    # The written backward (models/log_softmax.py) on pushed-out logits against autodiff of a
    # log-softmax over the kept ids' logits gathered alone, through the whole model.
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, CONFIG.vocab_size, (2, 6))
    kept = np.empty((2, 5, 4), np.int32)
    for b, c in np.ndindex(2, 5):  # three other distinct ids, then the target
        others = rng.permutation(np.delete(np.arange(CONFIG.vocab_size), tokens[b, c + 1]))
        kept[b, c] = [*others[:3], tokens[b, c + 1]]
    tokens, kept = jnp.asarray(tokens, jnp.int32), jnp.asarray(kept)
    valid = jnp.ones((2, 1), bool), jnp.ones((2, 5), bool)

    def ours(p):
        logps, entropy = tf.completion_logprobs(
            p, tokens[:, :1], valid[0], tokens[:, 1:], valid[1], config=CONFIG, kept_BxCxK=kept
        )
        return logps.sum() + 0.1 * entropy.sum()

    def reference(p):
        joined = jnp.ones((2, 6), bool)
        hidden, _ = tf.forward(p, tokens, tf.positions_from_mask(joined), joined, config=CONFIG)
        z = tf.unembed(hidden[:, :-1], tf.unembed_matrix(p, CONFIG))
        logp_kept = jax.nn.log_softmax(jnp.take_along_axis(z, kept, axis=-1), axis=-1)
        entropy = -jnp.sum(jnp.exp(logp_kept) * logp_kept, axis=-1)
        return logp_kept[..., 3].sum() + 0.1 * entropy.sum()

    np.testing.assert_allclose(ours(params), reference(params), rtol=1e-5)
    got, want = jax.grad(ours)(params), jax.grad(reference)(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)


def test_trimming_and_stacking_rollouts_carry_the_kept_ids():
    kept = np.arange(2 * 4 * 2, dtype=np.int32).reshape(2, 4, 2)
    rollout = Rollout(
        prompt_tokens_BxP=np.ones((2, 2), np.int32),
        prompt_mask_BxP=np.ones((2, 2), bool),
        completion_tokens_BxC=np.ones((2, 4), np.int32),
        completion_mask_BxC=np.arange(4)[None, :] < np.array([[1], [2]]),
        logps_BxC=np.zeros((2, 4), np.float32),
        lengths_B=np.array([1, 2], np.int32),
        truncated_B=np.zeros(2, bool),
        kept_ids_BxCxK=kept,
    )
    trimmed = ro.trim_completions(rollout, (2,))
    np.testing.assert_array_equal(trimmed.kept_ids_BxCxK, kept[:, :2])
    stacked = dynamic_sampling.concat_rollouts([trimmed, rollout], pad_id=0)
    assert stacked.kept_ids_BxCxK.shape == (4, 4, 2)
    assert (stacked.kept_ids_BxCxK[:2, 2:] == NOT_KEPT).all()
    np.testing.assert_array_equal(stacked.kept_ids_BxCxK[2:], kept)


def test_the_dry_run_counts_the_kept_ids():
    # tiny.gin: 2 prompts x 4 samples, 16 new tokens, rows over dp x fsdp = 4 devices.
    exp = tiny_experiment(
        "make_sampling.keep_sampling_mask=True", "make_sampling.top_k=8", read_params=False
    )
    per_device_gb = 8 * 16 * 8 * 4 / 4 / 1e9
    assert f"its kept sampling ids {per_device_gb:.3g};" in train.held_memory_line(exp)
    assert "kept sampling ids" not in train.held_memory_line(tiny_experiment(read_params=False))


@pytest.mark.slow
def test_the_trainer_keeps_the_sampling_mask_on_policy_and_reference(tmp_path):
    # tiny.gin's random model spreads its mass over SmolLM2's 49,152 ids, so top-8 keeps a
    # sliver of it: had the update or the reference pass read the whole vocabulary, the first
    # pass's |log ratio| would be about log(49152 / 8) ~ 8.7, not rounding, and the KL at step
    # 1 (reference = policy) not 0. Vocabulary-parallel log-probs (tiny.gin's tp = 2), each
    # prompt's forward once for its group, and the reference pass.
    bindings = [
        "make_sampling.keep_sampling_mask=True",
        "make_sampling.top_k=8",
        "make_sampling.top_p=0.95",
        "make_loss.beta=0.04",
        "TrainConfig.shared_prompt_forward=True",
        "TrainConfig.num_steps=2",
        "TrainConfig.eval_every_steps=0",
        "make_rewards.names=('correctness_last_number',)",
        "make_rewards.weights=(1.0,)",
    ]
    summary = train.train(tiny_experiment(*bindings, read_params=True), str(tmp_path))
    assert summary["steps"] == 2
    rows = metrics_lib.read_metrics(tmp_path / "metrics.jsonl")
    for row in rows:
        assert row["abs_log_ratio_mean"] < 1e-4, row
        assert np.isfinite(row["entropy"]) and row["entropy"] <= np.log(8) + 1e-4, row
    assert abs(rows[0]["kl"]) < 1e-5 and np.isfinite(rows[1]["kl"])
