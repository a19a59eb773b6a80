"""Orbax checkpoints of the train state: retention, restore onto another mesh, locking."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from gkd import partitioning
from gkd.errors import UserError
from gkd.models import DecoderConfig, build_model
from gkd.train import checkpoints


def _options(**kw):
  return checkpoints.checkpoint_options(**{"every_steps": 1, "keep": 2, "async_save": False,
                                           **kw})


def test_keeps_the_last_k_and_the_best(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), _options(best_metric="accuracy"))
  state = {"w": jnp.arange(4.0)}
  accuracy = {1: 10.0, 2: 70.0, 3: 20.0, 4: 30.0, 5: 40.0}
  for step in range(1, 6):
    ckpt.save(step, state, {"position": step}, metrics={"accuracy": accuracy[step]})
  ckpt.wait()
  kept = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert kept == [2, 4, 5]  # the best (step 2) and the last two
  restored, data = ckpt.restore(2, checkpoints.abstract_like(
      state, {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])}))
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert data == {"position": 2}
  ckpt.close()


def test_saves_only_every_n_steps_unless_forced(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), _options(every_steps=3, keep=10))
  saved = [ckpt.save(s, {"x": jnp.ones(2)}, {}) for s in range(1, 7)]
  assert saved == [False, False, True, False, False, True]
  assert ckpt.save(7, {"x": jnp.ones(2)}, {}, force=True)
  ckpt.wait()
  assert ckpt.latest_step() == 7
  ckpt.close()


def test_restores_onto_another_mesh_shape(tmp_path):
  model = build_model(DecoderConfig(vocab_size=64, embed_dim=32, mlp_dim=64, num_layers=1,
                                    num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32"))
  one = jnp.ones((8, 4), jnp.int32)
  batch = dict(input_tokens=one, input_mask=one, target_tokens=one, target_mask=one)
  mesh1 = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  params, _ = partitioning.init_sharded(model, jax.random.PRNGKey(0), batch, mesh1,
                                        partitioning.data_parallel_rules())
  ckpt = checkpoints.Checkpointer(str(tmp_path), _options())
  ckpt.save(1, params, {"epoch": 0})
  ckpt.wait()
  mesh8 = partitioning.make_mesh(2, 2, 2)
  rules = partitioning.fsdp_tp_rules()
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)
  shardings = partitioning.param_shardings(abstract, mesh8, rules)
  restored, _ = ckpt.restore(1, checkpoints.abstract_like(params, shardings))
  for a, b, s in zip(jax.tree.leaves(params), jax.tree.leaves(restored), jax.tree.leaves(shardings)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert b.sharding == s
  assert any(len(s.device_set) > 1 and s.spec != PartitionSpec()
             for s in jax.tree.leaves(shardings))
  # A checkpoint of another shape is a clear error, not a crash.
  wrong = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[:-1] + (x.shape[-1] + 1,),
                                                      x.dtype, sharding=NamedSharding(
                                                          mesh8, PartitionSpec())), params)
  with pytest.raises(UserError, match="does not match this model"):
    ckpt.restore(1, wrong)
  ckpt.close()


def test_model_dir_lock_is_exclusive(tmp_path):
  first, second = checkpoints.ModelDirLock(str(tmp_path)), checkpoints.ModelDirLock(str(tmp_path))
  first.acquire()
  with pytest.raises(UserError, match="another run is using model directory"):
    second.acquire()
  first.release()
  second.acquire()
  second.release()
