"""Decoder-only model: shapes, padding invariance, cached decoding == full forward."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gkd.models.decoder import DecoderConfig, DecoderModel

CFG = DecoderConfig(vocab_size=97, embed_dim=32, mlp_dim=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, dtype='float32', tie_embeddings=False,
                    qkv_bias=True, rope_scaling_factor=8.0, rope_original_max_len=16)


def make_batch(rng, lengths, input_len, target_len, vocab):
  """Left-padded prompts of the given lengths, random full-length targets."""
  b = len(lengths)
  tokens = rng.integers(0, vocab, size=(b, input_len)).astype(np.int32)
  mask = (np.arange(input_len)[None] >= input_len - np.asarray(lengths)[:, None]).astype(np.int32)
  targets = rng.integers(0, vocab, size=(b, target_len)).astype(np.int32)
  return dict(input_tokens=jnp.asarray(tokens * mask), input_mask=jnp.asarray(mask),
              target_tokens=jnp.asarray(targets), target_mask=jnp.ones((b, target_len), jnp.int32))


@pytest.fixture(scope='module')
def model_and_params():
  model = DecoderModel(CFG)
  batch = make_batch(np.random.default_rng(0), [5, 2, 1], 5, 4, CFG.vocab_size)
  params = nn.unbox(model.init(jax.random.key(0), batch))
  return model, params


def test_logits_shape_and_dtype(model_and_params):
  model, params = model_and_params
  batch = make_batch(np.random.default_rng(1), [5, 3], 5, 4, CFG.vocab_size)
  logits = model.logits(params, batch)
  assert logits.shape == (2, 4, CFG.vocab_size) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


def test_left_padding_does_not_change_logits(model_and_params):
  model, params = model_and_params
  batch = make_batch(np.random.default_rng(2), [3], 3, 4, CFG.vocab_size)
  padded = dict(batch, input_tokens=jnp.pad(batch['input_tokens'], ((0, 0), (4, 0)),
                                           constant_values=7),
                input_mask=jnp.pad(batch['input_mask'], ((0, 0), (4, 0))))
  np.testing.assert_allclose(model.logits(params, padded), model.logits(params, batch),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('lengths,input_len', [([5, 2, 1], 5), ([1, 1], 1)])
def test_cached_decoding_equals_full_forward(model_and_params, lengths, input_len):
  model, params = model_and_params
  batch = make_batch(np.random.default_rng(3), lengths, input_len, 6, CFG.vocab_size)
  full = model.logits(params, batch)
  cache, token = jax.jit(model.init_cache, static_argnums=2)(params, batch, 6)
  np.testing.assert_array_equal(token, batch['input_tokens'][:, -1])
  step = jax.jit(model.decode_step)
  for t in range(6):
    logits, cache = step(params, cache, token)
    np.testing.assert_allclose(logits, full[:, t], rtol=1e-4, atol=1e-4)
    token = batch['target_tokens'][:, t]


def test_bfloat16_activations_close_to_float32(model_and_params):
  model, params = model_and_params
  batch = make_batch(np.random.default_rng(4), [4, 2], 4, 3, CFG.vocab_size)
  bf16 = DecoderModel(dataclasses.replace(CFG, dtype='bfloat16'))
  ref, out = model.logits(params, batch), bf16.logits(params, batch)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.1 * float(jnp.std(ref)) + 0.05)
