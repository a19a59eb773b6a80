"""Meshes, rule sets, sharded init and forward on 8 simulated CPU devices."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gkd import partitioning
from gkd.errors import UserError
from gkd.models import DecoderConfig, T5Config, build_model
from test_models_decoder import make_batch

DECODER = DecoderConfig(vocab_size=256, embed_dim=64, mlp_dim=128, num_heads=4, num_kv_heads=2,
                        head_dim=16, tie_embeddings=False, dtype='float32')
T5 = T5Config(vocab_size=256, embed_dim=64, mlp_dim=128, num_heads=4, head_dim=16,
              dtype='float32')

MESHES = {'data': (8, 1, 1), 'fsdp': (2, 4, 1), 'fsdp_tp': (2, 2, 2)}

# parameter path -> expected PartitionSpec per rule set
EXPECTED = {
    ('layers_0', 'attn', 'query', 'kernel'): {
        'data': P(None, None, None), 'fsdp': P('fsdp', None, None),
        'fsdp_tp': P('fsdp', 'tensor', None)},
    ('layers_0', 'attn', 'key', 'kernel'): {
        'data': P(None, None, None), 'fsdp': P('fsdp', None, None),
        'fsdp_tp': P('fsdp', 'tensor', None)},
    ('layers_0', 'attn', 'out', 'kernel'): {
        'data': P(None, None, None), 'fsdp': P(None, None, 'fsdp'),
        'fsdp_tp': P('tensor', None, 'fsdp')},
    ('layers_1', 'mlp', 'wo', 'kernel'): {
        'data': P(None, None), 'fsdp': P(None, 'fsdp'), 'fsdp_tp': P('tensor', 'fsdp')},
    ('embed', 'embedding'): {
        'data': P(None, None), 'fsdp': P(None, 'fsdp'), 'fsdp_tp': P('tensor', 'fsdp')},
    ('lm_head', 'kernel'): {
        'data': P(None, None), 'fsdp': P('fsdp', None), 'fsdp_tp': P('fsdp', 'tensor')},
    ('final_norm', 'scale'): {'data': P(None), 'fsdp': P(None), 'fsdp_tp': P(None)},
}


def assert_sharded(array, *spec):
  """array's sharding equals spec on its mesh (size-1 mesh axes may be simplified away)."""
  expected = NamedSharding(array.sharding.mesh, P(*spec))
  assert array.sharding.is_equivalent_to(expected, array.ndim), (array.sharding.spec, spec)


def leaf(tree, path):
  for key in path:
    tree = tree[key]
  return tree


BATCH = make_batch(np.random.default_rng(0), [6, 3, 1, 6, 2, 5, 4, 6], 6, 4, 256)


@pytest.mark.parametrize('rule_set', sorted(MESHES))
def test_decoder_init_and_forward_sharded(rule_set):
  mesh = partitioning.make_mesh(*MESHES[rule_set])
  rules = partitioning.standard_logical_axis_rules(rule_set)
  model = build_model(DECODER)
  params, shardings = partitioning.init_sharded(model, jax.random.key(0), BATCH, mesh, rules)
  for path, specs in EXPECTED.items():
    array = leaf(params, path)
    assert_sharded(array, *specs[rule_set])
    assert array.sharding == leaf(shardings, path)
  batch_sharding = partitioning.logical_sharding(mesh, rules, 'activation_batch', None)
  batch = jax.device_put(BATCH, batch_sharding)
  with partitioning.activation_sharding(mesh, rules):
    logits = jax.jit(model.logits)(params, batch)
  reference = model.logits(jax.device_get(params), BATCH)
  np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)
  assert_sharded(logits, ('data', 'fsdp'), None, 'tensor' if rule_set == 'fsdp_tp' else None)


def test_decoder_cache_sharded_under_tensor_parallelism():
  mesh = partitioning.make_mesh(2, 2, 2)
  rules = partitioning.fsdp_tp_rules()
  model = build_model(DECODER)
  params, _ = partitioning.init_sharded(model, jax.random.key(0), BATCH, mesh, rules)
  with partitioning.activation_sharding(mesh, rules):
    cache, token = jax.jit(model.init_cache, static_argnums=2)(params, BATCH, 3)
    logits, cache = jax.jit(model.decode_step)(params, cache, token)
  keys, values = cache['kv'][0]  # [B, K, D, S], [B, K, S, D]
  assert_sharded(keys, ('data', 'fsdp'), 'tensor', None, None)
  assert_sharded(values, ('data', 'fsdp'), 'tensor', None, None)
  np.testing.assert_allclose(logits, model.logits(jax.device_get(params), BATCH)[:, 0],
                             rtol=1e-5, atol=1e-5)


def test_t5_init_and_forward_fsdp_tp():
  mesh = partitioning.make_mesh(2, 2, 2)
  rules = partitioning.fsdp_tp_rules()
  model = build_model(T5)
  params, _ = partitioning.init_sharded(model, jax.random.key(0), BATCH, mesh, rules)
  cross = params['decoder_layers_0']['cross']['key']['kernel']
  assert_sharded(cross, 'fsdp', 'tensor', None)
  relpos = params['encoder_relpos']['rel_embedding']
  assert_sharded(relpos, None, 'tensor')
  with partitioning.activation_sharding(mesh, rules):
    logits = jax.jit(model.logits)(params, BATCH)
  np.testing.assert_allclose(logits, model.logits(jax.device_get(params), BATCH),
                             rtol=1e-5, atol=1e-5)


def test_mesh_axes_that_do_not_divide_are_dropped():
  # 6 heads over tensor=4: the heads dimension stays replicated, 'embed' still uses fsdp.
  mesh = partitioning.make_mesh(data=1, fsdp=2, tensor=4)
  config = DecoderConfig(embed_dim=48, num_heads=6, num_kv_heads=6, head_dim=8, mlp_dim=64)
  model = build_model(config)
  boxed = jax.eval_shape(model.init, jax.random.key(0), BATCH)
  shardings = partitioning.param_shardings(boxed, mesh, partitioning.fsdp_tp_rules())
  assert shardings['layers_0']['attn']['query']['kernel'].spec == P('fsdp', None, None)
  assert shardings['layers_0']['mlp']['wi_0']['kernel'].spec == P('fsdp', 'tensor')


def test_make_mesh_sizes():
  assert dict(partitioning.make_mesh().shape) == {'data': 8, 'fsdp': 1, 'tensor': 1}
  assert dict(partitioning.make_mesh(fsdp=4).shape) == {'data': 2, 'fsdp': 4, 'tensor': 1}
  with pytest.raises(UserError, match='product is 8'):
    partitioning.make_mesh(data=3, fsdp=1, tensor=1)
  with pytest.raises(UserError, match='Unknown partitioning rule set'):
    partitioning.standard_logical_axis_rules('zero')


def test_rule_sets_keep_weight_and_activation_names_apart():
  for name in partitioning.RULE_SETS:
    rules = dict(partitioning.standard_logical_axis_rules(name))
    assert rules['activation_embed'] is None  # hidden activations are never split by FSDP
    assert rules['activation_batch'] == ('data', 'fsdp')
  assert dict(partitioning.fsdp_rules())['embed'] == 'fsdp'
