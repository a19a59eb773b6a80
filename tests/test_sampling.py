"""Tests for gkd.sampling: greedy vs full forward passes, sampling statistics,
top-k / top-p support, EOS handling, 1 vs 8 devices, beam search."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from gkd import errors
from gkd import sampling


@dataclasses.dataclass(frozen=True)
class MarkovModel:
  """Test-only second-order Markov model with closed-form probabilities.

  The logits after (..., a, b) are params["table"][b] + params["skip"][a],
  both float32[V, V]; `a` lives in the cache, so a wrong beam reordering of
  the cache changes the results.
  """
  vocab_size: int
  eos_id: int

  def logits(self, params, batch):
    seq = jnp.concatenate([batch["input_tokens"], batch["target_tokens"]], 1)
    i, o = batch["input_tokens"].shape[1], batch["target_tokens"].shape[1]
    prev, prev2 = seq[:, i - 1:i - 1 + o], seq[:, i - 2:i - 2 + o]
    return params["table"][prev] + params["skip"][prev2]

  def init_cache(self, params, batch, max_new):
    b = batch["input_tokens"].shape[0]
    # A batch axis behind a layer axis, and a scalar, like real caches.
    prev2 = jnp.broadcast_to(batch["input_tokens"][:, -2], (2, b))
    return {"prev": prev2, "index": jnp.zeros((), jnp.int32)}, \
        batch["input_tokens"][:, -1]

  def decode_step(self, params, cache, token):
    logits = params["table"][token] + params["skip"][cache["prev"][0]]
    prev = jnp.broadcast_to(token, cache["prev"].shape)
    return logits, {"prev": prev, "index": cache["index"] + 1}


def _prompts(batch, length=3):
  return {"input_tokens": jnp.ones((batch, length), jnp.int32),
          "input_mask": jnp.ones((batch, length), jnp.int32)}


def _fixed_logits_model(logits, eos_id=-1):
  """Every step's logits are `logits` [V], whatever the previous token."""
  v = logits.shape[0]
  return MarkovModel(v, eos_id), {"table": jnp.tile(logits[None], (v, 1)),
                                  "skip": jnp.zeros((v, v))}


def _chi2_pvalue(tokens, probs):
  """p-value of observed token counts against `probs` (bins with expected
  count < 5 merged)."""
  counts = np.bincount(np.asarray(tokens).ravel(), minlength=len(probs))
  probs = np.asarray(probs, np.float64)
  expected = probs / probs.sum() * counts.sum()
  small = expected < 5
  obs = np.append(counts[~small], counts[small].sum())
  exp = np.append(expected[~small], expected[small].sum())
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  if len(obs) == 1:  # a point mass: nothing to test beyond the support
    return 1.0
  assert obs.sum() == counts.sum()
  return stats.chisquare(obs, exp).pvalue


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max())
  return e / e.sum()


# ------------------------------------------------------------ configuration


@pytest.mark.parametrize("kwargs", [
    dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_k=-2),
    dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sample_config_is_a_user_error(kwargs):
  with pytest.raises(errors.UserError, match="SampleConfig"):
    sampling.SampleConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(num_beams=0), dict(alpha=-0.1)])
def test_bad_beam_config_is_a_user_error(kwargs):
  with pytest.raises(errors.UserError, match="BeamConfig"):
    sampling.BeamConfig(**kwargs)


def test_with_targets_only_changes_target_keys():
  batch = {**_prompts(2), "target_tokens": jnp.zeros((2, 5), jnp.int32),
           "target_mask": jnp.zeros((2, 5), jnp.int32), "extra": jnp.ones(2)}
  samples = sampling.Samples(tokens=jnp.full((2, 3), 7), mask=jnp.ones((2, 3)))
  out = sampling.with_targets(batch, samples)
  assert set(out) == set(batch)
  assert out["target_tokens"] is samples.tokens
  assert out["target_mask"] is samples.mask
  for key in ("input_tokens", "input_mask", "extra"):
    assert out[key] is batch[key]


# --------------------------------------------------------- sampling statistics

_LOGITS = np.array([2.0, 1.2, 0.9, 0.3, 0.0, -0.4, -1.0, -2.2], np.float32)
_DRAWS = 20000


def _first_tokens(model, params, config, seed=0):
  fn = jax.jit(sampling.sample, static_argnums=(0, 4))
  out = fn(model, params, _prompts(_DRAWS), jax.random.key(seed), config)
  return np.asarray(out.tokens[:, 0])


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_temperature_frequencies_match_softmax(tau):
  model, params = _fixed_logits_model(jnp.asarray(_LOGITS))
  config = sampling.SampleConfig(max_new_tokens=1, temperature=tau)
  tokens = _first_tokens(model, params, config, seed=int(tau * 10))
  assert _chi2_pvalue(tokens, _softmax(_LOGITS / tau)) > 1e-3
  # The test has the power to reject a temperature 20% off.
  for wrong in (tau * 0.8, tau * 1.25):
    assert _chi2_pvalue(tokens, _softmax(_LOGITS / wrong)) < 1e-6


@pytest.mark.parametrize("top_k", [1, 3])
def test_top_k_never_emits_excluded_tokens(top_k):
  model, params = _fixed_logits_model(jnp.asarray(_LOGITS))
  config = sampling.SampleConfig(max_new_tokens=1, temperature=1.5, top_k=top_k)
  tokens = _first_tokens(model, params, config)
  allowed = np.argsort(-_LOGITS)[:top_k]
  assert set(np.unique(tokens)) <= set(allowed)
  probs = np.zeros_like(_LOGITS)
  probs[allowed] = _softmax(_LOGITS[allowed] / 1.5)
  assert _chi2_pvalue(tokens, probs) > 1e-3


@pytest.mark.parametrize("top_p,tau", [(0.5, 1.0), (0.9, 0.7), (0.3, 2.0)])
def test_top_p_never_emits_excluded_tokens(top_p, tau):
  model, params = _fixed_logits_model(jnp.asarray(_LOGITS))
  config = sampling.SampleConfig(max_new_tokens=1, temperature=tau, top_p=top_p)
  tokens = _first_tokens(model, params, config)
  probs = _softmax(_LOGITS / tau)
  order = np.argsort(-probs)
  n_keep = int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)
  allowed = order[:n_keep]
  assert set(np.unique(tokens)) <= set(allowed)
  kept = np.zeros_like(probs)
  kept[allowed] = probs[allowed] / probs[allowed].sum()
  assert _chi2_pvalue(tokens, kept) > 1e-3


def test_logprobs_are_the_adjusted_distribution():
  model, params = _fixed_logits_model(jnp.asarray(_LOGITS))
  config = sampling.SampleConfig(max_new_tokens=4, temperature=0.8, top_k=5,
                                 return_logprobs=True)
  out = sampling.sample(model, params, _prompts(64), jax.random.key(3), config)
  logits = _LOGITS / 0.8
  allowed = np.argsort(-logits)[:5]
  logp = np.full_like(logits, -np.inf)
  logp[allowed] = np.log(_softmax(logits[allowed]))
  np.testing.assert_allclose(out.logprobs, logp[np.asarray(out.tokens)],
                             rtol=1e-5)


def test_no_logprobs_unless_asked():
  model, params = _fixed_logits_model(jnp.asarray(_LOGITS))
  out = sampling.sample(model, params, _prompts(2), jax.random.key(0),
                        sampling.SampleConfig(max_new_tokens=2))
  assert out.logprobs is None


# ------------------------------------------------------------------- EOS


def test_eos_is_kept_and_followed_by_padding():
  eos = 2
  model, params = _fixed_logits_model(jnp.asarray(_LOGITS), eos_id=eos)
  config = sampling.SampleConfig(max_new_tokens=12, return_logprobs=True)
  out = sampling.sample(model, params, _prompts(256), jax.random.key(1), config)
  tokens, mask, logp = map(np.asarray, (out.tokens, out.mask, out.logprobs))
  saw_eos = 0
  for row, m, lp in zip(tokens, mask, logp):
    hits = np.flatnonzero(row == eos)
    end = hits[0] + 1 if hits.size else len(row)
    saw_eos += bool(hits.size)
    np.testing.assert_array_equal(m, np.arange(len(row)) < end)
    assert (row[end:] == 0).all() and (lp[end:] == 0).all()
    assert (lp[:end] < 0).all()
  assert 0 < saw_eos < len(tokens)  # both kinds of rows were exercised


def test_loop_stops_early_when_all_rows_finished():
  # EOS is the only token with mass: every row stops after one step, and
  # the model is never asked for more steps than that.
  logits = jnp.array([-1e9, -1e9, 0.0, -1e9])
  model, params = _fixed_logits_model(logits, eos_id=2)
  calls = []
  class Counting(MarkovModel):
    def decode_step(self, params, cache, token):
      jax.debug.callback(lambda: calls.append(1))
      return super().decode_step(params, cache, token)
  model = Counting(model.vocab_size, model.eos_id)
  out = sampling.sample(model, params, _prompts(3), jax.random.key(0),
                        sampling.SampleConfig(max_new_tokens=6))
  jax.effects_barrier()
  np.testing.assert_array_equal(out.tokens, [[2, 0, 0, 0, 0, 0]] * 3)
  np.testing.assert_array_equal(out.mask, [[1, 0, 0, 0, 0, 0]] * 3)
  assert len(calls) == 1


# ------------------------------------------------------------- beam search


def _markov_params(seed, v=6, scale=2.0):
  rng = np.random.default_rng(seed)
  return {"table": jnp.asarray(rng.normal(size=(v, v)) * scale, jnp.float32),
          "skip": jnp.asarray(rng.normal(size=(v, v)) * scale, jnp.float32)}


def _exact_best(params, prompt, n, eos, alpha):
  """Brute-force best length-penalised score over all outputs of <= n tokens
  (finished by EOS, or truncated at n)."""
  table, skip = (np.asarray(params[k], np.float64) for k in ("table", "skip"))
  v = table.shape[0]
  best = -np.inf
  for length in range(1, n + 1):
    for seq in itertools.product(range(v), repeat=length):
      if eos in seq[:-1] or (length < n and seq[-1] != eos):
        continue
      full = tuple(prompt) + seq
      total = 0.0
      for t in range(len(prompt), len(full)):
        logits = table[full[t - 1]] + skip[full[t - 2]]
        total += logits[full[t]] - np.log(np.exp(logits).sum())
      best = max(best, total / ((5 + length) / 6) ** alpha)
  return best


_beam = jax.jit(sampling.beam_search, static_argnums=(0, 3))
_sample = jax.jit(sampling.sample, static_argnums=(0, 4))


def test_beam_search_one_beam_is_greedy():
  for seed in range(4):
    params = _markov_params(seed)
    model = MarkovModel(6, eos_id=seed % 3)
    greedy = _sample(model, params, _prompts(2), jax.random.key(0),
                     sampling.SampleConfig(max_new_tokens=5, greedy=True))
    tokens, mask, _ = _beam(
        model, params, _prompts(2),
        sampling.BeamConfig(max_new_tokens=5, num_beams=1, alpha=0.0))
    np.testing.assert_array_equal(tokens, greedy.tokens)
    np.testing.assert_array_equal(mask, greedy.mask)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_search_beats_greedy_and_reaches_exact_optimum(alpha):
  n, model = 4, MarkovModel(6, eos_id=0)
  improved = 0
  for seed in range(8):
    params = _markov_params(seed)
    greedy = _sample(model, params, _prompts(1), jax.random.key(0),
                     sampling.SampleConfig(max_new_tokens=n, greedy=True,
                                           return_logprobs=True))
    greedy_score = sampling.sequence_score(greedy.logprobs, greedy.mask, alpha)
    tokens, mask, score = _beam(
        model, params, _prompts(1),
        sampling.BeamConfig(max_new_tokens=n, num_beams=3, alpha=alpha))
    assert score[0] >= greedy_score[0] - 1e-5
    improved += bool(score[0] > greedy_score[0] + 1e-3)
    # The reported score is the score of the returned tokens ...
    full = jax.nn.log_softmax(model.logits(
        params, {**_prompts(1), "target_tokens": tokens}), axis=-1)
    logp = jnp.take_along_axis(full, tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(sampling.sequence_score(logp, mask, alpha),
                               score, rtol=1e-5)
    # ... and on these small tables 3 beams find the exact optimum.
    exact = _exact_best(params, [1, 1, 1], n, eos=0, alpha=alpha)
    np.testing.assert_allclose(score[0], exact, rtol=1e-5)
  assert improved >= 2  # the tables are not all greedy-optimal
