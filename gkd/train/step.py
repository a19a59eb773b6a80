"""THE train step: sample -> score -> divergence -> update, in one compiled program.

    step = make_train_step(student, teacher, tx, method)
    state, metrics = jax.jit(step, donate_argnums=0)(state, teacher_params, batch)

Inside the step (GKD, arXiv 2306.13649, Algorithm 1):
  1. u ~ U(0, 1) from `fold_in(state.rng, state.step)`; if u < λ the targets are
     sampled from the student in-graph (no gradient through sampling), else they
     are the batch's targets, or teacher samples in SeqKD mode (`lax.cond`: one
     program, one branch executed);
  2. the teacher scores those targets (frozen, under stop-gradient);
  3. the student's forward pass and the divergence over the target tokens;
  4. optionally a policy-gradient term: loss = (1 − α)·RL + α·GKD;
  5. the optax update. A non-finite loss or gradient leaves the state unchanged
     (the loop then stops or skips, as configured).
"""

import dataclasses
from typing import Any, Callable, Optional

import flax
import gin
import jax
import jax.numpy as jnp
import optax

from gkd import losses, sampling
from gkd.errors import UserError
from gkd.models.api import Batch, Model

Array = jax.Array
# reward(sample_tokens int32[B, N], sample_mask int32[B, N], batch) -> float32[B]:
# called on the host (numpy in, numpy out) through `jax.pure_callback`; `batch`
# holds the dataset's inputs and targets (see gkd/train/rewards.py).
RewardFn = Callable[[Any, Any, Any], Any]

OBJECTIVES = ("gkd", "sft")
NONFINITE = ("stop", "skip")


@flax.struct.dataclass
class TrainState:
  step: Array  # int32[]
  params: Any  # the student's parameters
  opt_state: Any
  rng: Array  # the run's sampling key; step t uses fold_in(rng, t)


def _fraction(name: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
    raise UserError(f"{name}={value!r} is out of range; it must be a number in [0, 1]")
  return float(value)


@gin.configurable(module="gkd.train")
@dataclasses.dataclass(frozen=True)
class Method:
  """What the student trains on and against (validated before any compile).

  Attributes:
    objective: "gkd" (distil from the teacher) or "sft" (the targets'
      negative log-likelihood; no teacher).
    divergence: a `gkd.losses.Divergence` (name, parameters, temperature,
      reduction, chunking).
    lmbda: λ, the probability that a step trains on student samples.
    seq_kd: off-policy steps train on teacher samples instead of the data.
    sampler: how student/teacher samples are drawn (`max_new_tokens` is the
      batch's target length). The GKD paper samples at temperature 1.
    rl_alpha: α in (1 − α)·RL + α·GKD; 1 is pure distillation. The RL term
      (REINFORCE with a batch-mean baseline) counts on on-policy steps only.
    on_nonfinite: "stop" the run or "skip" the step on a non-finite loss.
    inject_nan_at_step: test hook: the loss at this step is NaN.
  """

  objective: str = "gkd"
  divergence: losses.Divergence = dataclasses.field(default_factory=losses.Divergence)
  lmbda: float = 0.0
  seq_kd: bool = False
  sampler: sampling.SampleConfig = dataclasses.field(default_factory=sampling.SampleConfig)
  rl_alpha: float = 1.0
  on_nonfinite: str = "stop"
  inject_nan_at_step: int = -1

  def __post_init__(self):
    if self.objective not in OBJECTIVES:
      raise UserError(f"unknown objective {self.objective!r}; choose one of "
                      f"{', '.join(OBJECTIVES)}")
    if not isinstance(self.divergence, losses.Divergence):
      raise UserError("Method.divergence must be a gkd.losses.Divergence, e.g. "
                      "`Method.divergence = @gkd.losses.Divergence()`")
    _fraction("lmbda", self.lmbda)
    _fraction("rl_alpha", self.rl_alpha)
    if self.on_nonfinite not in NONFINITE:
      raise UserError(f"on_nonfinite={self.on_nonfinite!r}; choose one of "
                      f"{', '.join(NONFINITE)}")

  @property
  def needs_teacher(self) -> bool:
    return self.objective == "gkd"


def _targets(method: Method, student: Model, teacher: Optional[Model], params: Any,
             teacher_params: Any, batch: Batch, key: Array, u: Array) -> tuple[Array, Array, Array]:
  """Step 1: (target_tokens, target_mask) [B, N] and on_policy (bool[])."""
  config = dataclasses.replace(method.sampler,
                               max_new_tokens=batch["target_tokens"].shape[1])

  def student_samples():
    s = sampling.sample(student, jax.lax.stop_gradient(params), batch, key, config)
    return s.tokens, s.mask

  def off_policy():
    if method.seq_kd:
      s = sampling.sample(teacher, teacher_params, batch, key, config)
      return s.tokens, s.mask
    return batch["target_tokens"].astype(jnp.int32), batch["target_mask"].astype(jnp.int32)

  # λ ∈ {0, 1} is known statically: compile only the branch that can run.
  if method.lmbda == 0.0:
    return (*off_policy(), jnp.array(False))
  if method.lmbda == 1.0:
    return (*student_samples(), jnp.array(True))
  on_policy = u < method.lmbda
  tokens, mask = jax.lax.cond(on_policy, student_samples, off_policy)
  return tokens, mask, on_policy


def _policy_gradient(logits: Array, tokens: Array, mask: Array, reward: Array) -> Array:
  """REINFORCE with a batch-mean baseline: −mean_b[(r_b − r̄)·mean_t log q(y_t)]."""
  logq = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], axis=-1)[..., 0]
  mask = mask.astype(jnp.float32)
  seq_logq = jnp.sum(logq * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
  advantage = jax.lax.stop_gradient(reward - jnp.mean(reward))
  return -jnp.mean(advantage * seq_logq)


def _token_metrics(logits: Array, teacher_logits: Optional[Array], mask: Array) -> dict:
  """Student entropy and agreement with the teacher's argmax over valid tokens."""
  logits = jax.lax.stop_gradient(logits)
  logq = jax.nn.log_softmax(logits)
  entropy = -jnp.sum(jnp.exp(logq) * logq, -1)
  out = {"student_entropy": losses.reduce(entropy, mask, "token")}
  if teacher_logits is not None:
    agree = (jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1)).astype(jnp.float32)
    out["teacher_agreement"] = losses.reduce(agree, mask, "token")
  return out


def make_train_step(student: Model, teacher: Optional[Model], tx: optax.GradientTransformation,
                    method: Method, reward_fn: Optional[RewardFn] = None
                    ) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict]]:
  """Builds `train_step(state, teacher_params, batch) -> (state, metrics)`."""
  if method.needs_teacher and teacher is None:
    raise UserError("the gkd objective needs a teacher; configure one or use objective='sft'")
  if method.rl_alpha < 1.0 and reward_fn is None:
    raise UserError("rl_alpha < 1 needs a reward function; the task supplies none")
  if method.needs_teacher and teacher.vocab_size != student.vocab_size:
    raise UserError(
        f"teacher and student vocabularies differ ({teacher.vocab_size} vs "
        f"{student.vocab_size} ids); distil between models that share one tokenizer")

  def train_step(state: TrainState, teacher_params: Any, batch: Batch):
    rng = jax.random.fold_in(state.rng, state.step)
    k_u, k_sample = jax.random.split(rng)
    tokens, mask, on_policy = _targets(method, student, teacher, state.params, teacher_params,
                                       batch, k_sample, jax.random.uniform(k_u))
    data_batch = batch
    batch = sampling.with_targets(batch, sampling.Samples(tokens=tokens, mask=mask))
    teacher_logits = None
    if method.needs_teacher:
      teacher_logits = jax.lax.stop_gradient(teacher.logits(teacher_params, batch))
    reward = jnp.zeros(tokens.shape[:1], jnp.float32)
    if method.rl_alpha < 1.0:
      reward = jax.pure_callback(
          lambda t, m, b: jnp.asarray(reward_fn(t, m, b), jnp.float32),
          jax.ShapeDtypeStruct(tokens.shape[:1], jnp.float32), tokens, mask, data_batch)

    def loss_fn(params):
      logits = student.logits(params, batch)
      if method.objective == "sft":
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]
        distill = losses.reduce(nll, mask, method.divergence.reduction)
      else:
        distill = method.divergence(logits, teacher_logits, mask, targets=tokens)
      loss = distill
      rl = jnp.zeros((), jnp.float32)
      if method.rl_alpha < 1.0:
        rl = _policy_gradient(logits, tokens, mask, reward) * on_policy
        loss = method.rl_alpha * distill + (1.0 - method.rl_alpha) * rl
      loss = loss + jnp.where(state.step == method.inject_nan_at_step, jnp.nan, 0.0)
      return loss, (logits, distill, rl)

    (loss, (logits, distill, rl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           opt_state=keep(opt_state, state.opt_state), rng=state.rng)
    maskf = mask.astype(jnp.float32)
    metrics = {
        "loss": loss, "distill_loss": distill, "rl_loss": rl, "reward": jnp.mean(reward),
        "on_policy": on_policy.astype(jnp.float32),
        "sampled_length": jnp.mean(jnp.sum(maskf, -1)),
        "eos_rate": jnp.mean(jnp.any((tokens == student.eos_id) & (mask > 0), -1)
                             .astype(jnp.float32)),
        "target_tokens": jnp.sum(maskf),
        "grad_norm": grad_norm, "param_norm": optax.global_norm(state.params),
        "update_norm": optax.global_norm(updates), "finite": finite.astype(jnp.float32),
        **_token_metrics(logits, teacher_logits, mask),
    }
    return new_state, metrics

  return train_step
