"""Several teachers: configuration, routed data, and how their distributions combine."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gkd import tasks
from gkd.errors import UserError
from gkd.models.decoder import DecoderConfig
from gkd.tasks import pipeline
from gkd.train.sources import ModelSource
from gkd.train import teachers as teachers_lib
from gkd.train.teachers import Combination, Teachers

_SOURCE = ModelSource(config=DecoderConfig())


def _write_jsonl(path, rows):
  path.write_text("\n".join(json.dumps(r) for r in rows))
  return str(path)


def test_mixture_is_the_log_of_the_weighted_probability_average():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.nn.log_softmax(jax.random.normal(k1, (2, 3, 7)))
  b = jax.nn.log_softmax(3 * jax.random.normal(k2, (2, 3, 7)))
  got = teachers_lib.combine_log_probs([a, b], Combination("mixture", (0.25, 0.75)), None)
  want = np.log(0.25 * np.exp(np.float64(a)) + 0.75 * np.exp(np.float64(b)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.exp(np.float64(got)).sum(-1), 1.0, rtol=1e-5)
  # A teacher of weight 0 drops out exactly.
  np.testing.assert_array_equal(
      teachers_lib.combine_log_probs([a, b], Combination("mixture", (0.0, 1.0)), None), b)


def test_route_picks_each_rows_teacher():
  values = [jnp.full((4, 2, 3), float(k)) for k in range(3)]
  route = jnp.array([2, 0, 1, 2])
  got = teachers_lib.combine_log_probs(values, Combination("route"), route)
  np.testing.assert_array_equal(got[:, 0, 0], [2, 0, 1, 2])
  with pytest.raises(UserError, match="route_field"):
    teachers_lib.combine_log_probs(values, Combination("route"), None)


def test_a_routed_step_skips_teachers_no_row_needs():
  ran = [lambda k=k: jnp.full((4, 3), k + 1.0) for k in range(3)]
  route = jnp.array([0, 0, 2, 0])
  outs = jax.jit(lambda r: teachers_lib.score(ran, Combination("route"), r))(route)
  np.testing.assert_array_equal([float(o[0, 0]) for o in outs], [1.0, 0.0, 3.0])
  mixed = teachers_lib.score(ran, Combination("mixture", (1 / 3,) * 3), route)
  np.testing.assert_array_equal([float(o[0, 0]) for o in mixed], [1.0, 2.0, 3.0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(sources={}), "non-empty dict"),
    (dict(sources={"": _SOURCE}), "non-empty strings"),
    (dict(sources={"a": _SOURCE}, combine="vote"), "unknown Teachers.combine 'vote'"),
    (dict(sources={"a": _SOURCE}, weights={"a": 1.0}), "for combine='mixture'"),
    (dict(sources={"a": _SOURCE, "b": _SOURCE}, combine="mixture", weights={"a": 1.0}),
     "exactly the teachers"),
    (dict(sources={"a": _SOURCE, "b": _SOURCE}, combine="mixture",
          weights={"a": -1.0, "b": 2.0}), "≥ 0 with a positive sum"),
])
def test_bad_teacher_configs(kwargs, message):
  with pytest.raises(UserError, match=message):
    Teachers(**kwargs)


def test_weights_and_routes():
  t = Teachers(sources={"add": _SOURCE, "sub": _SOURCE}, combine="mixture",
               weights={"sub": 3, "add": 1})
  assert t.names == ("add", "sub") and t.routes() == {"add": 0, "sub": 1}
  assert t.mixture_weights() == (0.25, 0.75)
  assert Teachers(sources={"a": _SOURCE, "b": _SOURCE}).mixture_weights() == (0.5, 0.5)


def test_jsonl_routes_become_teacher_indices(tmp_path):
  rows = [{"input": f"Tom has {i} apples.", "target": f"#### {i}",
           "teacher_id": "odd" if i % 2 else "even"} for i in range(6)]
  train = _write_jsonl(tmp_path / "train.jsonl", rows)
  vocab = tasks.get_vocabulary("word")
  task = tasks.get_task("jsonl", vocab, train_path=train, route_field="teacher_id")
  assert pipeline.routes_of(task, "train") == {"odd", "even"}
  it = tasks.batch_iterator(task, "train", input_length=12, target_length=6, batch_size=6,
                            seed=0, routes={"even": 0, "odd": 1})
  batch = next(it)
  texts = tasks.decode(vocab, batch["target_tokens"], batch["target_mask"])
  want = [int(t.split()[-1]) % 2 for t in texts]
  np.testing.assert_array_equal(batch[pipeline.ROUTE_KEY], want)
  # A second shard sees its own rows' routes.
  shard = tasks.batch_iterator(task, "train", input_length=12, target_length=6, batch_size=6,
                               seed=0, routes={"even": 0, "odd": 1}, shard_index=1,
                               num_shards=2)
  np.testing.assert_array_equal(next(shard)[pipeline.ROUTE_KEY], want[3:])
  unknown = tasks.batch_iterator(task, "train", input_length=12, target_length=6,
                                 batch_size=6, seed=0, routes={"even": 0})
  with pytest.raises(UserError, match="route 'odd' but the configured teachers are"):
    next(unknown)


def test_a_route_field_missing_from_a_line_is_a_clear_error(tmp_path):
  path = _write_jsonl(tmp_path / "train.jsonl", [{"input": "a", "target": "b"}])
  with pytest.raises(UserError, match="line 1: missing field 'teacher_id'"):
    tasks.get_task("jsonl", tasks.get_vocabulary("word"), train_path=path,
                   route_field="teacher_id")


def test_offline_arithmetic_routes_by_number_of_steps():
  vocab = tasks.get_vocabulary("word")
  task = tasks.get_task("offline_arithmetic", vocab, num_train=64, num_eval=16, min_steps=1,
                        max_steps=3, route_by="steps")
  assert pipeline.routes_of(task, "train") == {"1_steps", "2_steps", "3_steps"}
  for ex in pipeline.materialise(task.name, "train"):
    assert ex[4] == f"{ex[3].count('=')}_steps"  # the worked solution has one line per step
  with pytest.raises(UserError, match="route_by='items' is not a route of the arithmetic task"):
    tasks.get_task("offline_arithmetic", vocab, num_train=8, num_eval=4, route_by="items")
