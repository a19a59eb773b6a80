"""Blockwise (flash-style) attention against the dense path: values, gradients, memory."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gkd import sampling
from gkd.errors import UserError
from gkd.models import DecoderConfig, T5Config, blockwise, build_model, layers
from gkd.train.sources import ModelSource
from test_models_decoder import make_batch


def _inputs(b=2, h=4, kh=2, length=13, d=8, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, h, length, d), dtype)
  keys = jax.random.normal(ks[1], (b, kh, d, length), dtype)
  values = jax.random.normal(ks[2], (b, kh, length, d), dtype)
  # Row 0 is left-padded by 3: its first 3 queries see no key at all.
  key_mask = jnp.ones((b, length), jnp.int32).at[0, :3].set(0)
  mask = layers.causal_mask(0, length, key_mask)
  weights = jax.random.normal(ks[3], (b, h, length, d), jnp.float32)
  return q, keys, values, mask, weights


def _value_and_grads(fn, q, keys, values, weights):
  loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * weights)
  return fn(q, keys, values), jax.grad(loss, argnums=(0, 1, 2))(q, keys, values)


@pytest.mark.parametrize("block", [4, 5, 13, 32])  # dividing S, not, S itself, above S
def test_values_and_gradients_equal_the_dense_path(block):
  q, keys, values, mask, weights = _inputs()
  dense = lambda *a: layers.dot_product_attention(*a, mask, scale=0.3)
  blocks = lambda *a: blockwise.attention(*a, mask, 0.3, block)
  out, grads = _value_and_grads(dense, q, keys, values, weights)
  out_b, grads_b = _value_and_grads(blocks, q, keys, values, weights)
  np.testing.assert_allclose(out_b, out, rtol=1e-5, atol=1e-6)
  for g, g_b in zip(grads, grads_b):  # q, keys, values; padded rows included
    assert np.abs(g_b - g).max() <= 1e-5 * np.abs(g).max()


def test_gradient_matches_finite_differences():
  q, keys, values, mask, weights = _inputs(b=1, h=2, kh=1, length=6, d=4, seed=1)
  loss = lambda v: jnp.sum(blockwise.attention(q, keys, v, mask, 0.5, 4) * weights)
  grad = jax.grad(loss)(values)
  eps = 1e-2
  for idx in [(0, 0, 0, 0), (0, 0, 3, 2), (0, 0, 5, 1)]:
    bump = jnp.zeros_like(values).at[idx].set(eps)
    numeric = (loss(values + bump) - loss(values - bump)) / (2 * eps)
    np.testing.assert_allclose(grad[idx], numeric, rtol=2e-3, atol=2e-3)


def test_bfloat16_inputs_stay_close_to_float32():
  q, keys, values, mask, _ = _inputs(dtype=jnp.bfloat16)
  out = blockwise.attention(q, keys, values, mask, 0.3, 4)
  assert out.dtype == jnp.bfloat16
  ref = layers.dot_product_attention(*(x.astype(jnp.float32) for x in (q, keys, values)), mask,
                                     scale=0.3)
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2)


def _model(attention, remat='none', block=3):
  return build_model(DecoderConfig(vocab_size=61, embed_dim=16, mlp_dim=32,
                                   num_heads=4, num_kv_heads=2, head_dim=8, dtype='float32',
                                   attention=attention, attention_block=block, remat=remat))


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_a_blockwise_decoder_has_the_dense_ones_logits_gradients_and_samples(remat):
  dense, blocks = _model('dense'), _model('blockwise', remat)
  batch = make_batch(np.random.default_rng(0), [4, 2, 1], 4, 5, 61)
  params = nn.unbox(dense.init(jax.random.key(0), batch))
  np.testing.assert_allclose(blocks.logits(params, batch), dense.logits(params, batch),
                             rtol=1e-5, atol=1e-5)
  loss = lambda m: lambda p: (m.logits(p, batch) ** 2).mean()
  g, g_b = jax.grad(loss(dense))(params), jax.grad(loss(blocks))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7), g, g_b)
  # Prefill runs blockwise, decode steps dense: the cache and greedy tokens are the same.
  config = sampling.SampleConfig(max_new_tokens=6, greedy=True)
  run = lambda m: sampling.sample(m, params, batch, jax.random.key(0), config).tokens
  np.testing.assert_array_equal(run(blocks), run(dense))


def _grad_temp(attention, length):
  """XLA's temporary bytes of the compiled gradient of a 2-layer decoder at `length`."""
  model = _model(attention, block=64)
  batch = {'input_tokens': jnp.zeros((2, 8), jnp.int32), 'input_mask': jnp.ones((2, 8), jnp.int32),
           'target_tokens': jnp.zeros((2, length), jnp.int32),
           'target_mask': jnp.ones((2, length), jnp.int32)}
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), batch)))
  grad = jax.jit(jax.grad(lambda p: model.hidden(p, batch).sum()))
  return grad.lower(params).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_grows_linearly_in_the_length():
  temp = {(a, n): _grad_temp(a, n) for a in ('dense', 'blockwise') for n in (248, 1016)}
  # 4x the columns (256 -> 1024): the dense path's [B, H, L, S] scores grow 16x
  # (measured on CPU: dense 10.9 -> 198 MiB, x18; blockwise 3.5 -> 15.5 MiB, x4.4).
  assert temp['dense', 1016] > 8 * temp['dense', 248], temp
  assert temp['blockwise', 1016] < 5 * temp['blockwise', 248], temp
  assert temp['blockwise', 1016] < temp['dense', 1016] / 4, temp


def test_bad_attention_settings_are_user_errors():
  with pytest.raises(UserError, match="attention='flash'.*dense, blockwise"):
    DecoderConfig(attention='flash')
  with pytest.raises(UserError, match='attention_block=0'):
    DecoderConfig(attention='blockwise', attention_block=0)
  with pytest.raises(UserError, match="attention='sparse'"):
    ModelSource(config=DecoderConfig(), attention='sparse')
  t5 = ModelSource(config=T5Config(vocab_size=61, embed_dim=16, mlp_dim=32, num_heads=2,
                                   head_dim=8, relpos_buckets=8, relpos_max_distance=16),
                   attention='blockwise')
  with pytest.raises(UserError, match='ModelSource.attention does not apply to a T5Config'):
    t5._with_runtime(build_model(t5.config))
