"""Fused head + divergence: the loss over token chunks, never a `[B, N, V]` array.

    weights = reduction_weights(mask, "sequence")                     # [B, N]
    loss, terms = fused.loss(divergence, student.head, student.head_params(params),
                             hidden, tokens, weights, teacher_head=teacher.head,
                             teacher_head_params=..., teacher_hidden=...)

The length axis is cut into chunks of `c` positions, the whole batch in each
chunk (`[B, c]` tokens, so a batch-sharded mesh keeps every chunk sharded).
Inside a chunk both heads are applied (`head(params, hidden)` -> float32
`[B, c, V]`), the per-token terms are computed in float32 whatever the
activation and parameter dtypes, and the chunk adds Σ w·value + Σ r·log q(y)
to the loss with weights computed by the caller from the whole batch
(`losses.reduction_weights`): summed over chunks, and over microbatches, the
loss has the batch's denominators.

Gradients: the loss is a weighted sum of per-token terms whose weights are
known up front, so the forward pass of a differentiated call also runs each
chunk's VJP: the head weight's gradient accumulates chunk by chunk (float32),
the hidden states' gradient `[B, c, E]` is written chunk by chunk, and those
two are the only residuals; the backward pass scales them by the loss's
cotangent. No `[c, V]` array outlives its chunk and no head matmul is run
twice (the scheme of chunked.py, and of Liger's fused linear JSD).

Memory: a chunk holds a few float32 `[B·c, V]` arrays. `c` comes from the
divergence's `chunk_size` (tokens per chunk) or `chunk_elements` (token ×
vocab elements per chunk, default `DEFAULT_CHUNK_ELEMENTS`), so with an
element budget the loss's temporaries are flat in V and in N. The vocabulary
itself is not blocked: `head` is the model's projection as a whole (tied
embedding or lm_head, T5's scaling), and AKL's head threshold, ATKD's target
split and the teacher's top-k need whole rows. An online log-sum-exp over
vocabulary blocks would only pay once a single `[B, V]` row block no longer
fits, far beyond V = 256k.
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from gkd.errors import UserError
from gkd.losses import api, divergences

Array = jax.Array
HeadFn = Callable[[Any, Array], Array]  # (head params, [..., E]) -> float32 [..., V]

DEFAULT_CHUNK_ELEMENTS = 1 << 24  # token × vocab elements per chunk: 64 MiB per f32 array


def chunk_length(divergence: Optional[api.Divergence], batch: int, length: int,
                 vocab: int) -> int:
  """Positions per chunk: the divergence's token or element budget over the batch."""
  tokens = None if divergence is None else divergence.chunk_size
  if tokens is None:
    elements = DEFAULT_CHUNK_ELEMENTS
    if divergence is not None and divergence.chunk_elements is not None:
      elements = divergence.chunk_elements
    tokens = elements // vocab
  return max(1, min(length, tokens // batch))


def _chunks(x: Array, num: int, c: int) -> Array:
  """[B, N, ...] -> [num, B, c, ...], zero-padded at the end of the length axis."""
  b, n = x.shape[:2]
  x = jnp.pad(x, [(0, 0), (0, num * c - n)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape(b, num, c, *x.shape[2:]), 1, 0)


def _unchunk(x: Array, n: int) -> Array:
  """[num, B, c, ...] -> [B, n, ...]."""
  num, b, c = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(b, num * c, *x.shape[3:])[:, :n]


def _take(log_probs: Array, tokens: Array) -> Array:
  return jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]


def token_terms(divergence: Optional[api.Divergence], student_logits: Array,
                teacher_logits: Optional[Array], tokens: Array, atkd_split=None) -> dict:
  """Per-token float32 terms of `[..., V]` logits (one chunk, or a whole batch).

  Returns {"value": the divergence (the NLL of `tokens` when `divergence` is
  None), "logq": log q(y) at temperature 1 (the RL term's), "entropy": the
  student's entropy, "agree": 1 where both argmaxes agree (with a teacher)}.
  `atkd_split` is `losses.atkd_split`'s, over the same tokens.
  """
  s = student_logits.astype(jnp.float32)
  logq_all = jax.nn.log_softmax(s)
  logq = _take(logq_all, tokens)
  q = jax.lax.stop_gradient(logq_all)
  terms = {"logq": logq, "entropy": -jnp.sum(jnp.exp(q) * q, -1)}
  if divergence is None:
    terms["value"] = -logq
    return terms
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  terms["agree"] = (jnp.argmax(q, -1) == jnp.argmax(t, -1)).astype(jnp.float32)
  fn = api._token_fn(divergence.name, divergence.params,  # pylint: disable=protected-access
                     divergence.temperature, divergence.teacher_top_k)
  if divergence.name == "atkd":
    tkd, dkd, _ = fn(s, t, tokens)
    value = api.atkd_values(tkd, dkd, atkd_split, divergence.params["alpha"])
  else:
    value = fn(s, t)
  # As `losses.per_token`: divergences are ≥ 0; rounding near p = q dips by ~1e-7.
  terms["value"] = jnp.maximum(value, 0.0)
  return terms


def teacher_uncertainty(divergence: api.Divergence, teacher_head: HeadFn, teacher_head_params: Any,
                        teacher_hidden: Array, tokens: Array) -> Array:
  """ATKD's teacher uncertainty 1 − p(g) at every target, float32 `[B, N]`, chunked."""
  b, n = tokens.shape
  vocab = jax.eval_shape(teacher_head, teacher_head_params, teacher_hidden[:, :1]).shape[-1]
  c = chunk_length(divergence, b, n, vocab)
  num = -(-n // c)

  def body(_, xs):
    h, tok = xs
    lp = api._log_probs(teacher_head(teacher_head_params, h),  # pylint: disable=protected-access
                        divergence.temperature)
    return None, divergences.atkd_parts(lp, lp, tok)[2]

  _, unc = jax.lax.scan(body, None, (_chunks(teacher_hidden, num, c), _chunks(tokens, num, c)))
  return jax.lax.stop_gradient(_unchunk(unc, n))


def loss(divergence: Optional[api.Divergence], student_head: HeadFn, head_params: Any,
         hidden: Array, tokens: Array, weights: Array, rl_weights: Optional[Array] = None, *,
         teacher_head: Optional[HeadFn] = None, teacher_head_params: Any = None,
         teacher_hidden: Optional[Array] = None, atkd_split=None) -> tuple[Array, dict]:
  """Σ w·value + Σ r·log q(y) over all tokens, a chunk of positions at a time.

  Args:
    divergence: the configured divergence, or None for the NLL of `tokens` (SFT).
    student_head: `head(params, hidden [B, c, E]) -> float32 [B, c, V]`.
    head_params: what `student_head` reads (differentiated).
    hidden: the student's final states `[B, N, E]` (differentiated).
    tokens: int `[B, N]` targets (ATKD's g, the NLL's and the RL term's y).
    weights: float32 `[B, N]` on the per-token values (`reduction_weights`).
    rl_weights: float32 `[B, N]` on log q(y) (the policy-gradient term), or None.
    teacher_head, teacher_head_params, teacher_hidden: the teacher's (constant).
    atkd_split: `losses.atkd_split(teacher_uncertainty(...), mask, ...)` for ATKD.
  Returns:
    (float32 loss, `token_terms`' float32 `[B, N]` terms, under stop-gradient).
  """
  if divergence is not None and teacher_hidden is None:
    raise UserError(f"the {divergence.name} divergence needs the teacher's hidden states")
  if divergence is not None and divergence.name == "atkd" and atkd_split is None:
    raise UserError("atkd on the fused path needs atkd_split (its batch-wide hard/easy split)")
  b, n = tokens.shape
  vocab = jax.eval_shape(student_head, head_params, hidden[:, :1]).shape[-1]
  c = chunk_length(divergence, b, n, vocab)
  num = -(-n // c)
  xs = {"tokens": tokens.astype(jnp.int32), "weights": weights.astype(jnp.float32),
        "rl_weights": (jnp.zeros_like(weights, jnp.float32) if rl_weights is None
                       else rl_weights.astype(jnp.float32))}
  if teacher_hidden is not None:
    xs["teacher_hidden"] = jax.lax.stop_gradient(teacher_hidden)
  scales = ()
  if atkd_split is not None:
    xs["hard"], xs["easy"] = atkd_split[:2]
    scales = tuple(jnp.asarray(x, jnp.float32) for x in atkd_split[2:])
  xs = {k: _chunks(v, num, c) for k, v in xs.items()}
  teacher_head_params = jax.lax.stop_gradient(teacher_head_params)

  def chunk_loss(hp, h, x, thp, scales):
    t = None if teacher_head is None else teacher_head(thp, x["teacher_hidden"])
    split = (x["hard"], x["easy"], *scales) if scales else None
    terms = token_terms(divergence, student_head(hp, h), t, x["tokens"], split)
    total = (api.weighted_sum(terms["value"], x["weights"])
             + api.weighted_sum(terms["logq"], x["rl_weights"]))
    return total, terms

  def run(hp, hs, xs, thp, scales, with_grad: bool):
    def body(carry, inputs):
      total, grad = carry
      h, x = inputs
      if not with_grad:
        value, terms = chunk_loss(hp, h, x, thp, scales)
        return (total + value, grad), terms
      value, vjp, terms = jax.vjp(lambda p, y: chunk_loss(p, y, x, thp, scales), hp, h,
                                  has_aux=True)
      g_hp, g_h = vjp(jnp.ones((), jnp.float32))
      grad = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad, g_hp)
      return (total + value, grad), (terms, g_h)

    grad0 = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), hp) if with_grad else None)
    return jax.lax.scan(body, (jnp.zeros((), jnp.float32), grad0), (hs, xs))

  @jax.custom_vjp
  def fused(hp, hs, xs, thp, scales):
    (total, _), terms = run(hp, hs, xs, thp, scales, with_grad=False)
    return total, terms

  def fwd(hp, hs, xs, thp, scales):
    (total, g_hp), (terms, g_h) = run(hp, hs, xs, thp, scales, with_grad=True)
    return (total, terms), (g_hp, g_h, hp)

  def bwd(res, cotangents):
    g_hp, g_h, hp = res
    ct = cotangents[0]  # the terms are returned under stop-gradient: their cotangent is unused
    g_hp = jax.tree.map(lambda g, p: (g * ct).astype(p.dtype), g_hp, hp)
    none = lambda tree: jax.tree.map(lambda _: None, tree)
    return g_hp, (g_h * ct.astype(g_h.dtype)), none(xs), none(teacher_head_params), none(scales)

  fused.defvjp(fwd, bwd)
  total, terms = fused(head_params, _chunks(hidden, num, c), xs, teacher_head_params, scales)
  return total, jax.lax.stop_gradient({k: _unchunk(v, n) for k, v in terms.items()})
