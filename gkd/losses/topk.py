"""Sparse teacher: only the teacher's top-k log-probs plus one tail bucket.

A stored or transmitted teacher often keeps only its k most likely tokens
(Anshumann et al. 2025). Both distributions are collapsed onto the same k + 1
buckets: the teacher's top-k tokens, and "everything else" holding the
remaining mass. Any divergence of the full distributions is then computed on
these buckets; the collapse never increases an f-divergence (data processing).
"""

import jax
import jax.numpy as jnp

Array = jax.Array


def _tail(lx: Array, in_top: Array) -> Array:
  """log of the mass outside the top-k: [..., 1]."""
  return jax.nn.logsumexp(jnp.where(in_top, -jnp.inf, lx), axis=-1, keepdims=True)


def collapse_to_top_k(lq: Array, lp: Array, k: int) -> tuple[Array, Array]:
  """Collapses [..., V] log-probs onto the teacher's top-k tokens plus a tail.

  Returns:
    (lq_k, lp_k): [..., k + 1] log-probs; the last bucket is the tail.
  """
  lp_top, index = jax.lax.top_k(lp, k)
  flat_index = index.reshape(-1, k)
  rows = jnp.arange(flat_index.shape[0])[:, None]
  in_top = jnp.zeros((flat_index.shape[0], lp.shape[-1]), jnp.bool_)
  in_top = in_top.at[rows, flat_index].set(True).reshape(lp.shape)
  lq_top = jnp.take_along_axis(lq, index, axis=-1)
  return (jnp.concatenate([lq_top, _tail(lq, in_top)], axis=-1),
          jnp.concatenate([lp_top, _tail(lp, in_top)], axis=-1))
