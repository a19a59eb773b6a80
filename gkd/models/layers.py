"""Building blocks shared by the T5 and decoder-only models.

Every parameter carries logical axis names (`nn.with_logical_partitioning`)
and major activations are constrained with logical names; see
gkd/partitioning.py for the names and the rules that map them onto a mesh.
Shape letters: B batch, L query length, S key length, E embed, H heads,
K kv heads, G = H / K query heads per kv head, D head dim, F mlp, V vocab.

Queries, keys and values are heads-first after their projection (q
[B, H, L, D], k/v [B, K, L, D]); attention then reads keys transposed,
[B, K, D, S], and values [B, K, S, D] (`attention_kv`), and a KV cache
stores them so, new columns written along S. Both products of attention
are then plain [G·L, D] x [D, S] and [G·L, S] x [S, D] matmuls batched over
(B, K), whose operands need no copy or transpose: a decode step reads the
cache once, in its stored order (docs/sampling.md has the measurements).
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gkd.errors import UserError
from gkd.models import blockwise

Array = jax.Array
DType = Any

BLE = ('activation_batch', 'activation_length', 'activation_embed')
BLHD = ('activation_batch', 'activation_length', 'activation_heads', 'activation_kv')
BHLD = ('activation_batch', 'activation_heads', 'activation_length', 'activation_kv')
BLV = ('activation_batch', 'activation_length', 'activation_vocab')
KEYS = ('activation_batch', 'activation_heads', 'activation_kv', 'activation_length')
CACHE_KEYS = ('cache_batch', 'cache_heads', 'cache_kv', 'cache_length')  # [B, K, D, S]
CACHE_VALUES = ('cache_batch', 'cache_heads', 'cache_length', 'cache_kv')  # [B, K, S, D]

_MASKED = blockwise.MASKED  # finite: a row that sees no key (padding) averages all keys


def dtypes_of(cfg: Any) -> dict[str, DType]:
  """dtype / param_dtype keyword arguments from a config's dtype names."""
  return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def constrain(x: Array, names: Sequence[str]) -> Array:
  return nn.with_logical_constraint(x, tuple(names))


# What a block keeps for the backward pass (jax.checkpoint policies): everything
# ('none': no rematerialisation), only its input ('full': the backward pass reruns
# the block), or its input and the outputs of its weight matmuls ('dots': attention
# scores, softmax and activations are recomputed, the projections are not).
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(name: Any) -> None:
  if name not in REMAT_POLICIES:
    raise UserError(f'remat={name!r} is not a rematerialisation policy; choose one of '
                    f'{", ".join(REMAT_POLICIES)}')


def remat(block: type, name: str) -> type:
  """`block` (a Module class) with the named policy; 'none' returns it unchanged."""
  check_remat(name)
  if name == 'none':
    return block
  return nn.remat(block, policy=REMAT_POLICIES[name])


ATTENTION = ('dense', 'blockwise')

# Config fields that choose how a model computes, not what: same parameters, same
# outputs; a restarted run may change them.
RUNTIME_FIELDS = ('remat', 'attention', 'attention_block')


def check_attention(impl: Any, block: Any) -> None:
  if impl not in ATTENTION:
    raise UserError(f'attention={impl!r}; choose one of {", ".join(ATTENTION)}')
  if isinstance(block, bool) or not isinstance(block, int) or block < 1:
    raise UserError(f'attention_block={block!r} must be a positive integer (keys per block)')


class Dense(nn.Module):
  """y = x @ kernel over the last `n_in` axes of x; kernel [*in, *features]."""
  features: tuple[int, ...]
  axes: tuple[str, ...]  # logical names of the kernel's axes
  n_in: int = 1
  use_bias: bool = False
  dtype: DType = jnp.bfloat16
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = x.shape[x.ndim - self.n_in:]
    shape = tuple(in_shape) + tuple(self.features)
    init = nn.initializers.variance_scaling(
        1.0, 'fan_in', 'truncated_normal', in_axis=tuple(range(self.n_in)),
        out_axis=tuple(range(self.n_in, len(shape))))
    kernel = self.param('kernel', nn.with_logical_partitioning(init, self.axes),
                        shape, self.param_dtype)
    contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(
          nn.initializers.zeros, self.axes[self.n_in:]), tuple(self.features), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class Embed(nn.Module):
  """Token embedding [V, E]; `attend` is the tied output projection.

  `init_std`: 1.0 is T5's (t5x); Llama/Qwen2 use 0.02 (HF `initializer_range`),
  which keeps a tied head's initial logits near zero instead of ~sqrt(E).
  """
  vocab_size: int
  features: int
  dtype: DType = jnp.bfloat16
  param_dtype: DType = jnp.float32
  init_std: float = 1.0

  def setup(self):
    self.embedding = self.param(
        'embedding',
        nn.with_logical_partitioning(nn.initializers.normal(self.init_std), ('vocab', 'embed')),
        (self.vocab_size, self.features), self.param_dtype)

  def __call__(self, tokens: Array) -> Array:
    """int[B, L] -> [B, L, E]."""
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    """[B, L, E] -> float32[B, L, V]."""
    return jnp.einsum('ble,ve->blv', x, self.embedding.astype(self.dtype),
                      preferred_element_type=jnp.float32)


class LMHead(nn.Module):
  """Untied output projection: [B, L, E] -> float32[B, L, V]."""
  vocab_size: int
  dtype: DType = jnp.bfloat16
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param(
        'kernel', nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal'),
            ('embed', 'vocab')),
        (x.shape[-1], self.vocab_size), self.param_dtype)
    return jnp.einsum('ble,ev->blv', x.astype(self.dtype), kernel.astype(self.dtype),
                      preferred_element_type=jnp.float32)


class RMSNorm(nn.Module):
  """x / rms(x) * scale, statistics in float32, no bias and no mean subtraction."""
  eps: float = 1e-6
  dtype: DType = jnp.bfloat16
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * scale.astype(self.dtype)


ACTIVATIONS = {
    'relu': nn.relu,
    'gelu': lambda x: nn.gelu(x, approximate=False),
    'gelu_new': lambda x: nn.gelu(x, approximate=True),  # tanh approximation (T5 v1.1)
    'gelu_pytorch_tanh': lambda x: nn.gelu(x, approximate=True),
    'silu': nn.silu,
}


class MLP(nn.Module):
  """Feed-forward: wo(act(wi_0 x) * wi_1 x) if gated, else wo(act(wi x))."""
  hidden: int
  activation: str = 'silu'
  gated: bool = True
  dtype: DType = jnp.bfloat16
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = lambda f, axes, name: Dense((f,), axes, dtype=self.dtype,
                                        param_dtype=self.param_dtype, name=name)
    act = ACTIVATIONS[self.activation]
    if self.gated:
      h = act(dense(self.hidden, ('embed', 'mlp'), 'wi_0')(x))
      h = h * dense(self.hidden, ('embed', 'mlp'), 'wi_1')(x)
    else:
      h = act(dense(self.hidden, ('embed', 'mlp'), 'wi')(x))
    h = constrain(h, ('activation_batch', 'activation_length', 'activation_mlp'))
    return dense(x.shape[-1], ('mlp', 'embed'), 'wo')(h)


class Attention(nn.Module):
  """Projections of multi-head / grouped-query attention; the caller wires them.

  query [E, H, D], key/value [E, K, D], out [H, D, E] (K divides H).
  Projected queries and keys are heads-first (module docstring).
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  embed_dim: int
  qkv_bias: bool = False
  kv_axis: str = 'kv_heads'  # logical name of K ('heads' when K == H, as in T5)
  impl: str = 'dense'  # ATTENTION: 'blockwise' for full sequences without a bias
  block: int = 128
  dtype: DType = jnp.bfloat16
  param_dtype: DType = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hd = self.head_dim
    self.query = Dense((self.num_heads, hd), ('embed', 'heads', 'kv'), use_bias=self.qkv_bias, **kw)
    self.key = Dense((self.num_kv_heads, hd), ('embed', self.kv_axis, 'kv'),
                     use_bias=self.qkv_bias, **kw)
    self.value = Dense((self.num_kv_heads, hd), ('embed', self.kv_axis, 'kv'),
                       use_bias=self.qkv_bias, **kw)
    self.out = Dense((self.embed_dim,), ('heads', 'kv', 'embed'), n_in=2, **kw)

  def project_q(self, x: Array) -> Array:
    """[B, L, E] -> [B, H, L, D]."""
    return heads_first(self.query(x))

  def project_kv(self, x: Array) -> tuple[Array, Array]:
    """[B, L, E] -> k, v [B, K, L, D]."""
    return heads_first(self.key(x)), heads_first(self.value(x))

  def __call__(self, q: Array, keys: Array, values: Array, mask: Array,
               bias: Array | None = None, scale: float = 1.0) -> Array:
    """q [B, H, L, D], keys [B, K, D, S], values [B, K, S, D], mask bool[B, L, S]
    -> [B, L, E]."""
    if self.impl == 'blockwise' and bias is None and q.shape[2] > 1:
      ctx = blockwise.attention(q, keys, values, mask, scale, self.block)
    else:
      ctx = dot_product_attention(q, keys, values, mask, bias, scale)
    ctx = constrain(jnp.swapaxes(ctx, 1, 2), BLHD)  # free at L = 1 (a decode step)
    return constrain(self.out(ctx), BLE)


def heads_first(x: Array) -> Array:
  """[B, L, H, D] (a projection's output) -> [B, H, L, D]; free at L = 1."""
  return constrain(jnp.swapaxes(constrain(x, BLHD), 1, 2), BHLD)


def attention_kv(k: Array, v: Array, cache: tuple[Array, Array] | None = None,
                 index: Array | int = 0) -> tuple[Array, Array]:
  """Keys and values as attention reads them: keys [B, K, D, S], values [B, K, S, D].

  k, v [B, K, L, D] (`Attention.project_kv`, after RoPE). Without a cache
  S = L. With `cache` (keys, values) of S columns (`init_kv_cache`), k and v
  are written at columns index..index+L-1 and the updated cache is returned.
  """
  keys = jnp.swapaxes(k, 2, 3)
  if cache is None:
    return constrain(keys, KEYS), constrain(v, BHLD)
  keys = jax.lax.dynamic_update_slice_in_dim(cache[0], keys.astype(cache[0].dtype), index, axis=3)
  values = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), index, axis=2)
  return constrain(keys, CACHE_KEYS), constrain(values, CACHE_VALUES)


def init_kv_cache(batch: int, kv_heads: int, length: int, head_dim: int,
                  dtype: DType) -> tuple[Array, Array]:
  """An empty cache of `length` columns: zeros keys [B, K, D, S], values [B, K, S, D]."""
  keys = jnp.zeros((batch, kv_heads, head_dim, length), dtype)
  values = jnp.zeros((batch, kv_heads, length, head_dim), dtype)
  return constrain(keys, CACHE_KEYS), constrain(values, CACHE_VALUES)


def dot_product_attention(q: Array, keys: Array, values: Array, mask: Array,
                          bias: Array | None = None, scale: float = 1.0) -> Array:
  """softmax(scale * q k^T + bias) v with float32 weights; GQA by head groups.

  q [B, H, L, D], keys [B, K, D, S], values [B, K, S, D], mask bool[B, L, S],
  bias [1|B, H, L, S]. Query head h uses kv head h // G. Returns [B, H, L, D]
  in q's dtype.

  The G query heads of a kv head and their L positions form one axis of G·L
  rows (a free reshape of heads-first q), so both products are plain
  matmuls batched over (B, K).
  """
  b, h, l, d = q.shape
  kh = keys.shape[1]
  g = h // kh
  qg = q.reshape(b, kh, g * l, d)
  logits = jnp.einsum('bkqd,bkds->bkqs', qg, keys, preferred_element_type=jnp.float32) * scale
  logits = logits.reshape(b, kh, g, l, -1)
  if bias is not None:
    logits = logits + bias.reshape(bias.shape[0], kh, g, l, -1).astype(jnp.float32)
  logits = jnp.where(mask[:, None, None], logits, _MASKED)
  weights = jax.nn.softmax(logits, axis=-1).astype(values.dtype).reshape(b, kh, g * l, -1)
  out = jnp.einsum('bkqs,bksd->bkqd', weights, values)
  return out.reshape(b, h, l, d)


def causal_mask(query_start: Array | int, length: int, key_mask: Array) -> Array:
  """bool[B, L, S]: query i (at column query_start + i) sees key j <= its column, if key_mask[j].

  key_mask: [B, S] (1 = real key).
  """
  q_cols = query_start + jnp.arange(length)
  k_cols = jnp.arange(key_mask.shape[1])
  causal = k_cols[None, :] <= q_cols[:, None]
  return causal[None] & (key_mask[:, None, :] > 0)


# --- Rotary position embeddings (Llama / Qwen2; rotate-half layout). ---


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
  """float32[D/2] inverse frequencies, with optional Llama-3 frequency scaling."""
  inv = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
                          / head_dim))).astype(np.float32)
  if not scaling:
    return inv
  factor = scaling['factor']
  low, high = scaling['low_freq_factor'], scaling['high_freq_factor']
  old_len = scaling['original_max_position_embeddings']
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > old_len / low, inv / factor, inv)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
  """Rotates x [B, H, L, D] by angles positions[B, L] * inv_freq, in float32."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, L, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, None, :, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


# --- T5 relative position buckets. ---


def relative_position_bucket(relative: Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
  """T5's log-spaced bucket of (key column - query column); int32, same shape."""
  bucket = jnp.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (relative > 0).astype(relative.dtype) * num_buckets
    n = jnp.abs(relative)
  else:
    n = -jnp.minimum(relative, 0)
  max_exact = num_buckets // 2
  large = max_exact + (
      jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
      / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(relative.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(n < max_exact, n, large)


class RelativePositionBias(nn.Module):
  """Learned per-head bias by relative-position bucket: table [buckets, H]."""
  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool
  dtype: DType = jnp.bfloat16
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, query_start: Array | int, q_len: int, k_len: int) -> Array:
    """Bias float32[1, H, L, S] for queries at columns query_start + arange(L)."""
    table = self.param(
        'rel_embedding', nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ('relpos_buckets', 'heads')),
        (self.num_buckets, self.num_heads), self.param_dtype)
    relative = jnp.arange(k_len)[None, :] - (query_start + jnp.arange(q_len))[:, None]
    buckets = relative_position_bucket(relative.astype(jnp.int32), self.bidirectional,
                                       self.num_buckets, self.max_distance)
    bias = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # [L, S, H]
    return jnp.transpose(bias, (2, 0, 1))[None]
