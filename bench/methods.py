"""What the methods cost per train step: routed and mixed teachers, OPD, a cross-tokenizer teacher.

    python bench/methods.py [--batch 16] [--input_len 32] [--target_len 32] [--width 128]
        [--layers 2] [--vocab 512] [--repeats 3] [--allow_load]

Decoder-only student (width W) and teachers (width 2W), the same vocabulary,
random weights, dataset targets (λ = 0) unless the row says on-policy. Each
row is the median wall time of the jitted step (after compilation), and its
ratio to the "one teacher" row of its group:

  teachers: one teacher; two routed teachers with every row routed to the
    first (the second is skipped by `lax.cond`); two routed teachers, half the
    rows each (both run on the whole batch: shapes are static); a two-teacher
    mixture (both always run).
  on-policy (λ = 1): GKD with full-vocabulary reverse KL vs OPD (sampled tokens).
  cross-tokenizer: the word-vocabulary student with a byte-vocabulary teacher
    (aligned spans), and the share of its step spent in the host alignment
    (`Aligner.__call__` on the same batch, timed alone: what the
    `jax.pure_callback` runs once per step).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import seqio

from gkd import startup  # noqa: E402
import loadguard  # bench/loadguard.py: refuses a loaded machine

from gkd import losses, partitioning
from gkd.models import DecoderConfig, build_model
from gkd.tasks import alignment, vocabularies
from gkd.train import Method, TrainState, make_train_step
from gkd.train.teachers import Combination


def model(width: int, layers: int, vocab: int, eos: int = 1):
  return build_model(DecoderConfig(vocab_size=vocab, embed_dim=width, mlp_dim=4 * width,
                                   num_layers=layers, num_heads=4, num_kv_heads=2,
                                   head_dim=width // 4, eos_id=eos, bos_id=2, dtype="float32"))


def batch_of(b: int, i: int, o: int, vocab: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"input_tokens": jnp.asarray(rng.integers(3, vocab, (b, i)), jnp.int32),
          "input_mask": jnp.ones((b, i), jnp.int32),
          "target_tokens": jnp.asarray(rng.integers(3, vocab, (b, o)), jnp.int32),
          "target_mask": jnp.ones((b, o), jnp.int32)}


def init(m, batch, seed):
  return partitioning.strip_boxes(m.init(jax.random.PRNGKey(seed), batch))


def median_time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile + warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def step_time(student, params, teachers, teacher_params, batch, method, repeats, **kw) -> float:
  tx = optax.sgd(1e-3)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(0))
  step = jax.jit(make_train_step(student, teachers, tx, method, **kw))
  return median_time(lambda: step(state, teacher_params, batch), repeats)


def row(group: str, name: str, seconds: float, base: float, note: str = "") -> None:
  print(f"| {group} | {name} | {seconds * 1e3:.1f} | {seconds / base:.2f} | {note} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--input_len", type=int, default=32)
  parser.add_argument("--target_len", type=int, default=32)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--vocab", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=3)
  loadguard.add_flags(parser)
  args = parser.parse_args()
  loadguard.check(args)
  startup.xla_defaults()  # the XLA options gkd.main runs with

  b, i, o, w, n, v = (args.batch, args.input_len, args.target_len, args.width, args.layers,
                      args.vocab)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; batch={b} input={i} "
        f"target={o} student width={w} teachers width={2 * w} layers={n} vocab={v}")
  print("| group | step | time (ms) | ratio | note |")
  print("|---|---|---|---|---|")
  batch = batch_of(b, i, o, v)
  student, t1, t2 = model(w, n, v), model(2 * w, n, v), model(2 * w, n, v)
  params, p1, p2 = init(student, batch, 0), init(t1, batch, 1), init(t2, batch, 2)
  gkd = Method(divergence=losses.Divergence("reverse_kl"))
  run = lambda teachers, tp, bt, method=gkd, **kw: step_time(
      student, params, teachers, tp, bt, method, args.repeats, **kw)

  one = run(t1, p1, batch)
  row("teachers", "one teacher", one, one)
  route = lambda r: dict(batch, teacher_route=jnp.asarray(r, jnp.int32))
  row("teachers", "two routed, all rows to one", run((t1, t2), (p1, p2), route(np.zeros(b))),
      one, "the other skipped (lax.cond)")
  row("teachers", "two routed, half each", run((t1, t2), (p1, p2), route(np.arange(b) % 2)),
      one, "both run on the whole batch")
  row("teachers", "two mixed", run((t1, t2), (p1, p2), batch,
                                   combination=Combination("mixture", (0.5, 0.5))), one)

  rkl = run(t1, p1, batch, Method(divergence=losses.Divergence("reverse_kl"), lmbda=1.0))
  row("on-policy", "gkd reverse_kl", rkl, rkl)
  row("on-policy", "opd", run(t1, p1, batch, Method(objective="opd", lmbda=1.0)), rkl)

  word, byte = vocabularies.get_vocabulary("word"), seqio.ByteVocabulary()
  wb = batch_of(b, i, o, word.vocab_size, seed=1)
  aligner = alignment.Aligner(word, byte, input_length=4 * i, target_length=4 * o)
  ws = model(w, n, word.vocab_size + 2)
  bt = model(2 * w, n, byte.vocab_size)
  a = aligner(*(np.asarray(wb[k]) for k in ("input_tokens", "input_mask", "target_tokens",
                                              "target_mask")))
  wp, bp = init(ws, wb, 0), init(bt, {k: jnp.asarray(x) for k, x in a.teacher_batch().items()}, 1)
  same = step_time(ws, wp, model(2 * w, n, word.vocab_size + 2),
                   init(model(2 * w, n, word.vocab_size + 2), wb, 1), wb, gkd, args.repeats)
  row("cross-tokenizer", "same-tokenizer teacher", same, same, "word vocabulary, reverse_kl")
  cross = step_time(ws, wp, bt, bp, wb, Method(cross_tokenizer=losses.CrossTokenizerLoss()),
                    args.repeats, aligner=aligner)
  host = median_time(lambda: aligner(*(np.asarray(wb[k]) for k in (
      "input_tokens", "input_mask", "target_tokens", "target_mask"))), args.repeats)
  row("cross-tokenizer", "byte teacher, aligned spans", cross, same,
      f"host alignment {host * 1e3:.1f} ms = {100 * host / cross:.0f}% of the step")


if __name__ == "__main__":
  main()
