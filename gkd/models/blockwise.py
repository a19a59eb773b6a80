"""Attention a block of keys at a time: memory linear in the length (flash-style).

`attention` computes what `layers.dot_product_attention` does (no bias)
without holding the [B, H, L, S] scores or weights. The forward pass runs
over blocks of `block` keys with an online softmax and keeps only the output
and each query row's running max and sum of exponentials [B, H, L]; the backward pass (a custom VJP)
recomputes each block's weights from them, as FlashAttention does (Dao et al.
2022, arXiv 2205.14135), here with all query rows against one key block per
iteration. Working memory is then O(H·L·block) per layer instead of O(H·L·S),
and what the backward pass keeps is O(H·L·D).

Shapes as in gkd/models/layers.py: q [B, H, L, D], keys [B, K, D, S],
values [B, K, S, D], mask bool[B, L, S]; the G = H / K query heads of a kv
head and their L positions are R = G·L rows of plain matmuls batched over (B, K).
"""

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

# The masked score of both paths: finite, so that a query row that sees no key (left
# padding) averages all S keys uniformly instead of giving NaN. The columns added to
# fill the last block get -inf, so they weigh nothing even in such a row.
MASKED = -1e30


def _block_scores(qg: Array, keys: Array, mask: Array, j: Array, block: int, length: int,
                  scale: float) -> Array:
  """Scaled, masked scores of rows qg [B, K, R, D] on key block j: float32 [B, K, R, T]."""
  b, kh, r, _ = qg.shape
  kb = jax.lax.dynamic_slice_in_dim(keys, j * block, block, axis=3)
  mb = jax.lax.dynamic_slice_in_dim(mask, j * block, block, axis=2)
  s = jnp.einsum('bkrd,bkdt->bkrt', qg, kb, preferred_element_type=jnp.float32) * scale
  s = jnp.where(mb[:, None, None], s.reshape(b, kh, -1, mb.shape[1], block), MASKED)
  real = j * block + jnp.arange(block) < length
  return jnp.where(real, s, -jnp.inf).reshape(b, kh, r, block)


def _padded(keys: Array, values: Array, mask: Array, block: int):
  """keys, values and mask with S padded up to a multiple of `block` (zeros / False)."""
  pad = -keys.shape[3] % block
  if not pad:
    return keys, values, mask
  return (jnp.pad(keys, ((0, 0), (0, 0), (0, 0), (0, pad))),
          jnp.pad(values, ((0, 0), (0, 0), (0, pad), (0, 0))),
          jnp.pad(mask, ((0, 0), (0, 0), (0, pad))))


def _forward(q, keys, values, mask, scale, block):
  b, h, l, d = q.shape
  kh, length = keys.shape[1], keys.shape[3]
  qg = q.reshape(b, kh, h // kh * l, d)
  keys, values, mask = _padded(keys, values, mask, block)

  def step(carry, j):
    m, total, acc = carry
    s = _block_scores(qg, keys, mask, j, block, length, scale)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    fade = jnp.exp(m - m_new)
    vb = jax.lax.dynamic_slice_in_dim(values, j * block, block, axis=2)
    pv = jnp.einsum('bkrt,bktd->bkrd', p.astype(values.dtype), vb,
                    preferred_element_type=jnp.float32)
    return (m_new, total * fade + p.sum(-1), acc * fade[..., None] + pv), None

  rows = qg.shape[:3]
  init = (jnp.full(rows, -jnp.inf), jnp.zeros(rows), jnp.zeros(rows + (d,)))
  (m, total, acc), _ = jax.lax.scan(step, init, jnp.arange(keys.shape[3] // block))
  out = (acc / total[..., None]).astype(q.dtype)
  # m and the sum kept apart: for a row that sees no key, m + log(sum) rounds to m.
  return out.reshape(b, h, l, d), (m, total)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def attention(q: Array, keys: Array, values: Array, mask: Array, scale: float = 1.0,
              block: int = 128) -> Array:
  """softmax(scale * q k^T) v over key blocks; q's shape and dtype (module docstring)."""
  return _forward(q, keys, values, mask, scale, block)[0]


def _attention_fwd(q, keys, values, mask, scale, block):
  out, stats = _forward(q, keys, values, mask, scale, block)
  return out, (q, keys, values, mask, out, stats)


def _attention_bwd(scale, block, residuals, g):
  q, keys, values, mask, out, (m, total) = residuals
  b, h, l, d = q.shape
  kh, length = keys.shape[1], keys.shape[3]
  qg = q.reshape(b, kh, h // kh * l, d)
  do = g.reshape(qg.shape).astype(jnp.float32)
  delta = jnp.sum(do * out.reshape(qg.shape).astype(jnp.float32), axis=-1)  # [B, K, R]
  keys_p, values_p, mask_p = _padded(keys, values, mask, block)

  def step(dq, j):
    s = _block_scores(qg, keys_p, mask_p, j, block, length, scale)
    p = jnp.exp(s - m[..., None]) / total[..., None]
    vb = jax.lax.dynamic_slice_in_dim(values_p, j * block, block, axis=2)
    kb = jax.lax.dynamic_slice_in_dim(keys_p, j * block, block, axis=3)
    dv = jnp.einsum('bkrt,bkrd->bktd', p, do)
    ds = p * (jnp.einsum('bkrd,bktd->bkrt', do, vb, preferred_element_type=jnp.float32)
              - delta[..., None]) * scale
    ds = jnp.where(s > MASKED, ds, 0.0)  # a masked score is a constant: no gradient
    dq = dq + jnp.einsum('bkrt,bkdt->bkrd', ds, kb, preferred_element_type=jnp.float32)
    dk = jnp.einsum('bkrt,bkrd->bkdt', ds, qg, preferred_element_type=jnp.float32)
    return dq, (dk, dv)

  nb = keys_p.shape[3] // block
  dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(qg.shape, jnp.float32), jnp.arange(nb))
  dk = jnp.moveaxis(dk, 0, 3).reshape(b, kh, d, nb * block)[..., :length]  # [B, K, D, S]
  dv = jnp.moveaxis(dv, 0, 2).reshape(b, kh, nb * block, d)[:, :, :length]  # [B, K, S, D]
  return (dq.reshape(q.shape).astype(q.dtype), dk.astype(keys.dtype), dv.astype(values.dtype),
          None)


attention.defvjp(_attention_fwd, _attention_bwd)
