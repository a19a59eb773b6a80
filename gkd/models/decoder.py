"""Llama-family decoder-only LM (Llama 3, Qwen2/Qwen2.5 by configuration).

Pre-norm blocks: RMSNorm -> grouped-query attention with RoPE -> residual,
RMSNorm -> SwiGLU -> residual; final RMSNorm; tied or untied output head.
"""

import dataclasses
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from gkd.models import layers
from gkd.models.api import Batch, Cache, Params

Array = jax.Array


@gin.configurable(module='models')
@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Sizes and options of a Llama/Qwen2-style decoder (defaults: a tiny test model)."""
  vocab_size: int = 512
  embed_dim: int = 64
  mlp_dim: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  rope_theta: float = 10000.0
  # Llama-3 RoPE frequency scaling; factor 0 disables it.
  rope_scaling_factor: float = 0.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  qkv_bias: bool = False  # True for Qwen2 (exported as Qwen2, else as Llama)
  tie_embeddings: bool = True
  norm_eps: float = 1e-6
  bos_id: int = 1
  eos_id: int = 2
  pad_id: int = 0
  max_len: int = 4096  # max_position_embeddings, only recorded for export
  dtype: str = 'bfloat16'  # activations
  param_dtype: str = 'float32'
  remat: str = 'none'  # activation rematerialisation per block: layers.REMAT_POLICIES
  # 'dense' holds the [B, H, L, S] scores; 'blockwise' runs full sequences `attention_block`
  # keys at a time (gkd.models.blockwise: memory linear in L; decode steps stay dense).
  attention: str = 'dense'
  attention_block: int = 128

  def __post_init__(self):
    layers.check_remat(self.remat)
    layers.check_attention(self.attention, self.attention_block)

  @property
  def rope_scaling(self) -> dict[str, float] | None:
    if not self.rope_scaling_factor:
      return None
    return dict(factor=self.rope_scaling_factor, low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_len)


class DecoderBlock(nn.Module):
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, mask: Array,
               kv_cache: tuple[Array, Array] | None, index: Array | int):
    """x [B, L, E]; positions [B, L]; mask bool[B, L, S]; kv_cache (keys [B, K, D, S],
    values [B, K, S, D]) or None. Returns (x, the keys and values attended to)."""
    cfg, dt = self.cfg, layers.dtypes_of(self.cfg)
    attn = layers.Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim,
                            qkv_bias=cfg.qkv_bias, impl=cfg.attention,
                            block=cfg.attention_block, name='attn', **dt)
    h = layers.RMSNorm(cfg.norm_eps, name='attn_norm', **dt)(x)
    inv_freq = layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    q = layers.apply_rope(attn.project_q(h), positions, inv_freq)
    k, v = attn.project_kv(h)
    k, v = layers.attention_kv(layers.apply_rope(k, positions, inv_freq), v, kv_cache, index)
    x = x + attn(q, k, v, mask, scale=cfg.head_dim ** -0.5)
    h = layers.RMSNorm(cfg.norm_eps, name='mlp_norm', **dt)(x)
    x = x + layers.MLP(cfg.mlp_dim, 'silu', gated=True, name='mlp', **dt)(h)
    return layers.constrain(x, layers.BLE), (k, v)


class Decoder(nn.Module):
  """The decoder stack; one code path for full sequences, prefill and decode steps."""
  cfg: DecoderConfig

  def setup(self):
    cfg, dt = self.cfg, layers.dtypes_of(self.cfg)
    self.embed = layers.Embed(cfg.vocab_size, cfg.embed_dim, init_std=0.02, **dt)
    block = layers.remat(DecoderBlock, cfg.remat)
    self.layers = [block(cfg) for _ in range(cfg.num_layers)]
    self.final_norm = layers.RMSNorm(cfg.norm_eps, **dt)
    if not cfg.tie_embeddings:
      self.lm_head = layers.LMHead(cfg.vocab_size, **dt)

  def hidden(self, tokens: Array, positions: Array, key_mask: Array,
             cache: list | None = None, index: Array | int = 0,
             hidden_from: int | None = 0):
    """Runs tokens int[B, L] at columns index..index+L-1.

    key_mask int[B, S]: 1 on real keys (S = L without a cache, else the cache
    length). cache: per-layer (keys, values) (`layers.init_kv_cache`) or None. Returns (the
    final-normed states [B, L - hidden_from, E] or None, new per-layer cache).
    """
    x = layers.constrain(self.embed(tokens), layers.BLE)
    mask = layers.causal_mask(index, tokens.shape[1], key_mask)
    new_cache = []
    for i, block in enumerate(self.layers):
      x, kv = block(x, positions, mask, None if cache is None else cache[i], index)
      new_cache.append(kv)
    if hidden_from is None:
      return None, new_cache
    return self.final_norm(x[:, hidden_from:]), new_cache

  def head(self, x: Array) -> Array:
    """Final-normed states [B, L, E] -> float32 logits [B, L, V]."""
    logits = self.embed.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)
    return layers.constrain(logits, layers.BLV)

  def __call__(self, tokens: Array, positions: Array, key_mask: Array,
               cache: list | None = None, index: Array | int = 0,
               logits_from: int | None = 0):
    """`hidden` then `head`: (float32 logits [B, L - logits_from, V] or None, new cache)."""
    x, new_cache = self.hidden(tokens, positions, key_mask, cache, index, logits_from)
    return (None if x is None else self.head(x)), new_cache


def positions_from_mask(mask: Array) -> Array:
  """Position ids cumsum(mask) - 1, clipped at 0 on left padding; int32[B, L]."""
  return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)


class DecoderModel:
  """The Model API (gkd/models/api.py) for a decoder-only LM.

  The sequence is [input_tokens | target_tokens[:, :-1]]; column I-1+t predicts target t.
  """
  is_encoder_decoder = False

  def __init__(self, config: DecoderConfig):
    self.config = config
    self.vocab_size = config.vocab_size
    self.eos_id = config.eos_id
    self.module = Decoder(config)

  def init(self, rng: Array, batch: Batch) -> Params:
    shape = batch['input_tokens'].shape
    tokens = jnp.zeros(shape, jnp.int32)
    return self.module.init(rng, tokens, tokens, jnp.ones(shape, jnp.int32))['params']

  def hidden(self, params: Params, batch: Batch) -> Array:
    """Final-normed decoder states at target positions: [B, O, E] (activation dtype)."""
    inputs = batch['input_tokens']
    targets = batch['target_tokens'][:, :-1]
    tokens = jnp.concatenate([inputs, targets], axis=1)
    mask = jnp.concatenate([batch['input_mask'], jnp.ones_like(targets)], axis=1)
    hidden, _ = self.module.apply({'params': params}, tokens, positions_from_mask(mask), mask,
                                  hidden_from=inputs.shape[1] - 1, method=Decoder.hidden)
    return hidden

  def head_params(self, params: Params) -> Params:
    """The part of `params` that `head` reads."""
    name = 'embed' if self.config.tie_embeddings else 'lm_head'
    return {name: params[name]}

  def head(self, params: Params, hidden: Array) -> Array:
    """[B, L, E] -> float32[B, L, V]; `params` may be the full tree or `head_params(...)`."""
    return self.module.apply({'params': params}, hidden, method=Decoder.head)

  def logits(self, params: Params, batch: Batch) -> Array:
    """float32[B, O, V]: `head(params, hidden(params, batch))`."""
    return self.head(params, self.hidden(params, batch))

  def init_cache(self, params: Params, batch: Batch, max_new: int) -> tuple[Cache, Array]:
    """Prefills all prompt tokens but the last into a cache of I - 1 + max_new columns."""
    inputs, input_mask = batch['input_tokens'], batch['input_mask']
    b, i = inputs.shape
    cfg = self.config
    size = i - 1 + max_new
    kv = [layers.init_kv_cache(b, cfg.num_kv_heads, size, cfg.head_dim, jnp.dtype(cfg.dtype))
          ] * cfg.num_layers
    key_mask = jnp.concatenate(
        [input_mask[:, :-1], jnp.ones((b, max_new), input_mask.dtype)], axis=1).astype(jnp.int32)
    if i > 1:
      _, kv = self.module.apply(
          {'params': params}, inputs[:, :-1], positions_from_mask(input_mask)[:, :-1], key_mask,
          cache=kv, index=0, logits_from=None)
    cache = dict(kv=kv, key_mask=key_mask, index=jnp.asarray(i - 1, jnp.int32),
                 position=jnp.sum(input_mask[:, :-1], axis=1).astype(jnp.int32))
    return cache, inputs[:, -1].astype(jnp.int32)

  def decode_step(self, params: Params, cache: Cache, token: Array) -> tuple[Array, Cache]:
    logits, kv = self.module.apply(
        {'params': params}, token[:, None], cache['position'][:, None], cache['key_mask'],
        cache=cache['kv'], index=cache['index'])
    cache = dict(cache, kv=kv, index=cache['index'] + 1, position=cache['position'] + 1)
    return logits[:, 0], cache
