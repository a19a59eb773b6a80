"""T5 model: shapes, padding invariance, cached decoding == full forward."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gkd.models.t5 import T5Config, T5Model
from test_models_decoder import make_batch

CFG = T5Config(vocab_size=101, embed_dim=32, mlp_dim=64, num_encoder_layers=2,
               num_decoder_layers=2, num_heads=4, head_dim=8, relpos_buckets=8,
               relpos_max_distance=16, dtype='float32')


@pytest.fixture(scope='module', params=[False, True], ids=['v1_1', 'tied_scaled'])
def model_and_params(request):
  model = T5Model(dataclasses.replace(CFG, tie_embeddings=request.param,
                                      scale_decoder_outputs=request.param))
  batch = make_batch(np.random.default_rng(0), [5, 2], 5, 4, CFG.vocab_size)
  return model, nn.unbox(model.init(jax.random.key(0), batch))


def test_logits_shape_and_padding_invariance(model_and_params):
  model, params = model_and_params
  batch = make_batch(np.random.default_rng(1), [3, 2], 3, 4, CFG.vocab_size)
  logits = model.logits(params, batch)
  assert logits.shape == (2, 4, CFG.vocab_size) and logits.dtype == jnp.float32
  padded = dict(batch, input_tokens=jnp.pad(batch['input_tokens'], ((0, 0), (3, 0)),
                                           constant_values=5),
                input_mask=jnp.pad(batch['input_mask'], ((0, 0), (3, 0))))
  np.testing.assert_allclose(model.logits(params, padded), logits, rtol=1e-5, atol=1e-5)


def test_cached_decoding_equals_full_forward(model_and_params):
  model, params = model_and_params
  batch = make_batch(np.random.default_rng(2), [6, 3, 1], 6, 20, CFG.vocab_size)
  full = model.logits(params, batch)
  cache, token = jax.jit(model.init_cache, static_argnums=2)(params, batch, 20)
  np.testing.assert_array_equal(token, CFG.decoder_start_id)
  step = jax.jit(model.decode_step)
  for t in range(20):  # long enough to reach the log-spaced relative-position buckets
    logits, cache = step(params, cache, token)
    np.testing.assert_allclose(logits, full[:, t], rtol=1e-4, atol=1e-4)
    token = batch['target_tokens'][:, t]
