"""Sampled-token on-policy distillation (OPD): reverse KL as a policy gradient.

On the student's own samples y ~ q, each token gets the advantage

    A_t = Σ_{s ≥ t} γ^{s−t} · (log p(y_s) − log q(y_s))      (p teacher, q student)

and the student follows the REINFORCE gradient −Σ_t A_t ∇ log q(y_t). Only the
two models' log-probabilities *of the sampled tokens* enter, so the teacher's
full distribution is never needed (the objective popularised by Thinking
Machines' "On-Policy Distillation", 2025; Tinker, TRL, NeMo RL, verl).

Relation to full-vocabulary reverse KL (GKD with `reverse_kl` at λ = 1): for
γ = 0, E_{y_t ~ q}[(log q(y_t) − log p(y_t)) ∇ log q(y_t)] = ∇ KL(q_t ‖ p_t)
exactly (Σ_v ∇q_v = 0), so the expected gradient equals the token-level
reverse-KL gradient at every prefix: the same expectation from one sample
instead of a sum over the vocabulary, hence higher variance. γ = 1 gives the
gradient of the *sequence-level* KL(q(y|x) ‖ p(y|x)), which also credits a
token with the teacher's opinion of what follows it; GKD's token-level loss
ignores that effect of a token on later states.

Importance sampling: when the tokens were drawn from another distribution b
(a sampling temperature ≠ 1, top-k/top-p, or a stale or lower-precision
sampler), `behavior_logq = log b(y_t)` reweights each token by
ρ_t = q(y_t)/b(y_t) (truncated at `is_clip`), which makes the γ = 0 gradient
unbiased again (for γ > 0 only each token's own ratio is applied).

The per-token *value* returned is ρ_t·(log q(y_t) − log p(y_t)), an unbiased
one-sample estimate of KL(q_t ‖ p_t) (ρ_t = 1 without importance sampling),
so logged losses compare with the exact reverse KL; its *gradient* is the
policy gradient above.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from gkd.errors import UserError

Array = jax.Array
sg = jax.lax.stop_gradient


def token_log_probs(logits: Array, tokens: Array, temperature: float = 1.0) -> Array:
  """log softmax(logits / T)[token]: float32 `[batch, length]` from `[batch, length, vocab]`."""
  x = logits.astype(jnp.float32) / temperature
  picked = jnp.take_along_axis(x, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(x, axis=-1)


def discounted_sum(values: Array, mask: Array, gamma: float) -> Array:
  """R_t = Σ_{s ≥ t, mask_s} γ^{s−t} v_s along the last axis: `[batch, length]`.

  Masked positions contribute nothing and get 0. γ = 0 returns the masked values.
  """
  values = jnp.where(mask > 0, values.astype(jnp.float32), 0.0)
  if gamma == 0.0:
    return values

  def step(future, v):
    now = v + gamma * future
    return now, now

  _, out = jax.lax.scan(step, jnp.zeros(values.shape[:-1], jnp.float32),
                        jnp.moveaxis(values, -1, 0), reverse=True)
  return jnp.where(mask > 0, jnp.moveaxis(out, 0, -1), 0.0)


def check_options(gamma: float, is_clip: Optional[float]) -> None:
  if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
    raise UserError(f"opd gamma={gamma!r} is out of range; it must be a number in [0, 1]")
  if is_clip is not None and (isinstance(is_clip, bool) or not isinstance(is_clip, (int, float))
                              or not is_clip > 0):
    raise UserError(f"opd is_clip={is_clip!r} must be a number > 0 (or None: no truncation)")


def per_token(student_logq: Array, teacher_logp: Array, mask: Array, *, gamma: float = 0.0,
              behavior_logq: Optional[Array] = None,
              is_clip: Optional[float] = None) -> Array:
  """OPD's per-token surrogate: value ρ·(log q − log p), gradient −ρ·A·∇log q.

  Args:
    student_logq: float32 `[batch, length]` log q(y_t) of the sampled tokens,
      differentiable in the student's parameters.
    teacher_logp: `[batch, length]` log p(y_t) (a constant).
    mask: `[batch, length]` 1 on sampled tokens.
    gamma: discount of future tokens' log-ratios in the advantage (0: this
      token's own; 1: the rest of the sequence).
    behavior_logq: `[batch, length]` log-probs of the distribution the tokens
      were drawn from, for importance sampling; None when it is q itself.
    is_clip: truncates the importance ratio at this value (None: no cap).
  Returns:
    float32 `[batch, length]`, 0 where mask is 0; reduce with `gkd.losses.reduce`.
  """
  check_options(gamma, is_clip)
  if student_logq.shape != teacher_logp.shape or student_logq.shape != mask.shape:
    raise UserError(f"opd: student log-probs {student_logq.shape}, teacher log-probs "
                    f"{teacher_logp.shape} and mask {mask.shape} must have one shape "
                    "[batch, length]")
  logq = student_logq.astype(jnp.float32)
  log_ratio = sg(logq) - sg(teacher_logp.astype(jnp.float32))  # log q − log p
  advantage = -discounted_sum(log_ratio, mask, gamma)
  weight = jnp.ones_like(logq)
  if behavior_logq is not None:
    weight = jnp.exp(sg(logq) - sg(behavior_logq.astype(jnp.float32)))
    if is_clip is not None:
      weight = jnp.minimum(weight, is_clip)
  # Value: the (reweighted) sample estimate of KL(q‖p); gradient: −w·A·∇log q.
  values = weight * log_ratio - weight * advantage * (logq - sg(logq))
  return jnp.where(mask > 0, values, 0.0)
