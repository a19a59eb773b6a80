"""What the student is trained to minimise: the objectives and the one loss composition.

    loss, aux = objective.compose(method, Inputs(student_logits, teacher_log_probs, tokens, mask))

Each objective is a row of `OBJECTIVES` (a loss function and its flags), so
the train step never branches on the objective's name:

  gkd  a `gkd.losses` divergence D(teacher ‖ student) over the full vocabulary
       (or the teacher's top-k plus a tail bucket), or, with
       `Method.cross_tokenizer`, a `CrossTokenizerLoss` against a teacher with
       another tokenizer;
  sft  the targets' negative log-likelihood (no teacher);
  opd  sampled-token on-policy distillation (`gkd/losses/sampled.py`): on the
       student's own samples, the policy gradient with per-token advantage
       −(log q(y_t) − log p(y_t)); only the teacher's log-probabilities of the
       sampled tokens enter. Options in `Method.sampled_kl` (`SampledKL`). With
       `Method.cross_tokenizer` each aligned span's text is one action
       (`CrossTokenizerLoss`, `span_sampled_kl`).

`compose` adds the RL term: loss = (1 − α)·RL + α·distill, RL counting on
on-policy steps only. `audit` computes, for estimated losses, the exact
full-vocabulary divergence and the teacher mass a top-k keeps.
"""

import dataclasses
from typing import Any, Callable, Optional

import gin
import jax
import jax.numpy as jnp

from gkd import losses
from gkd.errors import UserError
from gkd.losses import sampled

Array = jax.Array
ESTIMATORS = ("reinforce", "importance")


@gin.configurable(module="gkd.train")
@dataclasses.dataclass(frozen=True)
class SampledKL:
  """Options of the 'opd' objective.

  Attributes:
    gamma: discount of future tokens' log-ratios in each token's advantage
      (0: the token's own, the token-level reverse KL's gradient; 1: the
      sequence-level KL's).
    estimator: 'reinforce' (the samples are from the student itself) or
      'importance' (each token reweighted by q(y_t)/b(y_t) with b the
      sampling-time distribution: temperature ≠ 1, top-k/top-p).
    is_clip: truncates the importance ratio (None: no truncation).
  """

  gamma: float = 0.0
  estimator: str = "reinforce"
  is_clip: Optional[float] = None

  def __post_init__(self):
    sampled.check_options(self.gamma, self.is_clip)
    if self.estimator not in ESTIMATORS:
      raise UserError(f"unknown SampledKL.estimator {self.estimator!r}; choose one of "
                      f"{', '.join(ESTIMATORS)}")
    if self.is_clip is not None and self.estimator != "importance":
      raise UserError("SampledKL.is_clip truncates importance ratios; set "
                      "estimator='importance' or unset is_clip")


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What a loss sees (all inside the compiled step).

  student_logits: float `[B, N, V]`, differentiable.
  teacher: float32 `[B, N, V]` teacher log-probabilities (several teachers
    already routed or mixed), constant; `[B, O_t, V_t]` teacher logits in
    cross-tokenizer mode; None for objectives without a teacher.
  tokens, mask: int32 `[B, N]` the targets trained on (samples or data).
  behavior_logq: float32 `[B, N]` sampling-time log-probs of `tokens` (opd's
    importance estimator), or None.
  alignment: a `gkd.tasks.alignment.Alignment` (cross-tokenizer mode), or None.
  """

  student_logits: Array
  teacher: Optional[Array]
  tokens: Array
  mask: Array
  behavior_logq: Optional[Array] = None
  alignment: Any = None


def _gkd(method, x: Inputs) -> Array:
  if method.cross_tokenizer is not None:
    return method.cross_tokenizer(x.student_logits, x.teacher, x.tokens, x.mask, x.alignment)
  return method.divergence(x.student_logits, x.teacher, x.mask, targets=x.tokens)


def _sft(method, x: Inputs) -> Array:
  nll = -sampled.token_log_probs(x.student_logits, x.tokens)
  return losses.reduce(nll, x.mask, method.divergence.reduction)


def _opd(method, x: Inputs) -> Array:
  options = method.sampled_kl
  if method.cross_tokenizer is not None:  # one action per aligned span
    return method.cross_tokenizer(x.student_logits, x.teacher, x.tokens, x.mask, x.alignment,
                                  sampled_kl=options, behavior_logq=x.behavior_logq)
  behavior = x.behavior_logq if options.estimator == "importance" else None
  values = sampled.per_token(sampled.token_log_probs(x.student_logits, x.tokens),
                             sampled.token_log_probs(x.teacher, x.tokens), x.mask,
                             gamma=options.gamma, behavior_logq=behavior, is_clip=options.is_clip)
  return losses.reduce(values, x.mask, method.divergence.reduction)


@dataclasses.dataclass(frozen=True)
class Objective:
  """One objective: its scalar loss and what it needs.

  loss(method, Inputs) -> float32[] (differentiable in the student logits).
  uses_teacher: the step scores the targets with the teacher(s).
  on_policy_only: trains on the student's own samples only (λ must be 1).
  """

  loss: Callable[[Any, Inputs], Array]
  uses_teacher: bool
  on_policy_only: bool = False


OBJECTIVES: dict[str, Objective] = {
    "gkd": Objective(_gkd, uses_teacher=True),
    "sft": Objective(_sft, uses_teacher=False),
    "opd": Objective(_opd, uses_teacher=True, on_policy_only=True),
}


def policy_gradient(logits: Array, tokens: Array, mask: Array, reward: Array) -> Array:
  """REINFORCE with a batch-mean baseline: −mean_b[(r_b − r̄)·mean_t log q(y_t)]."""
  logq = sampled.token_log_probs(logits, tokens)
  mask = mask.astype(jnp.float32)
  seq_logq = jnp.sum(logq * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
  advantage = jax.lax.stop_gradient(reward - jnp.mean(reward))
  return -jnp.mean(advantage * seq_logq)


def compose(method, x: Inputs, reward: Optional[Array] = None,
            on_policy: Optional[Array] = None) -> tuple[Array, dict[str, Array]]:
  """The step's scalar loss and its terms {'distill_loss', 'rl_loss'}.

  reward: float32 `[B]` (used when `method.rl_alpha < 1`); on_policy: bool[]
  (the RL term counts on on-policy steps only).
  """
  distill = OBJECTIVES[method.objective].loss(method, x)
  loss, rl = distill, jnp.zeros((), jnp.float32)
  if method.rl_alpha < 1.0:
    rl = policy_gradient(x.student_logits, x.tokens, x.mask, reward) * on_policy
    loss = method.rl_alpha * distill + (1.0 - method.rl_alpha) * rl
  return loss, {"distill_loss": distill, "rl_loss": rl}


# --------------------------------------------------------------------------- audits


def is_estimated(method) -> bool:
  """Whether the distillation loss estimates a full-vocabulary divergence."""
  return method.cross_tokenizer is None and (
      method.objective == "opd" or
      (method.objective == "gkd" and method.divergence.teacher_top_k is not None))


def exact_divergence(method) -> losses.Divergence:
  """The full-vocabulary divergence an estimated loss stands for."""
  if method.objective == "opd":  # OPD estimates KL(q ‖ p) at temperature 1
    # Every field given: Divergence is Gin-configurable, and the run's bindings are not this one's.
    return losses.Divergence("reverse_kl", params={}, temperature=1.0,
                             reduction=method.divergence.reduction, chunk_size=None,
                             chunk_elements=None, teacher_top_k=None)
  return dataclasses.replace(method.divergence, teacher_top_k=None)


def kept_mass(teacher: Array, mask: Array, k: int, temperature: float) -> Array:
  """Token-mean teacher probability of its top-k tokens (at the divergence's temperature)."""
  logp = jax.nn.log_softmax(teacher.astype(jnp.float32) / temperature)
  top = jnp.sum(jnp.exp(jax.lax.top_k(logp, k)[0]), axis=-1)
  return losses.reduce(top, mask, "token")


def audit(method, x: Inputs) -> dict[str, Array]:
  """{'audit_exact_divergence'[, 'audit_kept_mass']} on this batch (no gradient)."""
  logits = jax.lax.stop_gradient(x.student_logits)
  out = {"audit_exact_divergence": exact_divergence(method)(logits, x.teacher, x.mask,
                                                            targets=x.tokens)}
  k = method.divergence.teacher_top_k
  if method.objective == "gkd" and k is not None:
    out["audit_kept_mass"] = kept_mass(x.teacher, x.mask, k, method.divergence.temperature)
  return out
