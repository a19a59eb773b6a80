"""The step's loss and gradient: fused head + divergence, gradient accumulation.

    loss, grads, terms = accumulate.value_and_grad(method, student, teacher, params,
                                                   teacher_params, batch, reward, on_policy)

The loss is written as a weighted sum of per-token terms,

    loss = Σ_t w_t·D_t + Σ_t r_t·log q(y_t),

with w = α·`losses.reduction_weights(mask, reduction)` (the divergence, or
SFT's NLL) and r the REINFORCE term's (1 − α)·on_policy·(−(R_b − R̄)/(B·n_b))
on valid tokens. Both come from the whole batch's mask and rewards, so a sum
over token chunks and over microbatches has the batch's denominators and
baseline: 1 or M microbatches give the same loss and gradient (the bug of
normalising per microbatch cannot happen). ATKD's hard/easy split is
batch-wide too: it is computed first, from the teacher alone.

Paths (`Method.loss_path`):
  fused  student and teacher produce hidden states `[b, N, E]`; the heads are
         applied a chunk of positions at a time inside the loss
         (`gkd/losses/fused.py`); no `[b, N, V]` array exists.
  plain  each microbatch's full `[b, N, V]` logits, the same terms.
Microbatches are strided rows (m, m + M, m + 2M, ...), so a batch-sharded
`[B, ...]` array splits into microbatches without moving data; they run in a
`lax.scan` that adds up the gradients.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp

from gkd import losses
from gkd.errors import UserError
from gkd.losses import fused
from gkd.models.api import Batch, Model

Array = jax.Array


def covers(method, num_teachers: int, cross_tokenizer: bool) -> bool:
  """Whether the step's loss is written as weighted per-token terms here: gkd with
  one same-tokenizer teacher, or sft; no audits (they read full logits)."""
  return (method.objective == "sft" or (method.objective == "gkd" and num_teachers == 1
                                        and not cross_tokenizer)) and not method.audits


def term_weights(method, mask: Array, reward: Array, on_policy: Array
                 ) -> tuple[Array, Optional[Array]]:
  """(w, r) float32 `[B, N]`: the loss's weights on D_t and on log q(y_t) (None: no RL)."""
  w = losses.reduction_weights(mask, method.divergence.reduction)
  if method.rl_alpha >= 1.0:
    return w, None
  maskf = jnp.where(mask > 0, mask.astype(jnp.float32), 0.0)
  advantage = jax.lax.stop_gradient(reward - jnp.mean(reward))
  r = -advantage[:, None] * maskf / jnp.maximum(jnp.sum(maskf, -1, keepdims=True), 1.0)
  r = r / mask.shape[0] * on_policy.astype(jnp.float32)
  return w, r


def _split(x: Array, m: int) -> Array:
  """[B, ...] -> [m, B/m, ...]: microbatch i holds rows i, i + m, i + 2m, ..."""
  return jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)


def _merge(x: Array) -> Array:
  """Inverse of `_split`."""
  return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def value_and_grad(method, student: Model, teacher: Optional[Model], params: Any,
                   teacher_params: Any, batch: Batch, reward: Array, on_policy: Array
                   ) -> tuple[Array, Any, dict]:
  """The step's loss, its gradient in `params` and its terms.

  `batch` holds the targets trained on (`target_tokens`, `target_mask`);
  `reward` float32 `[B]`; `on_policy` bool[].
  Returns (loss, grads, {"distill_loss", "rl_loss", "student_entropy"[,
  "teacher_agreement"]}).
  """
  tokens, mask = batch["target_tokens"].astype(jnp.int32), batch["target_mask"]
  b = tokens.shape[0]
  m = method.microbatches
  if b % m:
    raise UserError(f"batch size {b} is not a multiple of Method.microbatches={m}; "
                    "change one of them")
  divergence = method.divergence if method.needs_teacher else None
  w, r = term_weights(method, mask, reward, on_policy)
  scale = method.rl_alpha if method.rl_alpha < 1.0 else 1.0
  x = {k: v for k, v in batch.items() if getattr(v, "ndim", 0) and v.shape[0] == b}
  x["w"] = w * scale
  if r is not None:
    x["r"] = r * (1.0 - method.rl_alpha)
  thp = teacher.head_params(teacher_params) if divergence is not None else None
  teacher_hidden = lambda xb: jax.lax.stop_gradient(teacher.hidden(teacher_params, xb))

  scales = ()
  if divergence is not None and divergence.name == "atkd":
    def uncertainty(xb):
      return fused.teacher_uncertainty(divergence, teacher.head, thp, teacher_hidden(xb),
                                       xb["target_tokens"].astype(jnp.int32))
    unc = uncertainty(x) if m == 1 else _merge(jax.lax.map(uncertainty, jax.tree.map(
        lambda v: _split(v, m), x)))
    hard, easy, *scales = losses.atkd_split(unc, mask, divergence.params["hard_fraction"])
    x["hard"], x["easy"] = hard, easy

  def micro_loss(p, xb):
    split = (xb["hard"], xb["easy"], *scales) if scales else None
    toks = xb["target_tokens"].astype(jnp.int32)
    rb = xb.get("r")
    if method.loss_path == "fused":
      kw = {}
      if divergence is not None:
        kw = dict(teacher_head=teacher.head, teacher_head_params=thp,
                  teacher_hidden=teacher_hidden(xb), atkd_split=split)
      return fused.loss(divergence, student.head, student.head_params(p), student.hidden(p, xb),
                        toks, xb["w"], rb, **kw)
    teacher_logits = None
    if divergence is not None:
      teacher_logits = jax.lax.stop_gradient(teacher.logits(teacher_params, xb))
    terms = fused.token_terms(divergence, student.logits(p, xb), teacher_logits, toks, split)
    total = losses.weighted_sum(terms["value"], xb["w"])
    if rb is not None:
      total = total + losses.weighted_sum(terms["logq"], rb)
    return total, jax.lax.stop_gradient(terms)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
  if m == 1:
    (loss, terms), grads = grad_fn(params, x)
  else:
    def body(carry, xb):
      (value, terms), g = grad_fn(params, xb)
      return jax.tree.map(lambda a, v: a + v.astype(jnp.float32), carry, (value, g)), terms

    zeros = jax.tree.map(lambda v: jnp.zeros(v.shape, jnp.float32),
                         (jnp.zeros((), jnp.float32), params))
    (loss, grads), terms = jax.lax.scan(body, zeros, jax.tree.map(lambda v: _split(v, m), x))
    grads = jax.tree.map(lambda g, v: g.astype(v.dtype), grads, params)
    terms = jax.tree.map(_merge, terms)
  out = {"distill_loss": losses.weighted_sum(terms["value"], w),
         "rl_loss": (jnp.zeros((), jnp.float32) if r is None
                     else losses.weighted_sum(terms["logq"], r)),
         "student_entropy": losses.reduce(terms["entropy"], mask, "token")}
  if "agree" in terms:
    out["teacher_agreement"] = losses.reduce(terms["agree"], mask, "token")
  return loss, grads, out
