"""A row-chunked map with a custom VJP, for `[tokens, vocab]`-sized inputs.

`chunked_map(fn, student, constants, chunk_size)` equals `fn(student,
*constants)` row for row, but never holds more than one chunk of `fn`'s
float32 `[chunk, vocab]` intermediates: the forward pass loops over chunks and
keeps only the per-row outputs; the backward pass recomputes each chunk's VJP
and writes its rows of the gradient. Chunks are dynamic slices of the
original arrays (no padded copy); the last chunk is shifted back to end at
row N and overlaps its neighbour, whose rows it recomputes identically.
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

  def fwd(s, consts):
    return forward(s, consts), (s, consts)

  def bwd(res, cotangent):
    s, consts = res

    def body(i, grad):
      st = start_of(i)
      cs = tuple(_take(c, st, chunk) for c in consts)
      _, vjp = jax.vjp(lambda x: fn(x, *cs), _take(s, st, chunk))
      ct = jax.tree.map(lambda c: _take(c, st, chunk), cotangent)
      (g,) = vjp(ct)
      return jax.lax.dynamic_update_slice_in_dim(grad, g, st, 0)

    grad = jax.lax.fori_loop(0, num, body, jnp.zeros_like(s))
    return grad, jax.tree.map(lambda _: None, consts)

  mapped.defvjp(fwd, bwd)
  return mapped(student, tuple(constants))
