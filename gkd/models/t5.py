"""T5 v1.1 / FLAN-T5 encoder-decoder.

Pre-norm blocks with RMSNorm (no bias), relative position buckets shared by
all layers of a stack, unscaled attention logits (T5 folds the 1/sqrt(d)
into the initialisation), gated-GELU feed-forward, untied output head.
Dropout is not implemented (distillation fine-tunes without it here).
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
class T5Config:
  """Sizes and options of a T5 v1.1-style model (defaults: a tiny test model)."""
  vocab_size: int = 512
  embed_dim: int = 64  # d_model
  mlp_dim: int = 128  # d_ff
  num_encoder_layers: int = 2
  num_decoder_layers: int = 2
  num_heads: int = 4
  head_dim: int = 16  # d_kv
  relpos_buckets: int = 32
  relpos_max_distance: int = 128
  activation: str = 'gelu_new'  # T5 v1.1 "gated-gelu" is the tanh approximation
  gated: bool = True
  tie_embeddings: bool = False  # output head = token embedding (original T5)
  scale_decoder_outputs: bool = False  # multiply final decoder states by d_model**-0.5 (original T5)
  norm_eps: float = 1e-6
  pad_id: int = 0
  eos_id: int = 1
  decoder_start_id: int = 0
  dtype: str = 'bfloat16'
  param_dtype: str = 'float32'
  remat: str = 'none'  # activation rematerialisation per block: layers.REMAT_POLICIES

  def __post_init__(self):
    layers.check_remat(self.remat)


class T5Block(nn.Module):
  """Self-attention, optional cross-attention (decoder), feed-forward."""
  cfg: T5Config
  cross_attention: bool

  def setup(self):
    cfg, dt = self.cfg, layers.dtypes_of(self.cfg)
    attention = lambda: layers.Attention(cfg.num_heads, cfg.num_heads, cfg.head_dim,
                                         cfg.embed_dim, kv_axis='heads', **dt)
    self.attn_norm = layers.RMSNorm(cfg.norm_eps, **dt)
    self.attn = attention()
    if self.cross_attention:
      self.cross_norm = layers.RMSNorm(cfg.norm_eps, **dt)
      self.cross = attention()
    self.mlp_norm = layers.RMSNorm(cfg.norm_eps, **dt)
    self.mlp = layers.MLP(cfg.mlp_dim, cfg.activation, cfg.gated, **dt)

  def __call__(self, x: Array, mask: Array, bias: Array,
               kv_cache: tuple[Array, Array] | None = None, index: Array | int = 0,
               cross_kv: tuple[Array, Array] | None = None, cross_mask: Array | None = None):
    """x [B, L, E]; mask bool[B, L, S]; bias [1, H, L, S]; kv_cache and cross_kv
    (keys [B, H, D, S], values [B, H, S, D]), S = I for cross_kv."""
    h = self.attn_norm(x)
    q = self.attn.project_q(h)
    k, v = layers.attention_kv(*self.attn.project_kv(h), kv_cache, index)
    x = x + self.attn(q, k, v, mask, bias)
    if self.cross_attention:
      q = self.cross.project_q(self.cross_norm(x))
      x = x + self.cross(q, *cross_kv, cross_mask)
    x = x + self.mlp(self.mlp_norm(x))
    return layers.constrain(x, layers.BLE), (k, v)


class T5(nn.Module):
  """Encoder, decoder and head; methods are the stages the Model API needs."""
  cfg: T5Config

  def setup(self):
    cfg, dt = self.cfg, layers.dtypes_of(self.cfg)
    relpos = lambda bidirectional: layers.RelativePositionBias(
        cfg.relpos_buckets, cfg.relpos_max_distance, cfg.num_heads, bidirectional, **dt)
    self.token_embed = layers.Embed(cfg.vocab_size, cfg.embed_dim, **dt)
    self.encoder_relpos = relpos(True)
    block = layers.remat(T5Block, cfg.remat)
    self.encoder_layers = [block(cfg, False) for _ in range(cfg.num_encoder_layers)]
    self.encoder_norm = layers.RMSNorm(cfg.norm_eps, **dt)
    self.decoder_relpos = relpos(False)
    self.decoder_layers = [block(cfg, True) for _ in range(cfg.num_decoder_layers)]
    self.decoder_norm = layers.RMSNorm(cfg.norm_eps, **dt)
    if not cfg.tie_embeddings:
      self.lm_head = layers.LMHead(cfg.vocab_size, **dt)

  def encode(self, tokens: Array, mask: Array) -> list[tuple[Array, Array]]:
    """Encoder on tokens int[B, I] (mask int[B, I]); returns each decoder layer's cross k/v."""
    x = layers.constrain(self.token_embed(tokens), layers.BLE)
    n = tokens.shape[1]
    bias = self.encoder_relpos(0, n, n)
    attn_mask = jnp.broadcast_to(mask[:, None, :] > 0, (mask.shape[0], n, n))
    for layer in self.encoder_layers:
      x, _ = layer(x, attn_mask, bias)
    encoded = self.encoder_norm(x)
    return [layers.attention_kv(*layer.cross.project_kv(encoded)) for layer in self.decoder_layers]

  def decode_hidden(self, tokens: Array, cross_kv: list, cross_mask: Array,
                    cache: list | None = None, index: Array | int = 0):
    """Decoder on tokens int[B, L] at columns index..; returns (final states [B, L, E], cache).

    The states are final-normed (and scaled by d_model**-0.5 with
    `scale_decoder_outputs`): `head` maps them to logits.
    """
    b, n = tokens.shape
    size = n if cache is None else cache[0][1].shape[2]
    x = layers.constrain(self.token_embed(tokens), layers.BLE)
    bias = self.decoder_relpos(index, n, size)
    mask = layers.causal_mask(index, n, jnp.ones((b, size), jnp.int32))
    cross = cross_mask[:, None, :] > 0
    new_cache = []
    for i, layer in enumerate(self.decoder_layers):
      x, kv = layer(x, mask, bias, None if cache is None else cache[i], index,
                    cross_kv[i], cross)
      new_cache.append(kv)
    x = self.decoder_norm(x)
    if self.cfg.scale_decoder_outputs:
      x = x * self.cfg.embed_dim ** -0.5
    return x, new_cache

  def head(self, x: Array) -> Array:
    """Final decoder states [B, L, E] -> float32 logits [B, L, V]."""
    logits = self.token_embed.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)
    return layers.constrain(logits, layers.BLV)

  def decode(self, tokens: Array, cross_kv: list, cross_mask: Array,
             cache: list | None = None, index: Array | int = 0):
    """`decode_hidden` then `head`: (float32[B, L, V], cache)."""
    x, new_cache = self.decode_hidden(tokens, cross_kv, cross_mask, cache, index)
    return self.head(x), new_cache

  def hidden(self, inputs: Array, input_mask: Array, decoder_tokens: Array) -> Array:
    x, _ = self.decode_hidden(decoder_tokens, self.encode(inputs, input_mask), input_mask)
    return x

  def __call__(self, inputs: Array, input_mask: Array, decoder_tokens: Array) -> Array:
    return self.head(self.hidden(inputs, input_mask, decoder_tokens))


def shift_right(targets: Array, start_id: int) -> Array:
  """Decoder inputs: [start, t_0, ..., t_{O-2}]."""
  start = jnp.full((targets.shape[0], 1), start_id, targets.dtype)
  return jnp.concatenate([start, targets[:, :-1]], axis=1)


class T5Model:
  """The Model API (gkd/models/api.py) for T5; the encoder runs once per decode."""
  is_encoder_decoder = True

  def __init__(self, config: T5Config):
    self.config = config
    self.vocab_size = config.vocab_size
    self.eos_id = config.eos_id
    self.module = T5(config)

  def init(self, rng: Array, batch: Batch) -> Params:
    inputs = jnp.zeros(batch['input_tokens'].shape, jnp.int32)
    targets = jnp.zeros(batch['target_tokens'].shape, jnp.int32)
    return self.module.init(rng, inputs, jnp.ones_like(inputs), targets)['params']

  def hidden(self, params: Params, batch: Batch) -> Array:
    """Final decoder states at target positions: [B, O, E] (activation dtype)."""
    decoder_tokens = shift_right(batch['target_tokens'], self.config.decoder_start_id)
    return self.module.apply({'params': params}, batch['input_tokens'], batch['input_mask'],
                             decoder_tokens, method=T5.hidden)

  def head_params(self, params: Params) -> Params:
    """The part of `params` that `head` reads."""
    name = 'token_embed' if self.config.tie_embeddings else 'lm_head'
    return {name: params[name]}

  def head(self, params: Params, hidden: Array) -> Array:
    """[B, L, E] -> float32[B, L, V]; `params` may be the full tree or `head_params(...)`."""
    return self.module.apply({'params': params}, hidden, method=T5.head)

  def logits(self, params: Params, batch: Batch) -> Array:
    """float32[B, O, V]: `head(params, hidden(params, batch))`."""
    return self.head(params, self.hidden(params, batch))

  def init_cache(self, params: Params, batch: Batch, max_new: int) -> tuple[Cache, Array]:
    cfg = self.config
    cross_kv = self.module.apply({'params': params}, batch['input_tokens'],
                                 batch['input_mask'], method=T5.encode)
    b = batch['input_tokens'].shape[0]
    kv = layers.init_kv_cache(b, cfg.num_heads, max_new, cfg.head_dim, jnp.dtype(cfg.dtype))
    cache = dict(kv=[kv] * cfg.num_decoder_layers, cross_kv=cross_kv,
                 cross_mask=batch['input_mask'].astype(jnp.int32),
                 index=jnp.asarray(0, jnp.int32))
    return cache, jnp.full((b,), cfg.decoder_start_id, jnp.int32)

  def decode_step(self, params: Params, cache: Cache, token: Array) -> tuple[Array, Cache]:
    logits, kv = self.module.apply(
        {'params': params}, token[:, None], cache['cross_kv'], cache['cross_mask'],
        cache['kv'], cache['index'], method=T5.decode)
    return logits[:, 0], dict(cache, kv=kv, index=cache['index'] + 1)
