"""The methods inside the compiled step: OPD, several teachers, audits, a cross-tokenizer teacher.

Each compared to an independent recomputation outside the step, on tiny decoders.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import seqio

from gkd import losses, partitioning, sampling
from gkd.errors import UserError
from gkd.models import DecoderConfig, build_model
from gkd.tasks import alignment, vocabularies
from gkd.train import Method, SampledKL, TrainState, make_train_step
from gkd.train.teachers import Combination

VOCAB, EOS, LR = 48, 1, 0.1


def _model(width, vocab=VOCAB, eos=EOS):
  return build_model(DecoderConfig(vocab_size=vocab, embed_dim=width, mlp_dim=2 * width,
                                   num_layers=1, num_heads=2, num_kv_heads=1,
                                   head_dim=width // 2, eos_id=eos, bos_id=2, dtype="float32"))


def _batch(seed=0, b=6, i=5, o=4, vocab=VOCAB):
  rng = np.random.default_rng(seed)
  input_mask = (np.arange(i)[None] >= rng.integers(0, i - 1, (b, 1))).astype(np.int32)
  target_mask = (np.arange(o)[None] < rng.integers(1, o + 1, (b, 1))).astype(np.int32)
  return {"input_tokens": jnp.asarray(rng.integers(3, vocab, (b, i)) * input_mask, jnp.int32),
          "input_mask": jnp.asarray(input_mask),
          "target_tokens": jnp.asarray(rng.integers(3, vocab, (b, o)) * target_mask, jnp.int32),
          "target_mask": jnp.asarray(target_mask)}


def _params(model, batch, seed):
  return partitioning.strip_boxes(jax.jit(model.init)(jax.random.PRNGKey(seed), batch))


def _logits(model, params, batch):
  return jax.jit(model.logits)(params, batch)


@pytest.fixture(scope="module")
def models():
  """A student, two different teachers, their params and a batch."""
  batch = _batch()
  student, t1, t2 = _model(16), _model(24), _model(32)
  return dict(student=student, teachers=(t1, t2), batch=batch,
              params=_params(student, batch, 0),
              teacher_params=(_params(t1, batch, 1), _params(t2, batch, 2)))


def _state(params, tx):
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.PRNGKey(7))


_STEPS = {}


def _run(m, method, teachers=None, teacher_params=None, batch=None, steps=1, **kw):
  """(states after each step, metrics of each step) of a jitted step with SGD."""
  tx = optax.sgd(LR)
  teachers = m["teachers"][0] if teachers is None else teachers
  teacher_params = m["teacher_params"][0] if teacher_params is None else teacher_params
  key = (repr(method), id(m["student"]), id(teachers), repr(sorted(kw.items())))
  if key not in _STEPS:  # one compile per (method, teachers, options) in this module
    _STEPS[key] = jax.jit(make_train_step(m["student"], teachers, tx, method, **kw))
  step = _STEPS[key]
  state, out = _state(m["params"], tx), []
  for _ in range(steps):
    state, metrics = step(state, teacher_params, batch if batch is not None else m["batch"])
    out.append((state, metrics))
  return out


def _samples(m, method, step=0, params=None):
  """The step's on-policy samples, redrawn with the key the step derives."""
  key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(7), step))[1]
  config = dataclasses.replace(method.sampler, max_new_tokens=m["batch"]["target_tokens"].shape[1],
                               return_logprobs=True)
  s = sampling.sample(m["student"], m["params"] if params is None else params, m["batch"], key,
                      config)
  return sampling.with_targets(m["batch"], s), s


def _logq(logits, tokens):
  return jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]


def _seq_mean(values, mask):
  mask = np.asarray(mask, np.float32)
  count = mask.sum(-1)
  per = (np.asarray(values) * mask).sum(-1) / np.maximum(count, 1)
  return per[count > 0].mean()


# ----------------------------------------------------------------------------- OPD


@pytest.mark.parametrize("estimator,temperature", [("reinforce", 1.0), ("importance", 2.0)])
def test_opd_step_gradient_is_the_hand_computed_policy_gradient(models, estimator, temperature):
  m = models
  method = Method(objective="opd", lmbda=1.0, sampler=sampling.SampleConfig(
      temperature=temperature), sampled_kl=SampledKL(estimator=estimator))
  ((new, metrics),) = _run(m, method)
  batch, samples = _samples(m, method)
  tokens, mask = batch["target_tokens"], batch["target_mask"]
  logp = _logq(_logits(m["teachers"][0], m["teacher_params"][0], batch), tokens)

  def reference(params):  # −Σ_t w_t·A_t·log q(y_t), A_t = log p − log q, per-sequence mean
    logq = _logq(m["student"].logits(params, batch), tokens)
    w = jnp.ones_like(logq)
    if estimator == "importance":
      w = jnp.exp(jax.lax.stop_gradient(logq) - samples.logprobs)
    ratio = jax.lax.stop_gradient(logq) - logp
    masked = lambda v: jnp.where(mask > 0, v, 0.0)
    per = jnp.sum(masked(w * ratio * logq), -1) / jnp.maximum(jnp.sum(mask, -1), 1)
    value = jnp.sum(masked(w * ratio), -1) / jnp.maximum(jnp.sum(mask, -1), 1)
    has = jnp.sum(mask, -1) > 0
    return jnp.sum(per * has) / jnp.sum(has), jnp.sum(value * has) / jnp.sum(has)

  (_, value), grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(m["params"])
  np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5, atol=1e-6)
  want = jax.tree.map(lambda p, g: p - LR * g, m["params"], grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               new.params, want)
  assert metrics["on_policy"] == 1.0


def test_opd_joins_the_rl_mixing(models):
  reward_fn = lambda t, mask, b: np.arange(t.shape[0], dtype=np.float32)
  plain = Method(objective="opd", lmbda=1.0)
  mixed = dataclasses.replace(plain, rl_alpha=0.25)
  ((_, a),) = _run(models, plain)
  ((_, b),) = _run(models, mixed, reward_fn=reward_fn)
  np.testing.assert_allclose(b["distill_loss"], a["distill_loss"], rtol=1e-6)
  np.testing.assert_allclose(b["loss"], 0.25 * b["distill_loss"] + 0.75 * b["rl_loss"],
                             rtol=1e-5)
  assert abs(float(b["rl_loss"])) > 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(objective="opd", lmbda=0.5), "lmbda = 1.0"),
    (dict(objective="opd", lmbda=1.0, seq_kd=True), "seq_kd"),
    (dict(audit_every=-1), "audit_every"),
    (dict(audit_min_kept_mass=2.0), "audit_min_kept_mass"),
    (dict(objective="sft", cross_tokenizer=losses.CrossTokenizerLoss()),
     "objectives 'gkd' and 'opd', not 'sft'"),
])
def test_method_validation(kwargs, message):
  with pytest.raises(UserError, match=message):
    Method(**kwargs)
  with pytest.raises(UserError, match="estimator"):
    SampledKL(estimator="vtrace")


# ------------------------------------------------------------------------ teachers


def _per_token(m, batch, k, divergence):
  student = _logits(m["student"], m["params"], batch)
  teacher = _logits(m["teachers"][k], m["teacher_params"][k], batch)
  return np.asarray(divergence.per_token(student, teacher))


def test_routed_step_is_the_per_example_selection_of_single_teacher_losses(models):
  m, method = models, Method(divergence=losses.Divergence("reverse_kl"))
  route = np.array([0, 1, 1, 0, 1, 0], np.int32)
  batch = dict(m["batch"], teacher_route=jnp.asarray(route))
  ((_, routed),) = _run(m, method, m["teachers"], m["teacher_params"], batch,
                        combination=Combination("route"))
  values = np.where(route[:, None] == 0, _per_token(m, batch, 0, method.divergence),
                    _per_token(m, batch, 1, method.divergence))
  np.testing.assert_allclose(routed["loss"], _seq_mean(values, batch["target_mask"]), rtol=1e-5)
  # Every row routed to teacher 0 (teacher 1 skipped): the single-teacher step.
  only = dict(m["batch"], teacher_route=jnp.zeros(6, jnp.int32))
  ((_, first),) = _run(m, method, m["teachers"], m["teacher_params"], only)
  ((_, single),) = _run(m, method)
  np.testing.assert_allclose(first["loss"], single["loss"], rtol=1e-5)


def test_mixture_step_is_the_loss_against_the_mixed_distribution(models):
  m, method = models, Method(divergence=losses.Divergence("forward_kl"))
  ((_, mixed),) = _run(m, method, m["teachers"], m["teacher_params"],
                       combination=Combination("mixture", (0.25, 0.75)))
  batch = m["batch"]
  p = [jax.nn.softmax(_logits(t, tp, batch)) for t, tp in zip(m["teachers"], m["teacher_params"])]
  logp = np.log(0.25 * np.asarray(p[0]) + 0.75 * np.asarray(p[1]))
  logq = np.asarray(jax.nn.log_softmax(_logits(m["student"], m["params"], batch)))
  values = np.sum(np.exp(logp) * (logp - logq), -1)
  np.testing.assert_allclose(mixed["loss"], _seq_mean(values, batch["target_mask"]), rtol=1e-5)


def test_teachers_with_another_vocabulary_or_no_teacher_are_clear_errors(models):
  m = models
  with pytest.raises(UserError, match="vocabularies differ"):
    make_train_step(m["student"], (m["teachers"][0], _model(16, vocab=40)), optax.sgd(LR),
                    Method())
  with pytest.raises(UserError, match="needs a teacher"):
    make_train_step(m["student"], (), optax.sgd(LR), Method(objective="opd", lmbda=1.0))


# -------------------------------------------------------------------------- audits


def test_top_k_audit_is_the_exact_divergence_and_the_kept_mass(models):
  m = models
  divergence = losses.Divergence("reverse_kl", teacher_top_k=4, temperature=2.0)
  method = Method(divergence=divergence, audit_every=2)
  (s0, first), (_, second) = _run(m, method, steps=2)
  batch, mask = m["batch"], np.asarray(m["batch"]["target_mask"])
  exact = _per_token(m, batch, 0, dataclasses.replace(divergence, teacher_top_k=None))
  assert first["audit"] == 1.0 and second["audit"] == 0.0
  np.testing.assert_allclose(first["audit_exact_divergence"], _seq_mean(exact, mask), rtol=1e-5)
  p = np.asarray(jax.nn.softmax(_logits(m["teachers"][0], m["teacher_params"][0], batch) / 2.0))
  kept = np.sort(p, -1)[..., -4:].sum(-1)
  np.testing.assert_allclose(first["audit_kept_mass"], (kept * mask).sum() / mask.sum(),
                             rtol=1e-5)
  assert 0 < first["audit_kept_mass"] < 1
  assert first["audit_exact_divergence"] >= first["distill_loss"] - 1e-6  # data processing
  assert second["audit_exact_divergence"] == 0.0


def test_opd_audit_is_the_exact_reverse_kl_on_its_samples(models):
  m = models
  method = Method(objective="opd", lmbda=1.0, audit_every=1)
  ((_, metrics),) = _run(m, method)
  batch, _ = _samples(m, method)
  exact = _per_token(m, batch, 0, losses.Divergence("reverse_kl"))
  np.testing.assert_allclose(metrics["audit_exact_divergence"],
                             _seq_mean(exact, batch["target_mask"]), rtol=1e-5)
  assert "audit_kept_mass" not in metrics
  ((_, plain),) = _run(m, Method(objective="opd", lmbda=1.0))
  assert "audit" not in plain


# ------------------------------------------------------------------ cross-tokenizer


@pytest.fixture(scope="module")
def cross():
  """A word-vocabulary student and a byte-vocabulary teacher (two tokenizers)."""
  student_vocab, teacher_vocab = vocabularies.get_vocabulary("word"), seqio.ByteVocabulary()
  aligner = alignment.Aligner(student_vocab, teacher_vocab, input_length=40, target_length=32)
  batch = _batch(seed=3, b=4, i=5, o=5, vocab=student_vocab.vocab_size)
  student = _model(16, vocab=student_vocab.vocab_size + 2, eos=student_vocab.eos_id)
  teacher = _model(16, vocab=teacher_vocab.vocab_size, eos=teacher_vocab.eos_id)
  a = aligner(batch["input_tokens"], batch["input_mask"], batch["target_tokens"],
              batch["target_mask"])
  teacher_batch = {k: jnp.asarray(v) for k, v in a.teacher_batch().items()}
  return dict(student=student, teachers=(teacher,), batch=batch, aligner=aligner, alignment=a,
              params=_params(student, batch, 0),
              teacher_params=(_params(teacher, teacher_batch, 1),))


@pytest.mark.parametrize("mode", ["uld", "spans"])
def test_cross_tokenizer_step_is_the_loss_applied_by_hand(cross, mode):
  m, loss = cross, losses.CrossTokenizerLoss(mode=mode)
  method = Method(cross_tokenizer=loss)
  ((new, metrics),) = _run(m, method, aligner=m["aligner"])
  a, batch = m["alignment"], m["batch"]
  assert a.span_mask.sum() > 0
  teacher_logits = _logits(m["teachers"][0], m["teacher_params"][0],
                           {k: jnp.asarray(v) for k, v in a.teacher_batch().items()})
  a = alignment.Alignment(*(jnp.asarray(x) for x in a))
  value, grads = jax.jit(jax.value_and_grad(lambda p: loss(
      m["student"].logits(p, batch), teacher_logits, batch["target_tokens"],
      batch["target_mask"], a)))(m["params"])
  np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5, atol=1e-7)
  want = jax.tree.map(lambda p, g: p - LR * g, m["params"], grads)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
               new.params, want)
  assert "teacher_agreement" not in metrics


def test_cross_tokenizer_on_policy_step_runs(cross):
  method = Method(cross_tokenizer=losses.CrossTokenizerLoss(mode="spans"), lmbda=1.0)
  ((_, metrics),) = _run(cross, method, aligner=cross["aligner"])
  assert metrics["finite"] == 1.0 and metrics["on_policy"] == 1.0
  with pytest.raises(UserError, match="exactly one teacher"):
    make_train_step(cross["student"], cross["teachers"][0], optax.sgd(LR), method)
