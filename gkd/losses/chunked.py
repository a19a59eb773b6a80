"""A row-chunked map with a custom VJP, for `[tokens, vocab]`-sized inputs.

`chunked_map(fn, student, constants, chunk_size)` equals `fn(student,
*constants)` row for row, but never holds more than one chunk of `fn`'s
float32 `[chunk, vocab]` intermediates. Chunks are dynamic slices of the
original arrays (no padded copy); the last chunk is shifted back to end at
row N and overlaps its neighbour, whose rows it recomputes identically.

Gradients: because every output row depends on its own input row only, the
forward pass of a differentiated call also computes each row's gradient
d out_i / d student_i (one fused pass per chunk) and keeps it as the only
residual, in the student's dtype; the backward pass scales it by the
cotangent. No forward work is repeated. Functions with several outputs
(a pytree) instead recompute each chunk's VJP in the backward pass.
"""

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def _starts(n: int, chunk: int) -> tuple[int, Callable[[Array], Array]]:
  num = -(-n // chunk)
  return num, lambda i: jnp.minimum(i * chunk, n - chunk)


def _take(x: Array, start: Array, chunk: int) -> Array:
  return jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=0)


def chunked_map(fn: Callable[..., object], student: Array,
                constants: tuple[Array, ...], chunk_size: int):
  """Row-wise `fn(student, *constants)` in chunks; differentiable in `student`.

  Args:
    fn: maps `[C, ...]` row blocks to a pytree of `[C]` arrays, row-wise.
    student: `[N, V]` array (the only differentiated input).
    constants: arrays with leading axis N (teacher log-probs, targets...);
      treated as constants (zero cotangent).
    chunk_size: rows per chunk; clipped to N.
  Returns:
    The pytree of `[N]` outputs.
  """
  n = student.shape[0]
  chunk = max(1, min(int(chunk_size), n))
  num, start_of = _starts(n, chunk)

  def forward(s, consts):
    out_shape = jax.eval_shape(fn, s[:chunk], *(c[:chunk] for c in consts))
    init = jax.tree.map(lambda o: jnp.zeros((n,) + o.shape[1:], o.dtype), out_shape)

    def body(i, out):
      st = start_of(i)
      vals = fn(_take(s, st, chunk), *(_take(c, st, chunk) for c in consts))
      return jax.tree.map(
          lambda acc, v: jax.lax.dynamic_update_slice_in_dim(acc, v, st, 0), out, vals)

    return jax.lax.fori_loop(0, num, body, init)

  @jax.custom_vjp
  def mapped(s, consts):
    return forward(s, consts)

  single = not isinstance(jax.eval_shape(fn, student[:1], *(c[:1] for c in constants)),
                          (tuple, list, dict))

  def row_grads(s, consts):
    """Per-row values [N] and gradients d value_i / d s_i [N, V]."""
    def body(i, carry):
      out, grad = carry
      st = start_of(i)
      cs = tuple(_take(c, st, chunk) for c in consts)
      vals, vjp = jax.vjp(lambda x: fn(x, *cs), _take(s, st, chunk))
      (g,) = vjp(jnp.ones_like(vals))
      return (jax.lax.dynamic_update_slice_in_dim(out, vals, st, 0),
              jax.lax.dynamic_update_slice_in_dim(grad, g, st, 0))

    out_shape = jax.eval_shape(fn, s[:chunk], *(c[:chunk] for c in consts))
    init = (jnp.zeros((n,), out_shape.dtype), jnp.zeros_like(s))
    return jax.lax.fori_loop(0, num, body, init)

  def fwd(s, consts):
    if single:
      out, grad = row_grads(s, consts)
      return out, (grad, None, None)
    return forward(s, consts), (None, s, consts)

  def bwd(res, cotangent):
    grad, s, consts = res
    none = tuple(None for _ in constants)
    if single:
      return (grad * cotangent[:, None].astype(grad.dtype)), none

    def body(i, grad):
      st = start_of(i)
      cs = tuple(_take(c, st, chunk) for c in consts)
      _, vjp = jax.vjp(lambda x: fn(x, *cs), _take(s, st, chunk))
      ct = jax.tree.map(lambda c: _take(c, st, chunk), cotangent)
      (g,) = vjp(ct)
      return jax.lax.dynamic_update_slice_in_dim(grad, g, st, 0)

    return jax.lax.fori_loop(0, num, body, jnp.zeros_like(s)), none

  mapped.defvjp(fwd, bwd)
  return mapped(student, tuple(constants))
