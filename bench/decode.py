"""Decoding speed: gkd.sampling.sample (jitted) vs transformers' `generate`.

Both decode the same tiny Llama-family model (a random `LlamaForCausalLM`,
saved as safetensors and imported with `gkd.models.load_hf`), on CPU, in
float32, from the same left-padded prompts, for exactly `--new_tokens` new
tokens (HF: min_new_tokens = max_new_tokens; ours: EOS disabled). At each
batch size in `--batches`, runs alternate after one warm-up each; the first
table has the medians (new tokens per second, the ratio to `generate`
measured in this run) and whether the greedy tokens are HF's.

gkd runs on one CPU device and, data-parallel, on a mesh of `--devices`
(default: one per core; `jax_num_cpu_devices`). The second is how XLA uses
a CPU's cores here: it runs a decode loop's small ops on one thread, while
torch spreads each op over its threads, so one device leaves the other cores
idle. Both columns are printed; the ratio is the mesh's.

The second table measures the early stop at `--early_batch`: a batch whose
rows all finish early (EOS set to a token that each row's greedy output
emits within N / 2 steps; `early_stop`), `sample` with that EOS (the loop ends
when every row has emitted it) against the same model with EOS disabled (all
N steps).

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

from jax.sharding import NamedSharding, PartitionSpec

from gkd import partitioning, sampling
from gkd.models import DecoderModel, load_hf

from gkd import startup  # noqa: E402
import loadguard  # bench/loadguard.py: refuses a loaded machine


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", default="8,32,64", help="comma-separated batch sizes")
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--new_tokens", type=int, default=256)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--vocab", type=int, default=1024)
  p.add_argument("--hidden", type=int, default=128)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--early_batch", type=int, default=32,
                 help="batch size of the early-stop table (0: no such table)")
  p.add_argument("--devices", type=int, default=os.cpu_count(),
                 help="CPU devices of gkd's data-parallel mesh (the batch must divide)")
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
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  return transformers.LlamaForCausalLM(config).eval()


def prompts(batch: int, length: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded prompts of random lengths: (tokens, mask) int[B, I]."""
  rng = np.random.default_rng(batch)
  lengths = rng.integers(length // 2, length + 1, batch)
  lengths[0] = length
  tokens = rng.integers(3, vocab, (batch, length))
  mask = np.arange(length)[None] >= length - lengths[:, None]
  return np.where(mask, tokens, 0).astype(np.int32), mask.astype(np.int32)


def timed(fn) -> tuple[float, object]:
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def alternate(fns, reps: int) -> tuple[list[float], list]:
  """Warms each fn up, then runs them in turn `reps` times: (median seconds, last outputs)."""
  outs = [fn(0) for fn in fns]
  times = [[] for _ in fns]
  for rep in range(1, reps + 1):
    for i, fn in enumerate(fns):
      t, outs[i] = timed(lambda: fn(rep))  # pylint: disable=cell-var-from-loop
      times[i].append(t)
  return [statistics.median(t) for t in times], outs


class Ours:
  """The jitted `sample` of a model on a data-parallel mesh (default: one device):
  (tokens, mask, steps) as numpy."""

  def __init__(self, model, params, config, devices: int = 1):
    self.mesh = partitioning.make_mesh(data=devices, devices=jax.devices()[:devices])
    self.rules = partitioning.data_parallel_rules()
    self.params = jax.device_put(params, NamedSharding(self.mesh, PartitionSpec()))
    self.fn = jax.jit(lambda p, b, r: sampling.sample(model, p, b, r, config))

  def __call__(self, batch, rep):
    batch = jax.device_put(batch, partitioning.logical_sharding(
        self.mesh, self.rules, "activation_batch", None))
    with partitioning.activation_sharding(self.mesh, self.rules):
      s = self.fn(self.params, batch, jax.random.key(rep))
    return np.asarray(s.tokens), np.asarray(s.mask), int(s.steps)


def first_emitted(tokens: np.ndarray, vocab: int) -> np.ndarray:
  """int[B, vocab]: the step (1-based) at which each row of `tokens` [B, N] first
  emits each token; N + 1 where it never does."""
  b, n = tokens.shape
  first = np.full((b, vocab), n + 1)
  for t in range(n - 1, -1, -1):
    first[np.arange(b), tokens[:, t]] = t + 1
  return first


def main() -> None:
  args = parse_args()
  loadguard.check(args)
  startup.xla_defaults()  # the XLA options gkd.main runs with
  jax.config.update("jax_num_cpu_devices", args.devices)
  batches = [int(x) for x in args.batches.split(",") if x]
  if any(b % args.devices for b in batches + [args.early_batch]):
    raise SystemExit(f"decode.py: every batch size ({args.batches}, early {args.early_batch}) "
                     f"must be a multiple of --devices={args.devices}; pick other sizes")
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  hf = hf_model(args)
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp, safe_serialization=True)
    model, params = load_hf(tmp, dtype="float32")
  # Never stop early: HF suppresses EOS below min_new_tokens; we disable it.
  no_eos = DecoderModel(dataclasses.replace(model.config, eos_id=-1))
  n = args.new_tokens
  config = sampling.SampleConfig(max_new_tokens=n, greedy=not args.sample, temperature=1.0)
  ours = [Ours(no_eos, params, config)] + (
      [Ours(no_eos, params, config, args.devices)] if args.devices > 1 else [])
  kind = "sampling (T=1)" if args.sample else "greedy"
  print(f"prompt {args.prompt_len}, new tokens {n}, {kind}, float32 CPU, "
        f"jax {jax.__version__} ({jax.device_count()} devices), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, cores {os.cpu_count()}, "
        f"medians of {args.reps}")

  rows, agree = [], {}
  for b in batches:
    tokens, mask = prompts(b, args.prompt_len, args.vocab)
    batch = {"input_tokens": jnp.asarray(tokens), "input_mask": jnp.asarray(mask)}
    gen_kwargs = dict(
        input_ids=torch.tensor(tokens, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        max_new_tokens=n, min_new_tokens=n, do_sample=args.sample, pad_token_id=0,
        eos_token_id=2)
    if args.sample:
      gen_kwargs.update(temperature=1.0, top_k=0, top_p=1.0)

    @torch.inference_mode()
    def theirs(rep, gen_kwargs=gen_kwargs):
      torch.manual_seed(rep)
      return hf.generate(**gen_kwargs)[:, args.prompt_len:].numpy()

    fns = [lambda rep, batch=batch, o=o: o(batch, rep) for o in ours]
    times, outs = alternate(fns + [theirs], args.reps)
    for i, out in enumerate(outs[:-1]):
      agree.setdefault(i, {})[b] = float(np.mean(out[0] == outs[-1]))
    rows.append((b, times[:-1], times[-1]))

  one = " (1 device)" if len(ours) > 1 else ""
  mesh = f" ({args.devices} devices)"
  print(f"| batch | new tokens | gkd s{one} |" + (f" gkd s{mesh} |" if one else "")
        + f" gkd tok/s | HF s | HF tok/s |" + (f" ratio{one} |" if one else "") + " ratio |")
  print("|---" * (7 + 2 * bool(one)) + "|")
  for b, t_ours, t_hf in rows:
    best = t_ours[-1]
    print(f"| {b} | {n} | " + " | ".join(f"{t:.3f}" for t in t_ours)
          + f" | {b * n / best:.0f} | {t_hf:.3f} | {b * n / t_hf:.0f} | "
          + "".join(f"{t_hf / t:.2f}x | " for t in t_ours[:-1]) + f"{t_hf / best:.2f}x |")
  if not args.sample:  # same weights, same greedy choices (HF never emits EOS)
    for i, same in agree.items():
      print(f"greedy tokens identical to HF{[one, mesh][i] if one else ''}: " + ", ".join(
          f"batch {b} {a:.1%}" for b, a in same.items()) +
            (" (all identical)" if all(a == 1 for a in same.values()) else " (DIFFER)"))
  if args.early_batch:
    early_stop(args, model, params, config)


def early_stop(args: argparse.Namespace, model: DecoderModel, params, config) -> None:
  """The early-stop table: a batch whose rows all emit a chosen EOS within N / 2 steps.

  From a pool of 4x the batch's prompts decoded greedily with EOS disabled,
  EOS is the token the most rows emit within N / 2 steps, and the batch is
  those rows (repeated if fewer).
  """
  b, n = args.early_batch, config.max_new_tokens
  greedy = dataclasses.replace(config, greedy=True)
  full = Ours(DecoderModel(dataclasses.replace(model.config, eos_id=-1)), params, greedy,
              args.devices)
  pool = prompts(4 * b, args.prompt_len, args.vocab)
  first = first_emitted(full(dict(zip(("input_tokens", "input_mask"), pool)), 0)[0], args.vocab)
  eos = int(np.argmax(np.sum(first <= n // 2, axis=0)))
  rows = np.resize(np.flatnonzero(first[:, eos] <= n // 2), b)
  batch = {"input_tokens": jnp.asarray(pool[0][rows]), "input_mask": jnp.asarray(pool[1][rows])}
  stops = Ours(DecoderModel(dataclasses.replace(model.config, eos_id=eos)), params, greedy,
               args.devices)
  (t_stop, t_full), (out_stop, out_full) = alternate(
      [lambda rep: stops(batch, rep), lambda rep: full(batch, rep)], args.reps)
  # The all-steps run's tokens up to each row's first EOS must be those kept.
  ended = np.cumsum(np.cumsum(out_full[0] == eos, axis=1), axis=1) > 1
  same = (np.array_equal(out_stop[0], np.where(ended, 0, out_full[0]))
          and np.array_equal(out_stop[1], (~ended).astype(np.int32)))
  print(f"early stop, greedy, {args.devices} device(s): batch {b} of prompts whose outputs emit token {eos} (the EOS) "
        f"within {n // 2} steps ({len(set(rows))} distinct of a pool of {4 * b})")
  print("| batch | EOS id | steps run | early stop s | all steps s | saving |")
  print("|---|---|---|---|---|---|")
  print(f"| {b} | {eos} | {out_stop[2]} / {n} | {t_stop:.3f} | {t_full:.3f} | "
        f"{t_full / t_stop:.2f}x |")
  print(f"early-stop tokens and mask equal the all-steps run's cut at EOS: {same}")


if __name__ == "__main__":
  main()
