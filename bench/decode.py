"""Decoding speed: gkd.sampling.sample (jitted) vs transformers' `generate`.

Both decode the same tiny Llama-family model (a random `LlamaForCausalLM`,
saved as safetensors and imported with `gkd.models.load_hf`), on CPU, in
float32, from the same left-padded prompts, for exactly `--new_tokens` new
tokens (HF: min_new_tokens = max_new_tokens; ours: EOS disabled). Runs
alternate, after one warm-up each; the table shows new tokens per second.

  /work/heavy python bench/decode.py            # greedy
  /work/heavy python bench/decode.py --sample   # temperature-1 sampling
"""

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from gkd import sampling
from gkd.models import DecoderModel, load_hf

import loadguard  # bench/loadguard.py: refuses a loaded machine


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--vocab", type=int, default=1024)
  p.add_argument("--hidden", type=int, default=128)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--torch_threads", type=int, default=0,
                 help="torch.set_num_threads (0: torch's default)")
  p.add_argument("--sample", action="store_true",
                 help="temperature-1 sampling (no top-k/top-p) instead of greedy")
  loadguard.add_flags(p)
  return p.parse_args()


def hf_model(args: argparse.Namespace) -> transformers.LlamaForCausalLM:
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden,
      intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  return transformers.LlamaForCausalLM(config).eval()


def prompts(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded prompts of random lengths: (tokens, mask) int[B, I]."""
  rng = np.random.default_rng(0)
  lengths = rng.integers(args.prompt_len // 2, args.prompt_len + 1, args.batch)
  lengths[0] = args.prompt_len
  tokens = rng.integers(3, args.vocab, (args.batch, args.prompt_len))
  mask = np.arange(args.prompt_len)[None] >= args.prompt_len - lengths[:, None]
  return np.where(mask, tokens, 0).astype(np.int32), mask.astype(np.int32)


def timed(fn) -> tuple[float, object]:
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def main() -> None:
  args = parse_args()
  loadguard.check(args)
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  hf = hf_model(args)
  tokens, mask = prompts(args)
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp, safe_serialization=True)
    model, params = load_hf(tmp, dtype="float32")
  # Never stop early: HF suppresses EOS below min_new_tokens; we disable it.
  model = DecoderModel(dataclasses.replace(model.config, eos_id=-1))

  n = args.new_tokens
  config = sampling.SampleConfig(max_new_tokens=n, greedy=not args.sample,
                                 temperature=1.0)
  batch = {"input_tokens": jnp.asarray(tokens), "input_mask": jnp.asarray(mask)}
  ours_fn = jax.jit(lambda p, b, r: sampling.sample(model, p, b, r, config).tokens)
  gen_kwargs = dict(
      input_ids=torch.tensor(tokens, dtype=torch.long),
      attention_mask=torch.tensor(mask, dtype=torch.long),
      max_new_tokens=n, min_new_tokens=n, do_sample=args.sample,
      pad_token_id=0, eos_token_id=2)
  if args.sample:
    gen_kwargs.update(temperature=1.0, top_k=0, top_p=1.0)

  def ours(rep):
    return np.asarray(ours_fn(params, batch, jax.random.key(rep)))

  @torch.inference_mode()
  def theirs(rep):
    torch.manual_seed(rep)
    return hf.generate(**gen_kwargs)[:, args.prompt_len:].numpy()

  ours(0), theirs(0)  # warm-up (compilation, caches)
  rows = []
  for rep in range(1, args.reps + 1):
    t_ours, out_ours = timed(lambda: ours(rep))
    t_hf, out_hf = timed(lambda: theirs(rep))
    rows.append((t_ours, t_hf))
  new = args.batch * n
  print(f"batch {args.batch}, prompt {args.prompt_len}, new tokens {n}, "
        f"{'sampling (T=1)' if args.sample else 'greedy'}, float32 CPU, "
        f"jax {jax.__version__} ({jax.device_count()} devices), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, cores {os.cpu_count()}")
  print(f"{'rep':>4} {'gkd s':>8} {'gkd tok/s':>10} {'HF s':>8} {'HF tok/s':>10}")
  for i, (a, b) in enumerate(rows, 1):
    print(f"{i:>4} {a:8.4f} {new / a:10.0f} {b:8.4f} {new / b:10.0f}")
  med_ours = statistics.median(a for a, _ in rows)
  med_hf = statistics.median(b for _, b in rows)
  print(f"median: gkd {new / med_ours:.0f} new tokens/s, HF generate "
        f"{new / med_hf:.0f} new tokens/s; ratio {med_hf / med_ours:.1f}x")
  best_ours, best_hf = min(a for a, _ in rows), min(b for _, b in rows)
  print(f"best:   gkd {new / best_ours:.0f} new tokens/s, HF generate "
        f"{new / best_hf:.0f} new tokens/s; ratio {best_hf / best_ours:.1f}x")
  if not args.sample:  # same weights, same greedy choices (HF never emits EOS)
    agree = np.mean(out_ours == out_hf)
    print(f"greedy tokens identical to HF: {agree:.1%}")


if __name__ == "__main__":
  main()
