"""The hidden / head split of the Model API and the remat policies, in both families."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from gkd.errors import UserError
from gkd.models import DecoderConfig, T5Config, build_model
from test_models_decoder import make_batch

CONFIGS = {
    'decoder_tied': DecoderConfig(vocab_size=61, embed_dim=16, mlp_dim=32, num_heads=2,
                                  num_kv_heads=1, head_dim=8, dtype='float32'),
    'decoder_untied': DecoderConfig(vocab_size=61, embed_dim=16, mlp_dim=32, num_heads=2,
                                    num_kv_heads=1, head_dim=8, dtype='float32',
                                    tie_embeddings=False),
    't5_untied': T5Config(vocab_size=61, embed_dim=16, mlp_dim=32, num_heads=2, head_dim=8,
                          relpos_buckets=8, relpos_max_distance=16, dtype='float32'),
    't5_tied_scaled': T5Config(vocab_size=61, embed_dim=16, mlp_dim=32, num_heads=2,
                               head_dim=8, relpos_buckets=8, relpos_max_distance=16,
                               dtype='float32', tie_embeddings=True,
                               scale_decoder_outputs=True),
}


def _setup(name):
  model = build_model(CONFIGS[name])
  batch = make_batch(np.random.default_rng(0), [4, 2, 1], 4, 5, 61)
  return model, nn.unbox(model.init(jax.random.key(0), batch)), batch


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_logits_are_head_of_hidden_and_head_reads_only_head_params(name):
  model, params, batch = _setup(name)
  hidden = model.hidden(params, batch)
  assert hidden.shape == (3, 5, 16)
  head = model.head_params(params)
  assert len(jax.tree.leaves(head)) == 1  # one matrix: tied embedding or lm_head
  logits = model.logits(params, batch)
  np.testing.assert_array_equal(model.head(head, hidden), logits)
  # Independent check of the head: the tied embedding / lm_head kernel as a matmul.
  (w,) = jax.tree.leaves(head)
  ref = hidden @ (w.T if w.shape[0] == 61 else w)
  np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['decoder_untied', 't5_tied_scaled'])
@pytest.mark.parametrize('policy', ['full', 'dots'])
def test_remat_keeps_parameters_values_and_gradients(name, policy):
  model, params, batch = _setup(name)
  remat = build_model(dataclasses.replace(model.config, remat=policy))
  shapes = jax.eval_shape(lambda: nn.unbox(remat.init(jax.random.key(0), batch)))
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  loss = lambda m: lambda p: (m.logits(p, batch) ** 2).mean()
  g, g_remat = jax.grad(loss(model))(params), jax.grad(loss(remat))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g, g_remat)


def test_unknown_remat_policy_is_a_user_error():
  with pytest.raises(UserError, match="remat='some'.*none, full, dots"):
    DecoderConfig(remat='some')
  with pytest.raises(UserError, match='remat'):
    T5Config(remat='everything')
