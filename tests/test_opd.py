"""Sampled-token on-policy distillation: its expected gradient, by Monte Carlo.

References are exact sums over a tiny vocabulary (enumerated), never the
estimator itself; tolerances are 5 standard errors of the Monte Carlo mean.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gkd.errors import UserError
from gkd.losses import cross_tokenizer as xt
from gkd.losses import sampled

V = 5
M = 200_000  # samples
_SE = 5.0  # tolerance in standard errors


def _kl(lq, lp):
  return jnp.sum(jnp.exp(lq) * (lq - lp), -1)


def _mc_check(per_sample_grads, exact):
  """Mean of per-sample gradients [M, ...] agrees with `exact` within 5 SE."""
  g = np.asarray(per_sample_grads, np.float64)
  mean, se = g.mean(0), g.std(0) / np.sqrt(len(g))
  np.testing.assert_array_less(np.abs(mean - np.asarray(exact)), _SE * se + 1e-6)
  return mean, se


@pytest.fixture(scope="module")
def dists():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  theta = jax.random.normal(k1, (V,))
  teacher = jax.nn.log_softmax(2.0 * jax.random.normal(k2, (V,)))
  return theta, teacher


def _token_grads(theta, teacher, tokens, behavior=None, is_clip=None):
  """Per-sample gradients d surrogate_i / d theta: [M, V]."""
  def one(y, b):
    def loss(th):
      lq = jax.nn.log_softmax(th)[y][None, None]
      bq = None if b is None else b[None, None]
      return sampled.per_token(lq, teacher[y][None, None], jnp.ones((1, 1)),
                               behavior_logq=bq, is_clip=is_clip)[0, 0]
    return jax.grad(loss)(theta)
  b = None if behavior is None else behavior[tokens]
  return jax.jit(jax.vmap(one, in_axes=(0, None if b is None else 0)))(tokens, b)


def test_expected_gradient_is_the_full_reverse_kl_gradient(dists):
  theta, teacher = dists
  tokens = jax.random.categorical(jax.random.PRNGKey(1), theta, shape=(M,))
  exact = jax.grad(lambda th: _kl(jax.nn.log_softmax(th), teacher))(theta)
  mean, se = _mc_check(_token_grads(theta, teacher, tokens), exact)
  assert np.max(se) < 0.05 * np.max(np.abs(exact))  # the check has power
  # The value is a one-sample estimate of KL(q‖p) itself.
  lq = jax.nn.log_softmax(theta)
  values = sampled.per_token(lq[tokens][None], teacher[tokens][None], jnp.ones((1, M)))
  kl = float(_kl(lq, teacher))
  v = np.asarray(values[0], np.float64)
  assert abs(v.mean() - kl) < _SE * v.std() / np.sqrt(M)


def test_a_wrong_sign_or_missing_baseline_would_fail(dists):
  """The check above can fail: a flipped advantage is far outside the tolerance."""
  theta, teacher = dists
  tokens = jax.random.categorical(jax.random.PRNGKey(1), theta, shape=(M,))
  exact = jax.grad(lambda th: _kl(jax.nn.log_softmax(th), teacher))(theta)
  with pytest.raises(AssertionError):
    _mc_check(-_token_grads(theta, teacher, tokens), exact)


def test_importance_sampling_corrects_a_tempered_sampler(dists):
  theta, teacher = dists
  behavior = jax.nn.log_softmax(theta / 2.0)  # sampled at temperature 2
  tokens = jax.random.categorical(jax.random.PRNGKey(2), behavior, shape=(M,))
  exact = jax.grad(lambda th: _kl(jax.nn.log_softmax(th), teacher))(theta)
  _mc_check(_token_grads(theta, teacher, tokens, behavior), exact)
  # Without the correction the same samples give a biased gradient.
  with pytest.raises(AssertionError):
    _mc_check(_token_grads(theta, teacher, tokens), exact)
  # A cap above every ratio changes nothing; a cap of 0.5 shrinks every weight.
  ratio = np.exp(np.asarray(jax.nn.log_softmax(theta) - behavior))
  np.testing.assert_allclose(
      _token_grads(theta, teacher, tokens[:64], behavior, is_clip=float(ratio.max()) + 1),
      _token_grads(theta, teacher, tokens[:64], behavior), rtol=1e-6)
  capped = _token_grads(theta, teacher, tokens[:64], behavior, is_clip=0.5)
  full = _token_grads(theta, teacher, tokens[:64], behavior)
  np.testing.assert_allclose(capped, full * np.minimum(ratio[tokens[:64]], 0.5)[:, None]
                             / ratio[tokens[:64]][:, None], rtol=1e-5, atol=1e-7)


def _two_step(theta1, theta2, log_p1, log_p2):
  """Tabular 2-token sequences: log q(y1), log q(y2|y1) and the teacher's."""
  return (jax.nn.log_softmax(theta1), jax.nn.log_softmax(theta2, -1), log_p1, log_p2)


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_discount_one_is_the_sequence_kl_gradient_and_zero_the_token_level_one(gamma):
  keys = jax.random.split(jax.random.PRNGKey(3), 5)
  theta1, theta2 = jax.random.normal(keys[0], (V,)), jax.random.normal(keys[1], (V, V))
  log_p1 = jax.nn.log_softmax(1.5 * jax.random.normal(keys[2], (V,)))
  log_p2 = jax.nn.log_softmax(1.5 * jax.random.normal(keys[3], (V, V)), -1)

  def seq_kl(th1, th2):  # KL(q(y1, y2) ‖ p(y1, y2)), enumerated
    lq1, lq2, _, _ = _two_step(th1, th2, log_p1, log_p2)
    joint_q = lq1[:, None] + lq2
    return jnp.sum(jnp.exp(joint_q) * (joint_q - (log_p1[:, None] + log_p2)))

  def token_kl(th1, th2):  # GKD's on-policy token-level RKL: prefixes not differentiated
    lq1, lq2, _, _ = _two_step(th1, th2, log_p1, log_p2)
    return _kl(lq1, log_p1) + jnp.sum(jax.lax.stop_gradient(jnp.exp(lq1)) * _kl(lq2, log_p2))

  reference = jax.grad(seq_kl if gamma == 1.0 else token_kl, argnums=(0, 1))(theta1, theta2)
  other = jax.grad(token_kl if gamma == 1.0 else seq_kl, argnums=(0, 1))(theta1, theta2)
  y1 = jax.random.categorical(keys[4], theta1, shape=(M,))
  y2 = jax.random.categorical(jax.random.fold_in(keys[4], 1), theta2[y1])

  def one(a, b):
    def loss(th1, th2):
      lq1, lq2, _, _ = _two_step(th1, th2, log_p1, log_p2)
      lq = jnp.stack([lq1[a], lq2[a, b]])[None]
      lp = jnp.stack([log_p1[a], log_p2[a, b]])[None]
      return jnp.sum(sampled.per_token(lq, lp, jnp.ones((1, 2)), gamma=gamma))
    return jax.grad(loss, argnums=(0, 1))(theta1, theta2)

  g1, g2 = jax.jit(jax.vmap(one))(y1, y2)
  _mc_check(g1, reference[0])
  _mc_check(g2.reshape(M, -1), reference[1].reshape(-1))
  with pytest.raises(AssertionError):  # the two objectives' first-token gradients differ
    _mc_check(g1, other[0])


def test_discounted_sum_and_mask():
  v = jnp.array([[1.0, 2.0, 3.0, 4.0]])
  m = jnp.array([[1, 1, 1, 0]])
  np.testing.assert_allclose(sampled.discounted_sum(v, m, 0.5),
                             [[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3, 0]])
  np.testing.assert_allclose(sampled.discounted_sum(v, m, 0.0), [[1, 2, 3, 0]])
  out = sampled.per_token(jnp.log(jnp.full((1, 4), 0.5)), jnp.zeros((1, 4)), m)
  assert float(out[0, 3]) == 0.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(gamma=1.5), r"gamma=1.5 is out of range"),
    (dict(gamma=-0.1), r"gamma=-0.1 is out of range"),
    (dict(is_clip=0.0), r"is_clip=0.0 must be a number > 0"),
])
def test_bad_options(kwargs, message):
  x = jnp.zeros((1, 2))
  with pytest.raises(UserError, match=message):
    sampled.per_token(x, x, jnp.ones((1, 2)), **kwargs)


def test_shape_mismatch_is_a_clear_error():
  with pytest.raises(UserError, match="must have one shape"):
    sampled.per_token(jnp.zeros((1, 2)), jnp.zeros((1, 3)), jnp.ones((1, 2)))


# ------------------------------------------------- across tokenizers: one action per span
def _span_setup(seed):
  """Student: 2 tabular tokens (y1, y2) spelling one span; teacher: 1 token z = y1·V + y2."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  theta1, theta2 = jax.random.normal(keys[0], (V,)), jax.random.normal(keys[1], (V, V))
  teacher = 1.5 * jax.random.normal(keys[2], (V * V,))

  def span_kl(th1, th2):  # KL(q(text) ‖ p(text)) over all V·V texts, enumerated
    joint_q = (jax.nn.log_softmax(th1)[:, None] + jax.nn.log_softmax(th2, -1)).reshape(-1)
    return _kl(joint_q, jax.nn.log_softmax(teacher))
  return theta1, theta2, teacher, span_kl


def _span_grads(theta1, theta2, teacher, y1, y2, behavior=None):
  """Per-sample gradients of `span_sampled_kl`'s value w.r.t. (θ1, θ2), and the values."""
  def one(a, b, blq):
    def loss(th1, th2):
      student = jnp.stack([th1, th2[a]])[None]  # [1, 2, V]
      values, _ = xt.span_sampled_kl(
          student, teacher[None, None], jnp.stack([a, b])[None], (a * V + b)[None, None],
          jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1)),
          behavior_logq=None if blq is None else blq[None])
      return values[0, 0]
    return jax.value_and_grad(loss, argnums=(0, 1))(theta1, theta2)
  blq = None if behavior is None else jnp.stack([behavior[0][y1], behavior[1][y1, y2]], -1)
  value, (g1, g2) = jax.jit(jax.vmap(one, in_axes=(0, 0, None if blq is None else 0)))(
      y1, y2, blq)
  return value, jnp.concatenate([g1, g2.reshape(len(y1), -1)], -1)


def test_span_estimator_expected_gradient_is_the_span_level_reverse_kl_gradient():
  theta1, theta2, teacher, span_kl = _span_setup(4)
  k = jax.random.PRNGKey(5)
  y1 = jax.random.categorical(k, theta1, shape=(M,))
  y2 = jax.random.categorical(jax.random.fold_in(k, 1), theta2[y1])
  exact = jnp.concatenate([g.reshape(-1) for g in jax.grad(span_kl, (0, 1))(theta1, theta2)])
  value, grads = _span_grads(theta1, theta2, teacher, y1, y2)
  _, se = _mc_check(grads, exact)
  assert np.max(se) < 0.05 * np.max(np.abs(exact))  # the check has power
  v = np.asarray(value, np.float64)  # the value: a one-sample estimate of the KL itself
  assert abs(v.mean() - float(span_kl(theta1, theta2))) < _SE * v.std() / np.sqrt(M)
  with pytest.raises(AssertionError):  # a flipped advantage fails
    _mc_check(-grads, exact)


def test_span_estimator_importance_weights_a_tempered_sampler():
  theta1, theta2, teacher, span_kl = _span_setup(6)
  behavior = (jax.nn.log_softmax(theta1 / 2.0), jax.nn.log_softmax(theta2 / 2.0, -1))
  k = jax.random.PRNGKey(7)
  y1 = jax.random.categorical(k, behavior[0], shape=(M,))
  y2 = jax.random.categorical(jax.random.fold_in(k, 1), behavior[1][y1])
  exact = jnp.concatenate([g.reshape(-1) for g in jax.grad(span_kl, (0, 1))(theta1, theta2)])
  _mc_check(_span_grads(theta1, theta2, teacher, y1, y2, behavior)[1], exact)
  with pytest.raises(AssertionError):  # the same samples without the correction: biased
    _mc_check(_span_grads(theta1, theta2, teacher, y1, y2)[1], exact)
