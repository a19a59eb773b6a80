"""The GKD step against the machine's limit: counted FLOPs / step time vs measured matmul rate.

    /work/heavy python bench/roofline.py                     # λ=0 and λ=1, medium shape
    /work/heavy python bench/roofline.py --shape small --lmbdas 0

FLOPs are counted from the shapes (a matmul [m, k] @ [k, n] is 2·m·k·n):
  teacher forward        2·P_t·B·L + 2·E_t·V·B·N + attention
  student fwd + bwd      3 × (2·P_s·B·L + 2·E_s·V·B·N + attention)
  sampling (λ=1)         prefill 2·P_s·B·(I−1), then per new token 2·(P_s + E_s·V)·B + attention
where P = the transformer body's matmul parameters (embedding lookups cost no
FLOPs), L = I + N − 1 columns, N = new tokens, and attention is 4·L·S·H·D per
layer and row (scores and values over all S key columns, as XLA computes
them). The divergence and optimizer (O(B·N·V) and O(params)) are left out
of the count; XLA's own count (`compiled.cost_analysis()`, which counts a
while-loop body once, so λ=0 only) is printed beside ours.

The machine's rate is a jitted float32 `jnp.dot` of two [--matmul, --matmul]
matrices, timed alternately with the step (best of the repetitions, for both).

On a GPU (`jax.default_backend() == 'gpu'`) the script instead measures a
0.5B-class shape (Qwen2-0.5B sizes) in bfloat16: MFU of the λ=0 step
against the measured bf16 matmul rate, and decoding bandwidth (parameter and
KV-cache bytes read per new token / time) against the device-to-device copy
rate.
"""

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gkd_vs_trl as common  # noqa: E402  (shared shapes, models and step)
from gkd import startup  # noqa: E402
import loadguard  # noqa: E402  (bench/loadguard.py: refuses a loaded machine)

# Qwen2-0.5B-like (layers, width, heads, kv heads, mlp) for the GPU path; teacher 1.5B-like.
GPU_SHAPES = ((24, 896, 14, 2, 4864), (28, 1536, 12, 2, 8960))


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", default="medium", choices=sorted(common.SHAPES))
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--lmbdas", default="0,1")
  p.add_argument("--matmul", type=int, default=2048, help="side of the square matmul")
  p.add_argument("--reps", type=int, default=5)
  loadguard.add_flags(p)
  args = p.parse_args(argv)
  args.beta, args.temperature, args.lr = 0.5, 1.0, 1e-5
  return args


def body_params(shape: tuple) -> int:
  """Matmul parameters of the transformer body (attention + gated MLP), all layers."""
  layers, width, heads, kv_heads, mlp = shape
  head = width // heads
  return layers * (2 * width * heads * head + 2 * width * kv_heads * head + 3 * width * mlp)


def forward_flops(shape: tuple, vocab: int, b: int, length: int, logit_rows: int) -> float:
  """One teacher-forced forward over `length` columns, logits for `logit_rows` of them."""
  layers, width, heads, _, _ = shape
  attention = 4 * length * length * heads * (width // heads) * layers
  return b * (2 * body_params(shape) * length + 2 * width * vocab * logit_rows + attention)


def sampling_flops(shape: tuple, vocab: int, b: int, prompt: int, new: int) -> float:
  layers, width, heads, _, _ = shape
  cache = prompt - 1 + new
  per_token = 2 * (body_params(shape) + width * vocab) + 4 * cache * heads * (width // heads) * layers
  return b * (2 * body_params(shape) * (prompt - 1) + new * per_token)


def step_flops(args, shapes: tuple, lmbda: float) -> dict:
  student, teacher = shapes
  b, i, n, v = args.batch, args.prompt_len, args.new_tokens, args.vocab
  length = i + n - 1
  parts = {"teacher forward": forward_flops(teacher, v, b, length, n),
           "student fwd+bwd": 3 * forward_flops(student, v, b, length, n)}
  if lmbda > 0:
    parts["sampling"] = sampling_flops(student, v, b, i, n)
  return parts


def xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def best_time(fn, reps: int) -> list:
  out = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - start)
  return out


def matmul_rate(side: int, dtype) -> tuple:
  """(fn, flops) of one jitted [side, side] @ [side, side]."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(k1, (side, side), dtype)
  b = jax.random.normal(k2, (side, side), dtype)
  dot = jax.jit(jnp.dot)
  return (lambda: dot(a, b)), 2.0 * side ** 3


def copy_rate(nbytes: int) -> float:
  """Device-to-device copy bandwidth (bytes read + written per second)."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  copy = jax.jit(lambda y: y + 0.0)
  jax.block_until_ready(copy(x))
  return 2 * nbytes / min(best_time(lambda: copy(x), 5))


def cpu_main(args) -> None:
  shapes = common.SHAPES[args.shape]
  (student, params), (teacher, teacher_params) = common.init_models(args)
  dot, dot_flops = matmul_rate(args.matmul, jnp.float32)
  jax.block_until_ready(dot())
  print(f"shape {args.shape}: student {shapes[0]}, teacher {shapes[1]}; vocab {args.vocab}; "
        f"batch {args.batch}, prompt {args.prompt_len}, new tokens {args.new_tokens}; float32; "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  print("| λ | counted GFLOP/step | XLA GFLOP/step | step s (best) | achieved GFLOP/s | "
        "matmul GFLOP/s (best) | achieved / peak |")
  print("|---|---|---|---|---|---|---|")
  for lmbda in [float(x) for x in args.lmbdas.split(",")]:
    step, state, batch = common.gkd_step(args, student, params, teacher, teacher_params, lmbda)
    state = jax.tree.map(jnp.copy, state)  # the step donates it; `params` serves both λ
    compiled, run = compiled_runner(step, state, teacher_params, batch)
    t_step, t_dot = [], []
    for _ in range(args.reps):  # alternate: both see the same machine load
      t_step += best_time(run, 1)
      t_dot += best_time(dot, 1)
    parts = step_flops(args, shapes, lmbda)
    counted = sum(parts.values())
    xla = xla_flops(compiled) if lmbda == 0 else float("nan")
    achieved, peak = counted / min(t_step), dot_flops / min(t_dot)
    print(f"| {lmbda:g} | {counted / 1e9:.2f} | {xla / 1e9:.2f} | {min(t_step):.4f} | "
          f"{achieved / 1e9:.1f} | {peak / 1e9:.1f} | {achieved / peak:.0%} |")
    print("  " + "; ".join(f"{k} {v / 1e9:.2f} GFLOP" for k, v in parts.items()))
  print(f"load average after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def compiled_runner(step, state, teacher_params, batch):
  """The compiled step and a warmed-up no-argument call that threads the donated state."""
  compiled = step.lower(state, teacher_params, batch).compile()
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], teacher_params, batch)
    return metrics
  jax.block_until_ready(run())
  return compiled, run


def gpu_main(args) -> None:
  """bf16, 0.5B-class student: λ=0 MFU vs bf16 matmul rate; decode bandwidth vs copy rate."""
  from gkd import sampling
  from gkd.models import DecoderModel
  common.SHAPES["gpu"] = GPU_SHAPES
  args.shape, args.vocab = "gpu", 151936
  (student, params), (teacher, teacher_params) = common.init_models(args, dtype="bfloat16")
  dot, dot_flops = matmul_rate(8192, jnp.bfloat16)
  jax.block_until_ready(dot())
  peak = dot_flops / min(best_time(dot, 10))
  step, state, batch = common.gkd_step(args, student, params, teacher, teacher_params, 0.0)
  _, run = compiled_runner(step, state, teacher_params, batch)
  t_step = min(best_time(run, args.reps))
  counted = sum(step_flops(args, GPU_SHAPES, 0.0).values())
  print(f"GPU {jax.devices()[0].device_kind}: λ=0 step {t_step:.4f} s, {counted / 1e12:.2f} "
        f"TFLOP counted, achieved {counted / t_step / 1e12:.1f} TFLOP/s, bf16 matmul "
        f"{peak / 1e12:.1f} TFLOP/s, MFU {counted / t_step / peak:.0%}")
  # Decoding: each new token reads every parameter and the KV cache once.
  model = DecoderModel(dataclasses.replace(student.config, eos_id=-1))
  config = sampling.SampleConfig(max_new_tokens=args.new_tokens, greedy=True)
  decode = jax.jit(lambda p, b: sampling.sample(model, p, b, jax.random.PRNGKey(0), config).tokens)
  jax.block_until_ready(decode(params, batch))
  t_decode = min(best_time(lambda: decode(params, batch), args.reps))
  layers, width, heads, kv_heads, _ = GPU_SHAPES[0]
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  cache = (args.prompt_len + args.new_tokens) * 2 * layers * kv_heads * (width // heads) * 2
  per_token = param_bytes + args.batch * cache
  bandwidth = per_token * args.new_tokens / t_decode
  copy = copy_rate(1 << 30)
  print(f"decode: {args.new_tokens} tokens in {t_decode:.4f} s, {bandwidth / 1e9:.0f} GB/s "
        f"read; device copy {copy / 1e9:.0f} GB/s; fraction {bandwidth / copy:.0%}")


def main(argv=None) -> None:
  args = parse_args(argv)
  loadguard.check(args)
  startup.xla_defaults()  # the XLA options gkd.main runs with
  if jax.default_backend() == "gpu":
    gpu_main(args)
  else:
    cpu_main(args)


if __name__ == "__main__":
  main()
