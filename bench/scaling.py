"""Step time and memory as sequence length, vocabulary and batch grow; plain vs chunked JSD.

    /work/heavy python bench/scaling.py
    /work/heavy python bench/scaling.py --shape tiny --lengths 8 --vocabs 512 --batches 2 --reps 1

Each row is our λ=0 GKD step (teacher forward, student forward+backward,
JSD(β=0.5), AdamW) at one size, with the divergence plain, chunked by tokens
(`Divergence(chunk_size=--chunk)`: a fixed number of tokens at a time) or
chunked by budget (`Divergence(chunk_elements=--chunk_elements)`: a fixed
number of token × vocab elements, i.e. chunk_elements // V tokens at a time).
Columns:
  step s        median of --reps calls after warm-up, plain and chunked alternating;
  step temp     XLA's temporary allocation for the whole compiled step
                (`compiled.memory_analysis().temp_size_in_bytes`);
  JSD temp      the same for the divergence's value-and-gradient alone on
                [batch × new tokens, vocab] logits (bench/losses.py's program);
  peak RSS      this process's peak resident memory while compiling and running
                that row (VmHWM, reset before each row through /proc/self/clear_refs).
The step's own logits ([B, N, V] for student, its gradient and teacher) grow
with V on both paths; what chunking removes is the divergence's O(B·N·V)
intermediates: "JSD temp" is flat in tokens on both chunked paths, grows like
V with a fixed token chunk, and is flat in V with the element budget.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gkd_vs_trl as common  # noqa: E402  (shared shapes, models and step)
import loadguard  # noqa: E402  (bench/loadguard.py: refuses a loaded machine)
import losses as losses_bench  # noqa: E402  (bench/losses.py)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", default="small", choices=sorted(common.SHAPES))
  p.add_argument("--vocab", type=int, default=32000, help="vocabulary when not swept")
  p.add_argument("--batch", type=int, default=8, help="batch when not swept")
  p.add_argument("--new_tokens", type=int, default=32, help="length when not swept")
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--lengths", default="32,128", help="new_tokens values swept")
  p.add_argument("--vocabs", default="8000,32000,128000")
  p.add_argument("--batches", default="4,16")
  p.add_argument("--chunk", type=int, default=64, help="divergence chunk (tokens)")
  p.add_argument("--chunk_elements", type=int, default=64 * 32000,
                 help="divergence chunk budget (token × vocab elements)")
  p.add_argument("--reps", type=int, default=3)
  loadguard.add_flags(p)
  args = p.parse_args(argv)
  args.beta, args.temperature, args.lr = 0.5, 1.0, 1e-5
  return args


def reset_peak_rss() -> None:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM to the current RSS
  except OSError:
    pass


def jsd_temp_bytes(tokens: int, vocab: int, chunk: int | None) -> int:
  s = jax.ShapeDtypeStruct((tokens, vocab), jnp.float32)
  compiled = losses_bench.compile_value_and_grad("jsd", chunk, s, s, {"beta": 0.5})
  return compiled.memory_analysis().temp_size_in_bytes


def measure(args) -> dict:
  """{path: (median s, step temp bytes, JSD temp bytes, peak RSS MiB)} at args' sizes."""
  reset_peak_rss()
  (student, params), (teacher, teacher_params) = common.init_models(args)
  runs, out = {}, {}
  paths = (("plain", None, {}), ("chunked", args.chunk, dict(chunk_size=args.chunk)),
           ("budget", max(1, args.chunk_elements // args.vocab),
            dict(chunk_elements=args.chunk_elements)))
  for path, chunk, chunking in paths:
    step, state, batch = common.gkd_step(args, student, params, teacher, teacher_params, 0.0,
                                         chunking=chunking)
    # The step donates its state: each path gets its own copy of the parameters.
    state = jax.tree.map(jnp.copy, state)
    compiled = step.lower(state, teacher_params, batch).compile()
    holder = [state]

    def run(compiled=compiled, holder=holder, batch=batch):
      start = time.perf_counter()
      holder[0], metrics = compiled(holder[0], teacher_params, batch)
      jax.block_until_ready(metrics)
      return time.perf_counter() - start
    run()  # warm-up
    runs[path] = (run, [], compiled.memory_analysis().temp_size_in_bytes,
                  jsd_temp_bytes(args.batch * args.new_tokens, args.vocab, chunk))
  for _ in range(args.reps):
    for path, (run, times, _, _) in runs.items():
      times.append(run())
  rss = common.peak_rss_mib()
  for path, (_, times, temp, jsd) in runs.items():
    out[path] = (statistics.median(times), temp, jsd, rss)
  return out


def main(argv=None) -> None:
  args = parse_args(argv)
  loadguard.check(args)
  base = dict(vocab=args.vocab, batch=args.batch, new_tokens=args.new_tokens)
  sweeps = [("new_tokens", int(x)) for x in args.lengths.split(",") if x]
  sweeps += [("vocab", int(x)) for x in args.vocabs.split(",") if x]
  sweeps += [("batch", int(x)) for x in args.batches.split(",") if x]
  print(f"shape {args.shape}: student {common.SHAPES[args.shape][0]}, teacher "
        f"{common.SHAPES[args.shape][1]}; λ=0 step, float32, prompt {args.prompt_len}, base "
        f"{base}; chunk {args.chunk} tokens / budget {args.chunk_elements} elements; "
        f"jax {jax.__version__}, {os.cpu_count()} CPUs; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  print("| swept | batch | new tokens | vocab | path | step s | step temp MiB | JSD temp MiB | "
        "row peak RSS MiB | time / plain | JSD temp / plain |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  mib = 2 ** 20
  for name, value in sweeps:
    for key, v in base.items():
      setattr(args, key, v)
    setattr(args, name, value)
    result = measure(args)
    for path, (t, temp, jsd, rss) in result.items():
      ratio_t = t / result["plain"][0]
      ratio_m = jsd / max(result["plain"][2], 1)
      print(f"| {name} | {args.batch} | {args.new_tokens} | {args.vocab} | {path} | {t:.3f} | "
            f"{temp / mib:.0f} | {jsd / mib:.3f} | {rss:.0f} | {ratio_t:.2f} | {ratio_m:.3f} |",
            flush=True)
  print(f"load average after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  main()
