"""Distillation losses between a teacher and a student with different tokenizers.

Inputs follow gkd.losses: logits `[batch, length, vocab]` (any float dtype, in
float32 after the temperature), the teacher under stop-gradient; here the two
lengths and vocabularies differ. Positions are matched by
`gkd.tasks.alignment.Aligner` (its `Alignment` arrays).

* Universal logit distillation (ULD, Boizard et al. 2024, arXiv 2402.12030):
  Σ_i |q↓_i − p↓_i|, the L1 distance between the two next-token probability
  vectors each sorted in descending order, the shorter padded with zeros (the
  closed-form Wasserstein distance under a uniform cost). The paper pairs the
  i-th target token of each side (`uld_per_token`); we also pair the first
  token of every aligned span (`uld_per_span`), where both models predict from
  the same text. The paper's loss is CE + λ·ULD (λ = 1.5 in its code).
* Aligned spans (`span_divergence`): per span, each model's probability of the
  span's text P = Π over its tokens, and any registered divergence between
  the two distributions collapsed onto {this text, anything else}:
  log-probs (log P, log(1 − P)). A collapse never increases an f-divergence
  (data processing), as in `topk.py`.
* Sampled spans (`span_sampled_kl`, objective 'opd'): on the student's own
  samples, OPD (`sampled.py`) with one action per aligned span: advantage
  −(log q(text) − log p(text)), q and p each model's probability of the span's
  text. Its expected gradient is the span-level reverse KL's,
  E_{text ~ q}[(log q − log p)·∇log q(text)] = ∇KL(q ‖ p) over every text the
  span could hold, where the 2-bucket comparison above only sees {this text,
  anything else}: when both models find a sample unlikely that comparison is
  ~0, while −log p(text) still punishes it.
"""

import dataclasses
from typing import Any, Optional

import gin
import jax
import jax.numpy as jnp

from gkd.errors import UserError
from gkd.losses import api
from gkd.losses import divergences
from gkd.losses import sampled

Array = jax.Array

MODES = ("uld", "uld_spans", "spans")


def _probs(logits: Array, temperature: float) -> Array:
  return jnp.exp(api._log_probs(logits, temperature))  # pylint: disable=protected-access


def uld_distance(student_logits: Array, teacher_logits: Array, temperature: float = 1.0) -> Array:
  """Σ_i |sort↓(q)_i − sort↓(p)_i| over `[..., Vs]` and `[..., Vt]` logits -> `[...]`.

  The shorter sorted vector is padded with zeros, so the tail of the longer
  one counts with its own mass. Differentiable: `jnp.sort` carries the
  gradient through its permutation.
  """
  q = -jnp.sort(-_probs(student_logits, temperature), axis=-1)
  p = -jnp.sort(-_probs(jax.lax.stop_gradient(teacher_logits), temperature), axis=-1)
  width = max(q.shape[-1], p.shape[-1])
  pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
  return jnp.sum(jnp.abs(pad(q) - pad(p)), axis=-1)


def _check_pair(student_logits: Array, teacher_logits: Array) -> None:
  if student_logits.ndim != 3 or teacher_logits.ndim != 3:
    raise UserError(f"logits must be [batch, length, vocab]; got student {student_logits.shape}, "
                    f"teacher {teacher_logits.shape}")
  if student_logits.shape[0] != teacher_logits.shape[0]:
    raise UserError(f"student and teacher logits have different batch sizes: "
                    f"{student_logits.shape[0]} vs {teacher_logits.shape[0]}")


def _check(name: str, array: Array, shape: tuple) -> None:
  if tuple(array.shape) != tuple(shape):
    raise UserError(f"{name} has shape {tuple(array.shape)}, expected {tuple(shape)}; pass the "
                    "Alignment computed for these logits' batch and lengths")


def _check_spans(span_mask: Array, batch: int) -> None:
  if span_mask.ndim != 2 or span_mask.shape[0] != batch:
    raise UserError(f"span_mask has shape {tuple(span_mask.shape)}, expected [{batch}, spans]; "
                    "pass the Alignment computed for this batch")


def _check_span_inputs(student_logits, teacher_logits, student_targets, teacher_targets,
                       student_span, teacher_span, span_mask) -> int:
  """Checks the span functions' shapes against each other; returns the span count S."""
  _check_pair(student_logits, teacher_logits)
  b, o_s, o_t = student_logits.shape[0], student_logits.shape[1], teacher_logits.shape[1]
  _check("student_targets", student_targets, (b, o_s))
  _check("student_span", student_span, (b, o_s))
  _check("teacher_targets", teacher_targets, (b, o_t))
  _check("teacher_span", teacher_span, (b, o_t))
  _check_spans(span_mask, b)
  return span_mask.shape[1]


def uld_per_token(student_logits: Array, teacher_logits: Array, student_mask: Array,
                  teacher_mask: Array, temperature: float = 1.0) -> tuple[Array, Array]:
  """The paper's pairing: student target position t with teacher target position t.

  Args:
    student_logits: `[B, O_s, V_s]`; teacher_logits: `[B, O_t, V_t]`.
    student_mask: `[B, O_s]`; teacher_mask: `[B, O_t]` (right-padded targets).
  Returns:
    (values `[B, O_s]`, mask `[B, O_s]`): ULD at positions valid on both sides
    (t < min of the two lengths), 0 elsewhere.
  """
  temperature = api.check_temperature(temperature)
  _check_pair(student_logits, teacher_logits)
  b, o_s, o_t = student_logits.shape[0], student_logits.shape[1], teacher_logits.shape[1]
  _check("student_mask", student_mask, (b, o_s))
  _check("teacher_mask", teacher_mask, (b, o_t))
  n = min(o_s, o_t)
  values = uld_distance(student_logits[:, :n], teacher_logits[:, :n], temperature)
  mask = (student_mask[:, :n] > 0) & (teacher_mask[:, :n] > 0)
  pad = [(0, 0), (0, o_s - n)]
  return (jnp.pad(jnp.where(mask, values, 0.0), pad),
          jnp.pad(mask.astype(jnp.float32), pad))


def _gather(x: Array, positions: Array) -> Array:
  """x `[B, O, ...]` at positions `[B, S]` -> `[B, S, ...]`."""
  index = positions.reshape(positions.shape + (1,) * (x.ndim - 2)).astype(jnp.int32)
  return jnp.take_along_axis(x, index, axis=1)


def uld_per_span(student_logits: Array, teacher_logits: Array, student_span_start: Array,
                 teacher_span_start: Array, span_mask: Array,
                 temperature: float = 1.0) -> tuple[Array, Array]:
  """ULD at each aligned span's first token, where both predict from the same text.

  Args:
    student_logits `[B, O_s, V_s]`, teacher_logits `[B, O_t, V_t]`;
    student_span_start / teacher_span_start / span_mask `[B, S]` (Alignment).
  Returns:
    (values `[B, S]`, span_mask `[B, S]` as float32).
  """
  temperature = api.check_temperature(temperature)
  _check_pair(student_logits, teacher_logits)
  _check_spans(span_mask, student_logits.shape[0])
  _check("student_span_start", student_span_start, span_mask.shape)
  _check("teacher_span_start", teacher_span_start, span_mask.shape)
  values = uld_distance(_gather(student_logits, student_span_start),
                        _gather(teacher_logits, teacher_span_start), temperature)
  mask = span_mask > 0
  return jnp.where(mask, values, 0.0), mask.astype(jnp.float32)


def token_log_probs(logits: Array, tokens: Array, temperature: float = 1.0) -> tuple[Array, Array]:
  """(log q(y_t), log(1 − q(y_t))) of the target tokens: `[B, O]` each.

  The second is a log-sum-exp over the other tokens, finite even where
  q(y_t) rounds to 1.
  """
  lq = api._log_probs(logits, temperature)  # pylint: disable=protected-access
  is_y = jax.nn.one_hot(tokens, lq.shape[-1], dtype=jnp.bool_)
  return (jnp.sum(jnp.where(is_y, lq, 0.0), axis=-1),
          jax.nn.logsumexp(jnp.where(is_y, -jnp.inf, lq), axis=-1))


def _segment_exclusive_cumsum(x: Array, span: Array) -> Array:
  """Σ of x over the earlier tokens of the same span `[B, O]` (spans are consecutive runs)."""
  start = jnp.concatenate([jnp.ones_like(span[:, :1], jnp.bool_), span[:, 1:] != span[:, :-1]],
                          axis=1)

  def combine(a, b):
    (fa, va), (fb, vb) = a, b
    return fa | fb, jnp.where(fb, vb, va + vb)
  _, inclusive = jax.lax.associative_scan(combine, (start, x), axis=1)
  shifted = jnp.pad(inclusive[:, :-1], [(0, 0), (1, 0)])
  return jnp.where(start, 0.0, shifted)


def _per_span(span: Array, num_spans: int):
  """`seg(f, x)`: the segment reduction f (jax.ops.segment_*) of x `[B, O]` per span -> `[B, S]`."""
  b = span.shape[0]
  ids = jnp.where(span >= 0, span + num_spans * jnp.arange(b)[:, None], b * num_spans)

  def seg(f, x: Array) -> Array:
    out = f(x.reshape(-1), ids.reshape(-1), num_segments=b * num_spans + 1)
    return out[:-1].reshape(b, num_spans)  # the last segment collects span -1
  return seg


def span_log_probs(token_lp: Array, token_rest: Array, span: Array,
                   num_spans: int) -> tuple[Array, Array]:
  """Per span: (log P(text), log(1 − P(text))) `[B, S]` from per-token values `[B, O]`.

  P(text) = Π_t q(y_t) over the span's tokens, and exactly
  1 − P = Σ_i (Π_{j<i} q(y_j))·(1 − q(y_i)) (the first token that deviates),
  summed in log space. `span` holds ids in [0, S) or -1 (ignored); the tokens
  of one span must be consecutive. Spans without tokens give (0, -inf).
  """
  valid = span >= 0
  token_lp = jnp.where(valid, token_lp, 0.0)
  seg = _per_span(span, num_spans)
  log_p = seg(jax.ops.segment_sum, token_lp)
  rest = jnp.where(valid, _segment_exclusive_cumsum(token_lp, span) + token_rest, -jnp.inf)
  top = jax.lax.stop_gradient(seg(jax.ops.segment_max, rest))
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  shift = jnp.take_along_axis(jnp.pad(top, [(0, 0), (0, 1)]), jnp.where(valid, span, num_spans),
                              axis=1)
  total = seg(jax.ops.segment_sum, jnp.where(valid, jnp.exp(rest - shift), 0.0))
  safe = jnp.where(total > 0, total, 1.0)
  log_rest = jnp.where(total > 0, jnp.log(safe) + top, -jnp.inf)
  return log_p, log_rest


def _check_divergence(name: str, params: dict) -> dict[str, float]:
  if name == "atkd":
    raise UserError("atkd needs a vocabulary-sized distribution; the aligned-span loss compares "
                    "two buckets per span: choose another divergence")
  return api.check_params(name, dict(params))


def span_divergence(name: str, student_logits: Array, teacher_logits: Array,
                    student_targets: Array, teacher_targets: Array, student_span: Array,
                    teacher_span: Array, span_mask: Array, *, temperature: float = 1.0,
                    **params: float) -> tuple[Array, Array]:
  """D(teacher ‖ student) on each aligned span's 2-bucket distribution.

  Args:
    name: a `gkd.losses` divergence (not atkd), with its **params.
    student_logits `[B, O_s, V_s]`, student_targets / student_span `[B, O_s]`;
    teacher_logits `[B, O_t, V_t]`, teacher_targets / teacher_span `[B, O_t]`
    (Alignment.target_tokens / .teacher_span); span_mask `[B, S]`.
  Returns:
    (values `[B, S]`, span_mask `[B, S]` as float32); 0 on masked spans.
  """
  checked = _check_divergence(name, params)
  temperature = api.check_temperature(temperature)
  s = _check_span_inputs(student_logits, teacher_logits, student_targets, teacher_targets,
                         student_span, teacher_span, span_mask)
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  lq = span_log_probs(*token_log_probs(student_logits, student_targets, temperature),
                      student_span, s)
  lp = span_log_probs(*token_log_probs(teacher_logits, teacher_targets, temperature),
                      teacher_span, s)
  mask = span_mask > 0
  half = jnp.log(0.5)
  two = lambda pair: jnp.where(mask[..., None], jnp.stack(pair, axis=-1), half)
  values = divergences.DIVERGENCES[name](two(lq), two(lp), **checked)
  return jnp.where(mask, jnp.maximum(values, 0.0), 0.0), mask.astype(jnp.float32)


def span_sampled_kl(student_logits: Array, teacher_logits: Array, student_targets: Array,
                    teacher_targets: Array, student_span: Array, teacher_span: Array,
                    span_mask: Array, *, gamma: float = 0.0,
                    behavior_logq: Optional[Array] = None,
                    is_clip: Optional[float] = None) -> tuple[Array, Array]:
  """OPD on aligned spans: each span's text is one action of the student.

  Per span s: log q_s = Σ log q(y_t) over its student tokens, log p_s = Σ
  log p(z_t) over its teacher tokens (temperature 1), and `sampled.per_token`
  over the spans in text order: value ρ_s·(log q_s − log p_s), gradient
  −ρ_s·A_s·∇log q_s with A_s = −Σ_{s' ≥ s} γ^{s'−s}(log q_s' − log p_s').

  Args:
    as `span_divergence` (without the divergence); behavior_logq: float32
    `[B, O_s]` sampling-time log-probs of the student's tokens (the
    importance estimator: ρ_s = q_s / b_s, truncated at is_clip), or None.
  Returns:
    (values `[B, S]`, span_mask `[B, S]` as float32); 0 on masked spans.
  """
  s = _check_span_inputs(student_logits, teacher_logits, student_targets, teacher_targets,
                         student_span, teacher_span, span_mask)
  sums = lambda values, span: _per_span(span, s)(jax.ops.segment_sum,
                                                  jnp.where(span >= 0, values, 0.0))
  log_q = sums(token_log_probs(student_logits, student_targets)[0], student_span)
  log_p = sums(token_log_probs(jax.lax.stop_gradient(teacher_logits), teacher_targets)[0],
               teacher_span)
  behavior = None
  if behavior_logq is not None:
    _check("behavior_logq", behavior_logq, student_targets.shape)
    behavior = sums(behavior_logq.astype(jnp.float32), student_span)
  mask = (span_mask > 0).astype(jnp.float32)
  return sampled.per_token(log_q, log_p, mask, gamma=gamma, behavior_logq=behavior,
                           is_clip=is_clip), mask


def spans_to_tokens(values: Array, student_span: Array, span_mask: Array) -> tuple[Array, Array]:
  """Per-span values `[B, S]` -> per-student-token values `[B, O_s]` and their mask.

  Each token of a counted span carries the span's value divided by the span's
  number of tokens, so a row's token sum equals its span sum.
  """
  b, s = values.shape
  valid = (student_span >= 0) & jnp.take_along_axis(
      jnp.pad(span_mask > 0, [(0, 0), (0, 1)]), jnp.where(student_span >= 0, student_span, s),
      axis=1)
  index = jnp.where(valid, student_span, s)
  count = jnp.sum(jax.nn.one_hot(index, s + 1, dtype=jnp.float32), axis=1)[:, :s]
  per = jnp.pad(values / jnp.maximum(count, 1.0), [(0, 0), (0, 1)])
  return jnp.where(valid, jnp.take_along_axis(per, index, axis=1), 0.0), valid.astype(jnp.float32)


def _crossentropy(logits: Array, tokens: Array, mask: Array, reduction: str) -> Array:
  nll = -token_log_probs(logits, tokens)[0]
  return api.reduce(nll, mask, reduction)


@gin.configurable(module="gkd.losses")
@dataclasses.dataclass(frozen=True)
class CrossTokenizerLoss:
  """A configured cross-tokenizer loss, validated on construction.

  mode: 'uld' (the paper: i-th target token with i-th), 'uld_spans' (ULD at
  each aligned span's first token), 'spans' (divergence `name`/`params` on
  each aligned span's {text, anything else}). reduction: gkd.losses.reduce's
  modes over positions ('uld') or spans. The loss is
  crossentropy_weight·CE(student targets) + distillation_weight·distillation
  (the paper: 1 and λ = 1.5).

  Gin:  `gkd.losses.CrossTokenizerLoss.mode = 'spans'`
        `gkd.losses.CrossTokenizerLoss.name = 'jsd'`
        `gkd.losses.CrossTokenizerLoss.params = {'beta': 0.9}`
  """

  mode: str = "spans"
  name: str = "forward_kl"
  params: Any = None
  temperature: float = 1.0
  reduction: str = "sequence"
  crossentropy_weight: float = 0.0
  distillation_weight: float = 1.0

  def __post_init__(self):
    if self.mode not in MODES:
      raise UserError(f"unknown cross-tokenizer mode {self.mode!r}; choose one of "
                      f"{', '.join(MODES)}")
    object.__setattr__(self, "params", _check_divergence(self.name, self.params or {}))
    if self.mode != "spans" and self.params:
      raise UserError(f"mode {self.mode!r} compares sorted probabilities and takes no "
                      "divergence parameters; unset params or use mode='spans'")
    api.check_temperature(self.temperature)
    if self.reduction not in api.REDUCTIONS:
      raise UserError(f"unknown reduction {self.reduction!r}; "
                      f"choose one of {', '.join(api.REDUCTIONS)}")
    for key in ("crossentropy_weight", "distillation_weight"):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise UserError(f"{key}={value!r} must be a number >= 0")

  def distillation(self, student_logits: Array, teacher_logits: Array, student_targets: Array,
                   student_mask: Array, alignment) -> tuple[Array, Array]:
    """(values, mask): `[B, O_s]` for 'uld', `[B, S]` for the span modes."""
    a = alignment
    if self.mode == "uld":
      return uld_per_token(student_logits, teacher_logits, student_mask, a.target_mask,
                           self.temperature)
    if self.mode == "uld_spans":
      return uld_per_span(student_logits, teacher_logits, a.student_span_start,
                          a.teacher_span_start, a.span_mask, self.temperature)
    return span_divergence(self.name, student_logits, teacher_logits, student_targets,
                           a.target_tokens, a.student_span, a.teacher_span, a.span_mask,
                           temperature=self.temperature, **self.params)

  def check_sampled(self) -> None:
    """Refuses options the sampled-span objective (Method.objective='opd') cannot honour."""
    if self.mode != "spans":
      raise UserError(f"objective 'opd' across tokenizers compares each aligned span's text; "
                      f"set CrossTokenizerLoss.mode = 'spans' (not {self.mode!r})")
    if self.name != "reverse_kl" or self.params:
      raise UserError(f"objective 'opd' across tokenizers estimates the span-level reverse KL; "
                      f"set CrossTokenizerLoss.name = 'reverse_kl' (not {self.name!r}) and "
                      f"no params")
    if self.temperature != 1.0:
      raise UserError("objective 'opd' estimates KL(q ‖ p) at temperature 1; unset "
                      "CrossTokenizerLoss.temperature")

  def terms(self, student_logits: Array, teacher_logits: Array, student_targets: Array,
            student_mask: Array, alignment, sampled_kl: Any = None,
            behavior_logq: Optional[Array] = None) -> dict[str, Array]:
    """{'loss', 'distill', 'crossentropy'} scalars.

    sampled_kl: a `gkd.train.SampledKL` (γ, estimator, is_clip) for the
    sampled-span objective (`span_sampled_kl`); None: `distillation`.
    """
    if sampled_kl is None:
      values, mask = self.distillation(student_logits, teacher_logits, student_targets,
                                       student_mask, alignment)
    else:
      a = alignment
      values, mask = span_sampled_kl(
          student_logits, teacher_logits, student_targets, a.target_tokens, a.student_span,
          a.teacher_span, a.span_mask, gamma=sampled_kl.gamma,
          behavior_logq=behavior_logq if sampled_kl.estimator == "importance" else None,
          is_clip=sampled_kl.is_clip)
    distill = api.reduce(values, mask, self.reduction)
    ce = jnp.zeros((), jnp.float32)
    if self.crossentropy_weight:
      ce = _crossentropy(student_logits, student_targets, student_mask, self.reduction)
    return {"loss": self.crossentropy_weight * ce + self.distillation_weight * distill,
            "distill": distill, "crossentropy": ce}

  def __call__(self, student_logits: Array, teacher_logits: Array, student_targets: Array,
               student_mask: Array, alignment, sampled_kl: Any = None,
               behavior_logq: Optional[Array] = None) -> Array:
    """The scalar loss."""
    return self.terms(student_logits, teacher_logits, student_targets, student_mask,
                      alignment, sampled_kl, behavior_logq)["loss"]
