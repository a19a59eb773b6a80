"""Plain vs chunked divergence: time and peak extra memory, value and gradient.

    python bench/losses.py [--tokens 2048] [--vocab 152064] [--chunk 256]

Peak extra memory is XLA's temporary allocation for the compiled
value-and-gradient program (inputs and outputs excluded), read from
`compiled.memory_analysis()`; time is the median of repeated calls after
warm-up, plain and chunked alternating. Target: chunked peak extra memory
≤ 1/4 of plain, time ≤ 1.5× plain.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from gkd import startup  # noqa: E402
import loadguard  # bench/loadguard.py: refuses a loaded machine

from gkd import losses


def compile_value_and_grad(name, chunk, student, teacher, params):
  def loss(s, t):
    return jnp.mean(losses.per_token(name, s, t, chunk_size=chunk, **params))
  return jax.jit(jax.value_and_grad(loss)).lower(student, teacher).compile()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--vocab", type=int, default=152064)
  parser.add_argument("--chunk", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--names", default="forward_kl,jsd")
  loadguard.add_flags(parser)
  args = parser.parse_args()
  loadguard.check(args)
  startup.xla_defaults()  # the XLA options gkd.main runs with

  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  student = jax.random.normal(k1, (args.tokens, args.vocab), jnp.float32)
  teacher = jax.random.normal(k2, (args.tokens, args.vocab), jnp.float32) * 2
  one_array = args.tokens * args.vocab * 4
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; tokens={args.tokens} "
        f"vocab={args.vocab} chunk={args.chunk}; one f32 [tokens, vocab] = "
        f"{one_array / 2**20:.0f} MiB")
  print(f"| divergence | path | time (s) | peak extra (MiB) | time ratio | memory ratio |")
  print(f"|---|---|---|---|---|---|")
  for name in args.names.split(","):
    params = {"beta": 0.5} if name == "jsd" else {}
    programs = {path: compile_value_and_grad(name, chunk, student, teacher, params)
                for path, chunk in (("plain", None), ("chunked", args.chunk))}
    times = {path: [] for path in programs}
    for path, program in programs.items():  # warm-up
      jax.block_until_ready(program(student, teacher))
    for _ in range(args.repeats):
      for path, program in programs.items():
        start = time.perf_counter()
        jax.block_until_ready(program(student, teacher))
        times[path].append(time.perf_counter() - start)
    temp = {p: prog.memory_analysis().temp_size_in_bytes for p, prog in programs.items()}
    t = {p: statistics.median(v) for p, v in times.items()}
    for path in programs:
      print(f"| {name} | {path} | {t[path]:.3f} | {temp[path] / 2**20:.0f} | "
            f"{t[path] / t['plain']:.2f} | {temp[path] / max(temp['plain'], 1):.3f} |")


if __name__ == "__main__":
  main()
