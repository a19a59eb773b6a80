"""The whole step's memory and time, fused vs plain loss path, as vocabulary and length grow.

    /work/heavy python -W ignore bench/scaling.py                       # issue 15's table
    /work/heavy python -W ignore bench/scaling.py --shape tiny --vocab 4096 --batch 2 \\
        --new_tokens 16 --vocabs 1024,4096 --lengths 8,16 --reps 1 --allow_load  # smoke

Each row is our λ = 0 GKD step (teacher forward, student forward + backward,
JSD(β = 0.5), AdamW) on the small shape, float32, prompt 32, with
`Method.loss_path` 'fused' (the heads applied a chunk of tokens at a time
inside the loss, `gkd/losses/fused.py`, default chunk budget) or 'plain' (full
`[B, N, V]` logits). Rows:
  headline     V = 152,064, B·N = 8 × 512 = 4,096 target tokens, both paths;
  vocab        the vocabulary swept (--vocabs) at the headline B, N;
  new_tokens   the length swept (--lengths) at the headline B, V;
  new_tokens_blockwise_<remat>
               fused, the same sweep with blockwise attention in student and
               teacher (`DecoderConfig.attention`), per --blockwise remat policy;
  microbatches fused, the batch in --microbatches parts (gradient accumulation);
  remat        fused, the student's blocks under each --remats policy.
Columns:
  step temp MiB  XLA's temporary allocation of the whole compiled step
                 (`compiled.memory_analysis().temp_size_in_bytes`): the peak
                 of everything the step allocates beyond its arguments/outputs;
  temp / plain   against the plain path at the same sizes (issue target ≤ ¼);
  temp / first   against the sweep's first row (issue target: flat, ±15%);
  step s         median of --reps timed steps after a warm-up (rows in --time
                 only; '-' elsewhere); time / plain likewise (target ≤ 1.1×).
Compiling needs no memory for the arrays, but timing the plain path at the
headline size needs more than 24 GB (each [4096, 152064] float32 array is
2.5 GB, and its JSD step holds about nine): on a smaller machine record the
memory table with --time "" and the times at a vocabulary the plain path fits,
e.g. --vocab 32000 --vocabs "" --lengths "" --time headline,microbatches,remat.
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
from gkd import startup  # noqa: E402
import loadguard  # noqa: E402  (bench/loadguard.py: refuses a loaded machine)

MIB = 2 ** 20


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", default="small", choices=sorted(common.SHAPES))
  p.add_argument("--vocab", type=int, default=152064, help="the headline vocabulary")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--new_tokens", type=int, default=512, help="the headline length")
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--vocabs", default="32000,64000,152064", help="vocabulary sweep ('' skips)")
  p.add_argument("--lengths", default="128,256,512,1024", help="length sweep ('' skips)")
  p.add_argument("--microbatches", default="1,4", help="fused rows with these ('' skips)")
  p.add_argument("--remats", default="none,full,dots", help="fused rows with these ('' skips)")
  p.add_argument("--blockwise", default="none,full",
                 help="the length sweep again with blockwise attention (student and teacher), "
                      "once per student remat policy listed ('' skips)")
  p.add_argument("--time", default="headline",
                 help="comma-separated row kinds whose steps are also timed ('' for none)")
  p.add_argument("--chunk_elements", type=int, default=None,
                 help="the fused path's token × vocab budget per chunk (default: "
                      "gkd.losses.fused.DEFAULT_CHUNK_ELEMENTS)")
  p.add_argument("--reps", type=int, default=3)
  loadguard.add_flags(p)
  args = p.parse_args(argv)
  args.beta, args.temperature, args.lr = 0.5, 1.0, 1e-5
  return args


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def measure(args, path: str, timed: bool, **method) -> tuple[float, float]:
  """(step temp bytes, median step seconds or NaN) for one configuration."""
  (student, params), (teacher, teacher_params) = common.init_models(args)
  chunking = {} if args.chunk_elements is None else dict(chunk_elements=args.chunk_elements)
  step, state, batch = common.gkd_step(args, student, params, teacher, teacher_params, 0.0,
                                       chunking=chunking, loss_path=path, **method)
  compiled = step.lower(state, teacher_params, batch).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  if not timed:
    return temp, float("nan")
  holder, times = [jax.tree.map(jnp.copy, state)], []  # the step donates its state
  for _ in range(args.reps + 1):
    start = time.perf_counter()
    holder[0], metrics = compiled(holder[0], teacher_params, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return temp, statistics.median(times[1:])  # the first is the warm-up


def rows(args):
  """(kind, vocab, new_tokens, path, microbatches, remat, attention) of every row, in order."""
  out = [("headline", args.vocab, args.new_tokens, p, 1, "none", "dense")
         for p in ("fused", "plain")]
  out += [("vocab", v, args.new_tokens, p, 1, "none", "dense") for v in _ints(args.vocabs)
          for p in ("fused", "plain")]
  out += [("new_tokens", args.vocab, n, p, 1, "none", "dense") for n in _ints(args.lengths)
          for p in ("fused", "plain")]
  out += [(f"new_tokens_blockwise_{r}", args.vocab, n, "fused", 1, r, "blockwise")
          for r in args.blockwise.split(",") if r for n in _ints(args.lengths)]
  out += [("microbatches", args.vocab, args.new_tokens, "fused", m, "none", "dense")
          for m in _ints(args.microbatches)]
  out += [("remat", args.vocab, args.new_tokens, "fused", 1, r, "dense")
          for r in args.remats.split(",") if r]
  return out


def main(argv=None) -> None:
  args = parse_args(argv)
  loadguard.check(args)
  startup.xla_defaults()  # the XLA options gkd.main runs with
  timed_kinds = set(x for x in args.time.split(",") if x)
  print(f"shape {args.shape}: student {common.SHAPES[args.shape][0]}, teacher "
        f"{common.SHAPES[args.shape][1]}; λ=0 step, JSD(0.5), AdamW, float32, prompt "
        f"{args.prompt_len}, batch {args.batch}; headline vocab {args.vocab}, "
        f"{args.new_tokens} new tokens; jax {jax.__version__}, {os.cpu_count()} CPUs")
  print("| kind | batch | new tokens | vocab | path | microbatches | remat | attention | "
        "step temp MiB | temp / plain | temp / first | step s | time / plain |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  done, first = {}, {}

  def get(key, sized, timed):
    """A configuration's (temp, seconds), measured once (again if now timed)."""
    if key not in done or (timed and done[key][1] != done[key][1]):
      done[key] = measure(sized, key[2], timed, microbatches=key[3])
    return done[key]

  for kind, vocab, n, path, micro, remat, attention in rows(args):
    sized = argparse.Namespace(**{**vars(args), "vocab": vocab, "new_tokens": n,
                                  "remat": remat, "attention": attention})
    timed = kind in timed_kinds
    temp, seconds = get((vocab, n, path, micro, remat, attention), sized, timed)
    plain_temp, plain_s = get((vocab, n, "plain", 1, "none", "dense"), argparse.Namespace(
        **{**vars(sized), "remat": "none", "attention": "dense"}), timed)
    first.setdefault((kind, path), temp)
    fmt = lambda x, f: "-" if x != x else f.format(x)  # NaN: not timed
    print(f"| {kind} | {args.batch} | {n} | {vocab} | {path} | {micro} | {remat} | {attention} | "
          f"{temp / MIB:.0f} | {temp / max(plain_temp, 1):.3f} | "
          f"{temp / max(first[kind, path], 1):.3f} | {fmt(seconds, '{:.3f}')} | "
          f"{fmt(seconds / plain_s, '{:.2f}')} |", flush=True)


if __name__ == "__main__":
  main()
