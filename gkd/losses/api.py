"""The public divergence API: `per_token`, `reduce`, and the Gin `Divergence`.

    values = per_token("jsd", student_logits, teacher_logits, beta=0.9)  # [B, T]
    loss = reduce(values, mask)                                           # scalar

Logits `[batch, length, vocab]` (any float dtype) are divided by the
temperature and turned into float32 log-probabilities; the teacher's are
under stop-gradient. `chunk_size` selects the memory-bounded path
(`chunked.py`), `teacher_top_k` the sparse-teacher variant (`topk.py`).
"""

import dataclasses
import math
from typing import Any, Optional

import gin
import jax
import jax.numpy as jnp

from gkd.errors import UserError
from gkd.losses import divergences
from gkd.losses.chunked import chunked_map
from gkd.losses.topk import collapse_to_top_k

Array = jax.Array

NAMES = tuple(divergences.PARAMS)
REDUCTIONS = ("sequence", "token")


def check_params(name: str, params: dict[str, Any]) -> dict[str, float]:
  """Validates a divergence name and its parameters; fills in defaults.

  Raises:
    UserError: unknown name or parameter, or a value outside its range.
  """
  if name not in divergences.PARAMS:
    raise UserError(f"unknown divergence {name!r}; choose one of {', '.join(NAMES)}")
  spec = divergences.PARAMS[name]
  unknown = sorted(set(params) - set(spec))
  if unknown:
    allowed = ", ".join(spec) or "none"
    raise UserError(f"divergence {name!r} takes no parameter {unknown[0]!r}; "
                    f"its parameters: {allowed}")
  checked = {}
  for key, (default, low, high) in spec.items():
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        low <= value <= high):
      raise UserError(f"{name}: {key}={value!r} is out of range; "
                      f"it must be a number in [{low}, {high}]")
    checked[key] = float(value)
  return checked


def check_temperature(temperature: Any) -> float:
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
      math.isfinite(temperature) and temperature > 0):
    raise UserError(f"temperature={temperature!r} is invalid; it must be a finite number > 0")
  return float(temperature)


def check_chunking(chunk_size: Any, chunk_elements: Any) -> None:
  for key, value in (("chunk_size", chunk_size), ("chunk_elements", chunk_elements)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
      raise UserError(f"{key}={value!r} must be a positive integer")
  if chunk_size is not None and chunk_elements is not None:
    raise UserError("set chunk_size (tokens per chunk) or chunk_elements (token × vocab "
                    "elements per chunk), not both")


def _check_shapes(student: Array, teacher: Array) -> None:
  if student.ndim < 2:
    raise UserError(f"logits must have shape [..., vocab]; got {student.shape}")
  if student.shape[-1] != teacher.shape[-1]:
    raise UserError(
        f"teacher and student vocabularies differ: student logits have "
        f"{student.shape[-1]} entries, teacher {teacher.shape[-1]}; distil between "
        f"models that share one tokenizer and vocabulary size")
  if student.shape != teacher.shape:
    raise UserError(f"student logits {student.shape} and teacher logits "
                    f"{teacher.shape} must have the same shape [batch, length, vocab]")


def _log_probs(logits: Array, temperature: float) -> Array:
  # Shift before scaling: the top logit becomes exactly 0 however XLA fuses or
  # rewrites the division (x/T - max(x/T) can be off by ulp(max/T), ~1e-3 at 1e4).
  # With the max already 0, log_softmax's own max pass over the vocabulary is not needed.
  x = logits.astype(jnp.float32)
  x = (x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))) / temperature
  return x - jnp.log(jnp.sum(jnp.exp(x), axis=-1, keepdims=True))


def _token_fn(name: str, params: dict[str, float], temperature: float, top_k: Optional[int]):
  """Row-wise function (student logits, teacher logits[, targets]) -> values."""
  if name == "atkd":
    def atkd_fn(s, t, targets):
      return divergences.atkd_parts(_log_probs(s, temperature), _log_probs(t, temperature),
                                    targets)
    return atkd_fn
  fn = divergences.DIVERGENCES[name]

  def token_fn(s, t):
    lq, lp = _log_probs(s, temperature), _log_probs(t, temperature)
    if top_k is not None:
      lq, lp = collapse_to_top_k(lq, lp, top_k)
    return fn(lq, lp, **params)
  return token_fn


def atkd_split(uncertainty: Array, mask: Array, hard_fraction: float
               ) -> tuple[Array, Array, Array, Array]:
  """ATKD's batch-wide hard/easy split of the valid tokens.

  Hard tokens have teacher uncertainty 1 − p(g) at or above the batch's
  (1 − hard_fraction) quantile over valid tokens (the median for 50%).

  Returns:
    (hard, easy) bool like `mask`, and the scalars (n / n_hard, n / n_easy),
    so that a valid-token mean of the values weighs each group as a mean.
  """
  valid = mask > 0
  unc = jax.lax.stop_gradient(uncertainty)
  cut = jnp.nanquantile(jnp.where(valid, unc, jnp.nan), 1.0 - hard_fraction)
  hard = valid & (unc >= cut)
  easy = valid & ~hard
  n = jnp.sum(valid)
  return (hard, easy, n / jnp.maximum(jnp.sum(hard), 1), n / jnp.maximum(jnp.sum(easy), 1))


def atkd_values(tkd: Array, dkd: Array, split, alpha: float) -> Array:
  """ATKD's per-token values whose valid-token mean is α·L_easy + (1−α)·L_hard.

  `split` is `atkd_split`'s. As in the official code the (1 − p(g)) factor on
  the diversity term is dropped.
  """
  hard, easy, scale_hard, scale_easy = split
  values = jnp.where(hard, (1.0 - alpha) * scale_hard * (tkd + dkd), alpha * scale_easy * dkd)
  return jnp.where(hard | easy, values, 0.0)


def per_token(name: str, student_logits: Array, teacher_logits: Array, *,
              temperature: float = 1.0, targets: Optional[Array] = None,
              mask: Optional[Array] = None, chunk_size: Optional[int] = None,
              chunk_elements: Optional[int] = None, teacher_top_k: Optional[int] = None,
              **params: float) -> Array:
  """Per-token divergence D(teacher ‖ student) at every position.

  Args:
    name: one of `NAMES` (see `divergences.py` for formulas and sources).
    student_logits, teacher_logits: `[batch, length, vocab]` (or `[..., vocab]`).
    temperature: both logits are divided by it before the softmax (no T²).
    targets: int `[batch, length]` next tokens; required by `atkd` only.
    mask: `[batch, length]` valid-token weights; `atkd` uses it to split
      hard/easy tokens over the batch (default: all valid).
    chunk_size: if set, process `chunk_size` tokens at a time (same values and
      gradients, bounded memory).
    chunk_elements: instead of `chunk_size`, a budget of token × vocab
      elements per chunk (`max(1, chunk_elements // vocab)` tokens at a time),
      so the divergence's temporaries stay flat as the vocabulary grows.
    teacher_top_k: if set, keep only the teacher's top-k log-probs plus one
      tail bucket holding the rest of the mass (the student is collapsed onto
      the same k + 1 buckets).
    **params: the divergence's parameters (`beta` for jsd; `alpha` for
      skew_kl, skew_reverse_kl and atkd; `mu` for akl; `hard_fraction` for atkd).
  Returns:
    float32 `[batch, length]`.
  Raises:
    UserError: bad name, parameter, temperature, shapes or options.
  """
  checked = check_params(name, params)
  temperature = check_temperature(temperature)
  _check_shapes(student_logits, teacher_logits)
  lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
  if teacher_top_k is not None and not (isinstance(teacher_top_k, int)
                                        and 0 < teacher_top_k < vocab):
    raise UserError(f"teacher_top_k={teacher_top_k!r} must be an integer in [1, {vocab - 1}]")
  if name == "atkd":
    if targets is None or tuple(targets.shape) != tuple(lead):
      raise UserError(f"atkd needs targets of shape {tuple(lead)} (the next tokens)")
    if teacher_top_k is not None:
      raise UserError("atkd needs the full teacher distribution; unset teacher_top_k")
  check_chunking(chunk_size, chunk_elements)
  if chunk_elements is not None:
    chunk_size = max(1, chunk_elements // vocab)

  fn = _token_fn(name, {k: v for k, v in checked.items()}, temperature, teacher_top_k)
  student = student_logits.reshape(-1, vocab)
  constants = [jax.lax.stop_gradient(teacher_logits).reshape(-1, vocab)]
  if name == "atkd":
    constants.append(targets.reshape(-1).astype(jnp.int32))
  if chunk_size is None:
    out = fn(student, *constants)
  else:
    out = chunked_map(fn, student, tuple(constants), chunk_size)
  if name == "atkd":
    valid = jnp.ones(lead, jnp.float32) if mask is None else mask
    tkd, dkd, unc = (o.reshape(lead) for o in out)
    out = atkd_values(tkd, dkd, atkd_split(unc, valid, checked["hard_fraction"]),
                      checked["alpha"])
  else:
    out = out.reshape(lead)
  # Divergences are ≥ 0; float rounding near p = q can dip below by ~1e-7.
  return jnp.maximum(out.astype(jnp.float32), 0.0)


def reduce(values: Array, mask: Array, mode: str = "sequence") -> Array:
  """Reduces `[batch, length]` per-token values over valid tokens to a scalar.

  mode "sequence" (GKD, Eq. 2): mean over each sequence's valid tokens, then
  mean over the sequences that have any. mode "token": the total-token mean
  (TRL's `batchmean`). A batch without valid tokens gives 0.
  """
  if mode not in REDUCTIONS:
    raise UserError(f"unknown reduction {mode!r}; choose one of {', '.join(REDUCTIONS)}")
  mask = mask.astype(jnp.float32)
  values = jnp.where(mask > 0, values, 0.0) * mask
  if mode == "token":
    return jnp.sum(values) / jnp.maximum(jnp.sum(mask), 1.0)
  count = jnp.sum(mask, axis=-1)
  per_seq = jnp.sum(values, axis=-1) / jnp.maximum(count, 1.0)
  has = (count > 0).astype(jnp.float32)
  return jnp.sum(per_seq * has) / jnp.maximum(jnp.sum(has), 1.0)


def reduction_weights(mask: Array, mode: str = "sequence") -> Array:
  """float32 weights `[batch, length]` with Σ w·values = `reduce(values, mask, mode)`.

  They depend on the whole batch's mask only, so a loss split into token
  chunks or microbatches and summed with them has the batch's denominators
  (not each part's).
  """
  if mode not in REDUCTIONS:
    raise UserError(f"unknown reduction {mode!r}; choose one of {', '.join(REDUCTIONS)}")
  mask = jnp.where(mask > 0, mask.astype(jnp.float32), 0.0)
  if mode == "token":
    return mask / jnp.maximum(jnp.sum(mask), 1.0)
  count = jnp.sum(mask, axis=-1, keepdims=True)
  has = (count > 0).astype(jnp.float32)
  return mask / jnp.maximum(count, 1.0) * has / jnp.maximum(jnp.sum(has), 1.0)


def weighted_sum(values: Array, weights: Array) -> Array:
  """Σ w·values over the entries with w ≠ 0 (values there may be anything, even NaN)."""
  return jnp.sum(jnp.where(weights != 0, values, 0.0) * weights)


@gin.configurable(module="gkd.losses")
@dataclasses.dataclass(frozen=True)
class Divergence:
  """A configured divergence, validated on construction (before any compile).

  Gin:  `train.divergence = @gkd.losses.Divergence()`
        `gkd.losses.Divergence.name = 'jsd'`
        `gkd.losses.Divergence.params = {'beta': 0.9}`
  """

  name: str = "forward_kl"
  params: Any = None  # dict of the divergence's parameters
  temperature: float = 1.0
  reduction: str = "sequence"
  chunk_size: Optional[int] = None  # tokens per chunk
  chunk_elements: Optional[int] = None  # or token × vocab elements per chunk
  teacher_top_k: Optional[int] = None

  def __post_init__(self):
    object.__setattr__(self, "params", check_params(self.name, dict(self.params or {})))
    check_temperature(self.temperature)
    check_chunking(self.chunk_size, self.chunk_elements)
    if self.reduction not in REDUCTIONS:
      raise UserError(f"unknown reduction {self.reduction!r}; "
                      f"choose one of {', '.join(REDUCTIONS)}")

  def per_token(self, student_logits: Array, teacher_logits: Array, *,
                targets: Optional[Array] = None, mask: Optional[Array] = None) -> Array:
    """float32 `[batch, length]` values."""
    return per_token(self.name, student_logits, teacher_logits,
                     temperature=self.temperature, targets=targets, mask=mask,
                     chunk_size=self.chunk_size, chunk_elements=self.chunk_elements,
                     teacher_top_k=self.teacher_top_k,
                     **self.params)

  def __call__(self, student_logits: Array, teacher_logits: Array, mask: Array,
               targets: Optional[Array] = None) -> Array:
    """The reduced scalar loss."""
    values = self.per_token(student_logits, teacher_logits, targets=targets, mask=mask)
    return reduce(values, mask, self.reduction)
