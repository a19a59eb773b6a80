"""THE train step: sample -> score -> divergence -> update, in one compiled program.

    step = make_train_step(student, teacher, tx, method)
    state, metrics = jax.jit(step, donate_argnums=0)(state, teacher_params, batch)

Inside the step (GKD, arXiv 2306.13649, Algorithm 1):
  1. u ~ U(0, 1) from `fold_in(state.rng, state.step)`; if u < λ the targets are
     sampled from the student in-graph (no gradient through sampling), else they
     are the batch's targets, or teacher samples in SeqKD mode (`lax.cond`: one
     program, one branch executed);
  2. the teacher scores those targets (frozen, under stop-gradient). Several
     teachers (`gkd/train/teachers.py`) are routed per example by
     `batch['teacher_route']` (a teacher no row routes to is skipped with
     `lax.cond`) or mixed; a teacher with another tokenizer scores the targets
     re-tokenised on the host (`Aligner.in_graph`, a `jax.pure_callback`);
  3. the student's forward pass and the objective (`objective.compose`: a row
     of `objective.OBJECTIVES`, gkd / sft / opd) over the target tokens;
  4. optionally a policy-gradient term: loss = (1 − α)·RL + α·distill; on
     audit steps of an estimated loss, the exact divergence beside it;
  5. the optax update. A non-finite loss or gradient leaves the state unchanged
     (the loop then stops or skips, as configured).
"""

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence, Union

import flax
import gin
import jax
import jax.numpy as jnp
import optax

from gkd import losses, sampling
from gkd.errors import UserError
from gkd.models.api import Batch, Model
from gkd.tasks import pipeline
from gkd.train import accumulate
from gkd.train import objective as objective_lib
from gkd.train import teachers as teachers_lib

Array = jax.Array
# reward(sample_tokens int32[B, N], sample_mask int32[B, N], batch) -> float32[B]:
# called on the host (numpy in, numpy out) through `jax.pure_callback`; `batch`
# holds the dataset's inputs and targets (see gkd/train/rewards.py).
RewardFn = Callable[[Any, Any, Any], Any]

NONFINITE = ("stop", "skip")
LOSS_PATHS = ("fused", "plain")


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
    objective: a row of `gkd.train.objective.OBJECTIVES`: "gkd" (distil from
      the teacher), "sft" (the targets' negative log-likelihood; no teacher)
      or "opd" (sampled-token on-policy distillation; needs λ = 1).
    divergence: a `gkd.losses.Divergence` (name, parameters, temperature,
      reduction, chunking); its reduction also reduces sft and opd.
    lmbda: λ, the probability that a step trains on student samples.
    seq_kd: off-policy steps train on teacher samples instead of the data.
    sampler: how student/teacher samples are drawn (`max_new_tokens` is the
      batch's target length). The GKD paper samples at temperature 1.
    rl_alpha: α in (1 − α)·RL + α·distill; 1 is pure distillation. The RL term
      (REINFORCE with a batch-mean baseline) counts on on-policy steps only.
    sampled_kl: the opd objective's options (`SampledKL`: γ, estimator).
    cross_tokenizer: a `gkd.losses.CrossTokenizerLoss` when the teacher has
      another tokenizer (its `ModelSource.vocabulary`); None: one tokenizer.
      With objective "opd" each aligned span's text is one sampled action.
    audit_every: every this many steps (0: never), an estimated loss (the
      divergence's teacher_top_k, opd) also logs the exact full-vocabulary
      divergence on the same batch and the teacher mass the top-k keeps.
    audit_min_kept_mass: a warning line when the audited kept mass is lower.
    loss_path: "fused" (the heads applied a chunk of tokens at a time inside
      the loss, no [B, N, V] array: `gkd/train/accumulate.py`) or "plain"
      (full logits); the same loss and gradient. The fused path covers the
      gkd (one teacher, one tokenizer) and sft objectives without audits;
      other configurations run the plain path.
    microbatches: gradient accumulation inside the compiled step: the batch
      is split into this many microbatches whose gradients add up to the
      whole batch's (normalised by the whole batch's token/sequence counts).
    on_nonfinite: "stop" the run or "skip" the step on a non-finite loss.
    inject_nan_at_step: test hook: the loss at this step is NaN.
  """

  objective: str = "gkd"
  divergence: losses.Divergence = dataclasses.field(default_factory=losses.Divergence)
  lmbda: float = 0.0
  seq_kd: bool = False
  sampler: sampling.SampleConfig = dataclasses.field(default_factory=sampling.SampleConfig)
  rl_alpha: float = 1.0
  sampled_kl: objective_lib.SampledKL = dataclasses.field(
      default_factory=objective_lib.SampledKL)
  cross_tokenizer: Optional[losses.CrossTokenizerLoss] = None
  audit_every: int = 0
  audit_min_kept_mass: float = 0.5
  loss_path: str = "fused"
  microbatches: int = 1
  on_nonfinite: str = "stop"
  inject_nan_at_step: int = -1

  def __post_init__(self):
    if self.objective not in objective_lib.OBJECTIVES:
      raise UserError(f"unknown objective {self.objective!r}; choose one of "
                      f"{', '.join(objective_lib.OBJECTIVES)}")
    if not isinstance(self.divergence, losses.Divergence):
      raise UserError("Method.divergence must be a gkd.losses.Divergence, e.g. "
                      "`Method.divergence = @gkd.losses.Divergence()`")
    if not isinstance(self.sampled_kl, objective_lib.SampledKL):
      raise UserError("Method.sampled_kl must be a gkd.train.SampledKL, e.g. "
                      "`Method.sampled_kl = @gkd.train.SampledKL()`")
    _fraction("lmbda", self.lmbda)
    _fraction("rl_alpha", self.rl_alpha)
    _fraction("audit_min_kept_mass", self.audit_min_kept_mass)
    if self.loss_path not in LOSS_PATHS:
      raise UserError(f"unknown loss_path {self.loss_path!r}; choose one of "
                      f"{', '.join(LOSS_PATHS)}")
    if (isinstance(self.microbatches, bool) or not isinstance(self.microbatches, int)
        or self.microbatches < 1):
      raise UserError(f"microbatches={self.microbatches!r} must be a positive integer")
    if self.on_nonfinite not in NONFINITE:
      raise UserError(f"on_nonfinite={self.on_nonfinite!r}; choose one of "
                      f"{', '.join(NONFINITE)}")
    if self.spec.on_policy_only and (self.lmbda != 1.0 or self.seq_kd):
      raise UserError(f"objective {self.objective!r} trains on the student's own samples: "
                      "set Method.lmbda = 1.0 (and seq_kd = False)")
    if self.cross_tokenizer is not None:
      if not isinstance(self.cross_tokenizer, losses.CrossTokenizerLoss):
        raise UserError("Method.cross_tokenizer must be a gkd.losses.CrossTokenizerLoss, e.g. "
                        "`Method.cross_tokenizer = @gkd.losses.CrossTokenizerLoss()`")
      if self.objective not in ("gkd", "opd"):
        raise UserError(f"Method.cross_tokenizer works with objectives 'gkd' and 'opd', not "
                        f"{self.objective!r}; unset one of them")
      if self.objective == "opd":
        self.cross_tokenizer.check_sampled()
    if (isinstance(self.audit_every, bool) or not isinstance(self.audit_every, int)
        or self.audit_every < 0):
      raise UserError(f"audit_every={self.audit_every!r} must be an integer >= 0 (0: no audits)")

  @property
  def spec(self) -> objective_lib.Objective:
    return objective_lib.OBJECTIVES[self.objective]

  @property
  def needs_teacher(self) -> bool:
    return self.spec.uses_teacher

  @property
  def audits(self) -> bool:
    """Whether audit steps exist (an estimated loss and audit_every > 0)."""
    return bool(self.audit_every) and objective_lib.is_estimated(self)

  @property
  def needs_behavior_logq(self) -> bool:
    return self.objective == "opd" and self.sampled_kl.estimator == "importance"


def _targets(method: Method, student: Model, teacher: Optional[Model], params: Any,
             teacher_params: Any, batch: Batch, key: Array, u: Array
             ) -> tuple[Array, Array, Optional[Array], Array]:
  """Step 1: target_tokens, target_mask [B, N], their sampling-time log-probs
  [B, N] (None unless the objective needs them) and on_policy (bool[])."""
  keep = method.needs_behavior_logq
  config = dataclasses.replace(method.sampler, max_new_tokens=batch["target_tokens"].shape[1],
                               return_logprobs=keep)

  def student_samples():
    s = sampling.sample(student, jax.lax.stop_gradient(params), batch, key, config)
    return s.tokens, s.mask, s.logprobs

  def off_policy():
    if method.seq_kd:
      s = sampling.sample(teacher, teacher_params, batch, key, config)
      return s.tokens, s.mask, s.logprobs
    tokens = batch["target_tokens"].astype(jnp.int32)
    return tokens, batch["target_mask"].astype(jnp.int32), (
        jnp.zeros(tokens.shape, jnp.float32) if keep else None)

  # λ ∈ {0, 1} is known statically: compile only the branch that can run.
  if method.lmbda == 0.0:
    return (*off_policy(), jnp.array(False))
  if method.lmbda == 1.0:
    return (*student_samples(), jnp.array(True))
  on_policy = u < method.lmbda
  tokens, mask, logq = jax.lax.cond(on_policy, student_samples, off_policy)
  return tokens, mask, logq, on_policy


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


def _as_tuple(teacher: Union[None, Model, Sequence[Model]]) -> tuple[Model, ...]:
  if teacher is None:
    return ()
  return tuple(teacher) if isinstance(teacher, (tuple, list)) else (teacher,)


def _check_teachers(method: Method, student: Model, teachers: tuple[Model, ...],
                    combination: teachers_lib.Combination, aligner: Any) -> None:
  if method.needs_teacher and not teachers:
    raise UserError(f"the {method.objective} objective needs a teacher; configure one or use "
                    "objective='sft'")
  if method.cross_tokenizer is not None:
    if len(teachers) != 1 or aligner is None:
      raise UserError("cross-tokenizer distillation takes exactly one teacher and its "
                      "vocabulary (ModelSource.vocabulary)")
    return
  for t in teachers if method.needs_teacher else ():
    if t.vocab_size != student.vocab_size:
      raise UserError(
          f"teacher and student vocabularies differ ({t.vocab_size} vs "
          f"{student.vocab_size} ids); distil between models that share one tokenizer, "
          "or set Method.cross_tokenizer")
  if combination.combine == "mixture" and len(combination.weights) != len(teachers):
    raise UserError(f"{len(teachers)} teachers but {len(combination.weights)} mixture weights")


def score_teachers(teachers: Sequence[Model], teacher_params: Sequence[Any], batch: Batch,
                   combination: teachers_lib.Combination) -> Array:
  """Step 2: the teacher distribution on the batch's targets, `[B, N, V]`, constant.

  One teacher: its logits. Several: log-probabilities, routed by
  `batch['teacher_route']` (teachers no row routes to are skipped) or mixed.
  """
  if len(teachers) == 1:
    return jax.lax.stop_gradient(teachers[0].logits(teacher_params[0], batch))
  route = batch.get(pipeline.ROUTE_KEY)
  fns = [functools.partial(lambda m, p: jax.nn.log_softmax(
      m.logits(p, batch).astype(jnp.float32)), m, p) for m, p in zip(teachers, teacher_params)]
  outs = teachers_lib.score(fns, combination, route)
  return jax.lax.stop_gradient(teachers_lib.combine_log_probs(outs, combination, route))


def make_train_step(student: Model, teacher: Union[None, Model, Sequence[Model]],
                    tx: optax.GradientTransformation, method: Method,
                    reward_fn: Optional[RewardFn] = None, *,
                    combination: Optional[teachers_lib.Combination] = None,
                    aligner: Any = None
                    ) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict]]:
  """Builds `train_step(state, teacher_params, batch) -> (state, metrics)`.

  teacher: one model (then `teacher_params` is its params), or a sequence of
  models (then `teacher_params` is a tuple, in the same order), combined as
  `combination` says (default: routed by `batch['teacher_route']`).
  aligner: a `gkd.tasks.alignment.Aligner` (cross-tokenizer mode): the
  targets are re-tokenised for the teacher on the host (`jax.pure_callback`).
  """
  single = teacher is not None and not isinstance(teacher, (tuple, list))
  teachers = _as_tuple(teacher)
  combination = combination or teachers_lib.Combination()
  _check_teachers(method, student, teachers, combination, aligner)
  if method.rl_alpha < 1.0 and reward_fn is None:
    raise UserError("rl_alpha < 1 needs a reward function; the task supplies none")
  by_terms = accumulate.covers(method, len(teachers), aligner is not None)
  if method.microbatches > 1 and not by_terms:
    raise UserError("Method.microbatches > 1 works with the gkd (one teacher, one tokenizer) "
                    "and sft objectives without audits; set microbatches = 1")
  by_terms = by_terms and (method.loss_path == "fused" or method.microbatches > 1)

  def train_step(state: TrainState, teacher_params: Any, batch: Batch):
    teacher_params = (teacher_params,) if single else tuple(teacher_params or ())
    rng = jax.random.fold_in(state.rng, state.step)
    k_u, k_sample = jax.random.split(rng)
    tokens, mask, behavior_logq, on_policy = _targets(
        method, student, teachers[0] if teachers else None, state.params,
        teacher_params[0] if teachers else None, batch, k_sample, jax.random.uniform(k_u))
    data_batch = batch
    batch = sampling.with_targets(batch, sampling.Samples(tokens=tokens, mask=mask))
    teacher_out, alignment = None, None
    if method.needs_teacher and aligner is not None:
      alignment = aligner.in_graph(batch)
      teacher_out = jax.lax.stop_gradient(
          teachers[0].logits(teacher_params[0], alignment.teacher_batch()))
    elif method.needs_teacher and not by_terms:
      teacher_out = score_teachers(teachers, teacher_params, batch, combination)
    reward = jnp.zeros(tokens.shape[:1], jnp.float32)
    if method.rl_alpha < 1.0:
      reward = jax.pure_callback(
          lambda t, m, b: jnp.asarray(reward_fn(t, m, b), jnp.float32),
          jax.ShapeDtypeStruct(tokens.shape[:1], jnp.float32), tokens, mask, data_batch)
    inputs = functools.partial(objective_lib.Inputs, teacher=teacher_out, tokens=tokens,
                               mask=mask, behavior_logq=behavior_logq, alignment=alignment)

    def loss_fn(params):
      logits = student.logits(params, batch)
      loss, terms = objective_lib.compose(method, inputs(logits), reward, on_policy)
      loss = loss + jnp.where(state.step == method.inject_nan_at_step, jnp.nan, 0.0)
      return loss, (logits, terms)

    if by_terms:
      loss, grads, terms = accumulate.value_and_grad(
          method, student, teachers[0] if teachers else None, state.params,
          teacher_params[0] if teachers else None, batch, reward, on_policy)
      loss = loss + jnp.where(state.step == method.inject_nan_at_step, jnp.nan, 0.0)
    else:
      (loss, (logits, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      terms = {**terms, **_token_metrics(logits, None if alignment is not None else teacher_out,
                                         mask)}
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           opt_state=keep(opt_state, state.opt_state), rng=state.rng)
    maskf = mask.astype(jnp.float32)
    metrics = {
        "loss": loss, **terms, "reward": jnp.mean(reward),
        "on_policy": on_policy.astype(jnp.float32),
        "sampled_length": jnp.mean(jnp.sum(maskf, -1)),
        "eos_rate": jnp.mean(jnp.any((tokens == student.eos_id) & (mask > 0), -1)
                             .astype(jnp.float32)),
        "target_tokens": jnp.sum(maskf),
        "grad_norm": grad_norm, "param_norm": optax.global_norm(state.params),
        "update_norm": optax.global_norm(updates), "finite": finite.astype(jnp.float32),
    }
    if method.audits:
      metrics.update(_audit(method, state.step, inputs(jax.lax.stop_gradient(logits))))
    return new_state, metrics

  return train_step


def _audit(method: Method, step: Array, x: objective_lib.Inputs) -> dict:
  """The audit metrics on audit steps ('audit' 1), zeros elsewhere ('audit' 0)."""
  is_audit = step % method.audit_every == 0
  exact = lambda: objective_lib.audit(method, x)
  zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(exact))
  return {"audit": is_audit.astype(jnp.float32), **jax.lax.cond(is_audit, exact, zeros)}
