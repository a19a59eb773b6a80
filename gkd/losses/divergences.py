"""Token-level divergences between teacher and student next-token distributions.

Every function here maps float32 log-probabilities `[..., vocab]` to per-token
values `[...]`. Notation: p = teacher (`lp` = log p), q = student (`lq`);
KL(P‖Q) = Σ_v P(v)·(log P(v) − log Q(v)). The teacher is a constant (the caller
applies stop-gradient); gradients flow through q everywhere, including through
the mixtures. Exact formulas and their sources: `../shared/FORMULAS.md`.

β and α are the GKD paper's (arXiv 2306.13649) and DistiLLM's (arXiv
2402.03898) conventions; f-DISTILL's JS β is 1 − ours, TRL ≥ 0.16's equals ours.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def _kl(lp: Array, lq: Array) -> Array:
  """KL(P‖Q) = Σ_v P(v)·(log P(v) − log Q(v)); terms with P(v) = 0 are 0."""
  p = jnp.exp(lp)
  return jnp.sum(jnp.where(p > 0, p * (lp - lq), 0.0), axis=-1)


def _log_mix(w: float, la: Array, lb: Array) -> Array:
  """log(w·A + (1−w)·B) from log A and log B: a mixture of probabilities.

  Where A = B it returns log A itself, so equal distributions give exactly 0.
  """
  mix = jnp.logaddexp(math.log(w) + la, math.log1p(-w) + lb)
  return jnp.where(la == lb, la, mix)


def forward_kl(lq: Array, lp: Array) -> Array:
  """KL(teacher‖student) = Σ p·(log p − log q). Mode-covering.

  GKD with λ=0 and this divergence is supervised KD (Hinton et al. 2015).
  """
  return _kl(lp, lq)


def reverse_kl(lq: Array, lp: Array) -> Array:
  """KL(student‖teacher) = Σ q·(log q − log p). Mode-seeking (GKD, f-DISTILL)."""
  return _kl(lq, lp)


def jsd(lq: Array, lp: Array, beta: float = 0.5) -> Array:
  """Generalized JSD(β) of GKD (arXiv 2306.13649, Eq. 1).

  JSD(β)(p‖q) = β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q.
  The value tends to 0 at both ends (JSD(β)/β → KL(p‖q) as β → 0, and
  JSD(β)/(1−β) → KL(q‖p) as β → 1), so, as the paper states the limits and
  TRL implements them, β = 0 returns forward KL and β = 1 reverse KL exactly;
  the loss scale jumps there.
  """
  if beta == 0.0:
    return forward_kl(lq, lp)
  if beta == 1.0:
    return reverse_kl(lq, lp)
  lm = _log_mix(beta, lp, lq)
  return beta * _kl(lp, lm) + (1.0 - beta) * _kl(lq, lm)


def _abs_diff(la: Array, lb: Array) -> Array:
  """|A − B| from log-probabilities, without cancellation when A ≈ B ≈ 1.

  |A − B| = max(A, B)·(1 − exp(−|log A − log B|)).
  """
  hi, lo = jnp.maximum(la, lb), jnp.minimum(la, lb)
  return -jnp.exp(hi) * jnp.expm1(jnp.where(hi > lo, lo - hi, 0.0))


def tvd(lq: Array, lp: Array) -> Array:
  """Total variation distance ½·Σ |p − q| (f-DISTILL, arXiv 2307.15190)."""
  return 0.5 * jnp.sum(_abs_diff(lp, lq), axis=-1)


def skew_kl(lq: Array, lp: Array, alpha: float = 0.1) -> Array:
  """Skew KL of DistiLLM (arXiv 2402.03898): KL(p ‖ α·p + (1−α)·q).

  α = 0 is forward KL; α = 1 is 0.
  """
  if alpha == 0.0:
    return forward_kl(lq, lp)
  if alpha == 1.0:
    return jnp.zeros(lq.shape[:-1], jnp.float32)
  return _kl(lp, _log_mix(alpha, lp, lq))


def skew_reverse_kl(lq: Array, lp: Array, alpha: float = 0.1) -> Array:
  """Skew reverse KL of DistiLLM: KL(q ‖ (1−α)·p + α·q), skew KL with p and q swapped.

  α = 0 is reverse KL; α = 1 is 0.
  """
  return skew_kl(lp, lq, alpha)


def _head_threshold(lp: Array, mu: float, iters: int = 48) -> Array:
  """Smallest log-prob t whose set {v: lp_v ≥ t} has teacher mass ≤ μ.

  Bisection on t instead of a sort of the vocabulary: S(t) = Σ_{lp ≥ t} p is
  non-increasing in t, and the head {i : C_i ≤ μ} of the sorted cumulative
  mass C is exactly {v : lp_v ≥ t*}. Returns `hi` with S(hi) ≤ μ, shape [...].
  """
  p = jnp.exp(lp)
  hi = jnp.max(lp, axis=-1) + 1.0  # S(hi) = 0 ≤ μ
  lo = jnp.maximum(jnp.min(lp, axis=-1), -1e30) - 1.0  # S(lo) = 1 > μ

  def body(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    mass = jnp.sum(jnp.where(lp >= mid[..., None], p, 0.0), axis=-1)
    ok = mass <= mu
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

  _, hi = jax.lax.fori_loop(0, iters, body, (lo, hi))
  return hi


def akl(lq: Array, lp: Array, mu: float = 0.5) -> Array:
  """Adaptive KL (Wu et al., arXiv 2404.02657).

  Sort the teacher's probabilities descending; the head is the prefix whose
  cumulative mass is ≤ μ (always including the top token), the tail the rest.
  g_head = Σ_head |p − q|, g_tail = Σ_tail |p − q| (no gradient), and
  AKL = g_head/(g_head+g_tail)·KL(p‖q) + g_tail/(g_head+g_tail)·KL(q‖p).
  The head is found by bisection, not a sort (tied teacher probabilities fall
  on the same side). When p = q both weights are ½ (the paper's 0/0).
  """
  t = _head_threshold(jax.lax.stop_gradient(lp), mu)
  top = lp >= jnp.max(lp, axis=-1, keepdims=True)
  head = (lp >= t[..., None]) | top
  gap = jax.lax.stop_gradient(_abs_diff(lp, lq))
  g_head = jnp.sum(jnp.where(head, gap, 0.0), axis=-1)
  g_tail = jnp.sum(jnp.where(head, 0.0, gap), axis=-1)
  total = g_head + g_tail
  w_head = jnp.where(total > 0, g_head / jnp.where(total > 0, total, 1.0), 0.5)
  return w_head * _kl(lp, lq) + (1.0 - w_head) * _kl(lq, lp)


def atkd_parts(lq: Array, lp: Array, targets: Array) -> tuple[Array, Array, Array]:
  """ATKD's decomposition of KL(p‖q) at the target token g (arXiv 2402.11890).

  b = [p(g), 1−p(g)]; p̂(v) = p(v)/(1−p(g)) for v ≠ g.
  KL(p‖q) = KL(b_p‖b_q) + (1−p(g))·KL(p̂‖q̂).

  Args:
    lq, lp: [..., V] log-probabilities. targets: int [...] target token ids.
  Returns:
    (tkd, dkd, uncertainty) each [...]: the target-oriented binary KL, the
    diversity-oriented KL of the renormalised non-target distributions, and
    the teacher's uncertainty 1 − p(g).
  """
  is_g = jax.nn.one_hot(targets, lp.shape[-1], dtype=jnp.bool_)
  lp_g = jnp.sum(jnp.where(is_g, lp, 0.0), axis=-1)
  lq_g = jnp.sum(jnp.where(is_g, lq, 0.0), axis=-1)
  # log(1 − p(g)) as a log-sum-exp over v ≠ g: finite even for one-hot p.
  lp_rest = jax.nn.logsumexp(jnp.where(is_g, -jnp.inf, lp), axis=-1)
  lq_rest = jax.nn.logsumexp(jnp.where(is_g, -jnp.inf, lq), axis=-1)
  tkd = (jnp.exp(lp_g) * (lp_g - lq_g)
         + jnp.exp(lp_rest) * (lp_rest - lq_rest))
  lp_hat = jnp.where(is_g, -jnp.inf, lp - lp_rest[..., None])
  lq_hat = jnp.where(is_g, 0.0, lq - lq_rest[..., None])
  dkd = _kl(lp_hat, lq_hat)
  return tkd, dkd, jnp.exp(lp_rest)


DIVERGENCES: dict[str, Callable[..., Array]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "tvd": tvd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "akl": akl,
}

# Parameters each name accepts, with their defaults and ranges.
PARAMS: dict[str, dict[str, tuple[float, float, float]]] = {
    "forward_kl": {},
    "reverse_kl": {},
    "jsd": {"beta": (0.5, 0.0, 1.0)},
    "tvd": {},
    "skew_kl": {"alpha": (0.1, 0.0, 1.0)},
    "skew_reverse_kl": {"alpha": (0.1, 0.0, 1.0)},
    "akl": {"mu": (0.5, 0.0, 1.0)},
    "atkd": {"alpha": (0.2, 0.0, 1.0), "hard_fraction": (0.5, 0.0, 1.0)},
}
