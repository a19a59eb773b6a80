"""The compiled GKD step: each branch against an independent recomputation, on tiny models."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gkd import losses, partitioning, sampling
from gkd.errors import UserError
from gkd.models import DecoderConfig, T5Config, build_model
from gkd.train import Method, TrainState, make_train_step

VOCAB = 48
EOS = 1


def _config(kind, width, seed_layers=2, vocab=VOCAB):
  if kind == "t5":
    return T5Config(vocab_size=vocab, embed_dim=width, mlp_dim=2 * width,
                    num_encoder_layers=seed_layers, num_decoder_layers=seed_layers,
                    num_heads=2, head_dim=width // 2, eos_id=EOS, dtype="float32")
  return DecoderConfig(vocab_size=vocab, embed_dim=width, mlp_dim=2 * width,
                       num_layers=seed_layers, num_heads=2, num_kv_heads=1,
                       head_dim=width // 2, eos_id=EOS, bos_id=2, dtype="float32")


def _batch(seed=0, b=8, i=6, o=5):
  rng = np.random.default_rng(seed)
  input_mask = (np.arange(i)[None] >= rng.integers(0, i - 1, (b, 1))).astype(np.int32)
  target_len = rng.integers(1, o + 1, (b, 1))
  target_mask = (np.arange(o)[None] < target_len).astype(np.int32)
  return {"input_tokens": jnp.asarray(rng.integers(3, VOCAB, (b, i)) * input_mask, jnp.int32),
          "input_mask": jnp.asarray(input_mask),
          "target_tokens": jnp.asarray(rng.integers(3, VOCAB, (b, o)) * target_mask, jnp.int32),
          "target_mask": jnp.asarray(target_mask)}


def _setup(kind="decoder", method=None, tx=None, teacher_vocab=VOCAB, reward=None):
  student = build_model(_config(kind, 16))
  teacher = build_model(_config(kind, 32, vocab=teacher_vocab))
  batch = _batch()
  params = partitioning.strip_boxes(student.init(jax.random.PRNGKey(0), batch))
  teacher_params = partitioning.strip_boxes(teacher.init(jax.random.PRNGKey(1), batch))
  tx = tx or optax.sgd(0.1)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(7))
  step = jax.jit(make_train_step(student, teacher, tx, method or Method(), reward))
  return student, teacher, state, teacher_params, batch, step


def _loss(student, teacher, params, teacher_params, batch, divergence):
  return divergence(student.logits(params, batch), teacher.logits(teacher_params, batch),
                    batch["target_mask"], targets=batch["target_tokens"])


@pytest.mark.parametrize("kind", ["decoder", "t5"])
def test_supervised_kd_loss_and_update(kind):
  method = Method(divergence=losses.Divergence("forward_kl"), lmbda=0.0)
  student, teacher, state, tp, batch, step = _setup(kind, method)
  new, metrics = step(state, tp, batch)
  expected, grads = jax.value_and_grad(
      lambda p: _loss(student, teacher, p, tp, batch, method.divergence))(state.params)
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
  assert metrics["on_policy"] == 0.0 and metrics["finite"] == 1.0
  np.testing.assert_allclose(metrics["sampled_length"], np.mean(np.sum(batch["target_mask"], 1)))
  want = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               new.params, want)
  assert int(new.step) == 1


@pytest.mark.parametrize("kind", ["decoder", "t5"])
def test_on_policy_step_trains_on_student_samples(kind):
  method = Method(divergence=losses.Divergence("reverse_kl"), lmbda=1.0)
  student, teacher, state, tp, batch, step = _setup(kind, method)
  _, metrics = step(state, tp, batch)
  # The step's samples, redrawn outside with the key the step derives.
  key = jax.random.split(jax.random.fold_in(state.rng, 0))[1]
  config = dataclasses.replace(method.sampler, max_new_tokens=batch["target_tokens"].shape[1])
  samples = sampling.sample(student, state.params, batch, key, config)
  on_policy = sampling.with_targets(batch, samples)
  expected = _loss(student, teacher, state.params, tp, on_policy, method.divergence)
  assert metrics["on_policy"] == 1.0
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["sampled_length"], np.mean(np.sum(samples.mask, 1)))


def test_seq_kd_trains_on_teacher_samples():
  method = Method(divergence=losses.Divergence("forward_kl"), lmbda=0.0, seq_kd=True)
  student, teacher, state, tp, batch, step = _setup("decoder", method)
  _, metrics = step(state, tp, batch)
  key = jax.random.split(jax.random.fold_in(state.rng, 0))[1]
  config = dataclasses.replace(method.sampler, max_new_tokens=batch["target_tokens"].shape[1])
  samples = sampling.sample(teacher, tp, batch, key, config)
  expected = _loss(student, teacher, state.params, tp, sampling.with_targets(batch, samples),
                   method.divergence)
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)


def test_mixed_lambda_is_one_program_with_the_right_fraction():
  method = Method(divergence=losses.Divergence("jsd", {"beta": 0.5}), lmbda=0.3)
  _, _, state, tp, batch, step = _setup("decoder", method)
  flags = []
  for _ in range(60):
    state, metrics = step(state, tp, batch)
    flags.append(float(metrics["on_policy"]))
  assert step._cache_size() == 1  # pylint: disable=protected-access
  # 60 Bernoulli(0.3) draws: mean 18, sd 3.5; a wrong λ (0 / 0.5 / 1) falls far outside.
  assert 8 <= sum(flags) <= 28, sum(flags)


def test_sft_objective_is_the_targets_nll():
  method = Method(objective="sft")
  student, _, state, tp, batch, step = _setup("decoder", method)
  _, metrics = step(state, tp, batch)
  logp = jax.nn.log_softmax(student.logits(state.params, batch))
  nll = -jnp.take_along_axis(logp, batch["target_tokens"][..., None], -1)[..., 0]
  np.testing.assert_allclose(metrics["loss"], losses.reduce(nll, batch["target_mask"]),
                             rtol=1e-5)


def test_rl_term_uses_the_reward_on_student_samples():
  method = Method(divergence=losses.Divergence("reverse_kl"), lmbda=1.0, rl_alpha=0.25)
  seen = {}

  def reward(tokens, mask, data):
    seen["data_targets"] = np.asarray(data["target_tokens"])
    return (np.asarray(tokens)[:, 0] % 2).astype(np.float32)  # even first token: 0, odd: 1

  student, teacher, state, tp, batch, step = _setup("decoder", method, reward=reward)
  _, metrics = step(state, tp, batch)
  key = jax.random.split(jax.random.fold_in(state.rng, 0))[1]
  config = dataclasses.replace(method.sampler, max_new_tokens=batch["target_tokens"].shape[1])
  samples = sampling.sample(student, state.params, batch, key, config)
  r = (np.asarray(samples.tokens)[:, 0] % 2).astype(np.float32)
  logits = student.logits(state.params, sampling.with_targets(batch, samples))
  logq = jnp.take_along_axis(jax.nn.log_softmax(logits), samples.tokens[..., None], -1)[..., 0]
  m = samples.mask.astype(jnp.float32)
  pg = -jnp.mean((r - r.mean()) * jnp.sum(logq * m, 1) / jnp.maximum(m.sum(1), 1))
  np.testing.assert_allclose(metrics["rl_loss"], pg, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics["loss"], 0.25 * metrics["distill_loss"] + 0.75 * pg,
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(seen["data_targets"], batch["target_tokens"])


def test_non_finite_loss_leaves_the_state_unchanged():
  method = Method(divergence=losses.Divergence("forward_kl"), inject_nan_at_step=1)
  _, _, state, tp, batch, step = _setup("decoder", method)
  state, m0 = step(state, tp, batch)
  before = jax.tree.map(np.asarray, state.params)
  state, m1 = step(state, tp, batch)
  assert m0["finite"] == 1.0 and m1["finite"] == 0.0 and not np.isfinite(m1["loss"])
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, state.params))
  assert int(state.step) == 2


def test_gradient_accumulation_updates_every_k_steps():
  tx = optax.MultiSteps(optax.sgd(0.1), 2)
  _, _, state, tp, batch, step = _setup("decoder", Method(), tx=tx)
  p0 = jax.tree.map(np.asarray, state.params)
  state, _ = step(state, tp, batch)
  p1 = jax.tree.map(np.asarray, state.params)
  state, _ = step(state, tp, batch)
  jax.tree.map(np.testing.assert_array_equal, p0, p1)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), p1, state.params)
  assert any(jax.tree.leaves(changed))


def test_vocabulary_mismatch_is_a_clear_error_before_compiling():
  student = build_model(_config("decoder", 16))
  teacher = build_model(_config("decoder", 16, vocab=VOCAB + 8))
  with pytest.raises(UserError, match="vocabularies differ"):
    make_train_step(student, teacher, optax.sgd(0.1), Method())


@pytest.mark.parametrize("kwargs, message", [
    (dict(lmbda=1.5), r"lmbda=1.5 is out of range"),
    (dict(lmbda=-0.1), r"lmbda=-0.1 is out of range"),
    (dict(rl_alpha=2), r"rl_alpha=2 is out of range"),
    (dict(objective="kd"), r"unknown objective 'kd'"),
    (dict(on_nonfinite="ignore"), r"on_nonfinite='ignore'"),
])
def test_method_validation(kwargs, message):
  with pytest.raises(UserError, match=message):
    Method(**kwargs)


@pytest.mark.parametrize("rules, shape", [("data", (8, 1, 1)), ("fsdp", (2, 4, 1)),
                                          ("fsdp_tp", (2, 2, 2))])
def test_same_losses_on_one_device_and_on_the_8_device_mesh(rules, shape):
  method = Method(divergence=losses.Divergence("jsd", {"beta": 0.5}), lmbda=0.5)
  student, teacher, state0, tp0, batch, _ = _setup("decoder", method)
  tx = optax.adam(1e-2)

  def trajectory(mesh, rule_set):
    rule_list = partitioning.standard_logical_axis_rules(rule_set)
    boxed = jax.eval_shape(student.init, jax.random.PRNGKey(0), batch)
    p_sh = partitioning.param_shardings(boxed, mesh, rule_list)
    t_sh = partitioning.param_shardings(jax.eval_shape(teacher.init, jax.random.PRNGKey(1), batch),
                                        mesh, rule_list)
    b_sh = partitioning.logical_sharding(mesh, rule_list, "activation_batch", None)
    params = jax.device_put(state0.params, p_sh)
    state = TrainState(step=state0.step, params=params, opt_state=tx.init(params),
                       rng=state0.rng)
    with partitioning.activation_sharding(mesh, rule_list):
      step = jax.jit(make_train_step(student, teacher, tx, method),
                     in_shardings=(None, t_sh, b_sh))
      out = []
      tp = jax.device_put(tp0, t_sh)
      for _ in range(4):
        state, metrics = step(state, tp, jax.device_put(batch, b_sh))
        out.append((float(metrics["loss"]), float(metrics["on_policy"])))
    return out

  one = trajectory(partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1]), "data")
  many = trajectory(partitioning.make_mesh(*shape), rules)
  np.testing.assert_allclose(np.array(many), np.array(one), rtol=2e-4, atol=1e-6)
