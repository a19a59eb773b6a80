"""One GKD train step: gkd (JAX, one jitted program) vs TRL's GKDTrainer (PyTorch).

    /work/heavy python bench/gkd_vs_trl.py                   # small shape
    /work/heavy python bench/gkd_vs_trl.py --shape medium    # the bigger shape

Same models on both sides: our student and (larger) teacher are initialised
with `gkd.models`, exported with `save_hf`, and both sides load those files
(`load_hf` / `LlamaForCausalLM.from_pretrained`), float32, CPU. Same batch
(full-length prompts), max_new_tokens, β, temperature, AdamW (lr, betas, eps,
no weight decay, global-norm clip 1.0). EOS is disabled on both sides, so
every step trains on exactly batch × new_tokens output tokens.

What is timed, per step:
  gkd:  `jax.jit(make_train_step(...), donate_argnums=0)` until its outputs
        are ready (sampling in-graph at λ=1, teacher forward, student
        forward+backward, JSD(β), AdamW).
  TRL:  `GKDTrainer.training_step(model, inputs)` (at λ=1 its `model.generate`
        with the student, then compute_loss + backward) followed by what
        `Trainer`'s loop adds: `clip_grad_norm_`, `optimizer.step()`,
        `optimizer.zero_grad()`.
Runs alternate (gkd, TRL, gkd, ...) after warm-up; medians are reported.
Peak resident memory is each side's own VmHWM, measured in a child process
that runs only that side (one process cannot separate two frameworks'
peaks): imports, models, optimizer state, warm-up and one step; the RSS right
after the imports is shown beside it.
"""

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from gkd import startup  # noqa: E402
import loadguard  # bench/loadguard.py: refuses a loaded machine

for _k, _v in (("TRL_EXPERIMENTAL_SILENCE", "1"), ("HF_HUB_OFFLINE", "1"),
               ("TF_CPP_MIN_LOG_LEVEL", "2"), ("TOKENIZERS_PARALLELISM", "false"),
               ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
  os.environ.setdefault(_k, _v)

# (layers, width, heads, kv_heads, mlp) of the student and of the teacher.
SHAPES = {
    "tiny": ((2, 64, 4, 2, 128), (2, 96, 4, 4, 192)),
    "small": ((4, 256, 4, 2, 688), (6, 384, 6, 6, 1024)),
    "medium": ((8, 512, 8, 4, 1376), (12, 768, 12, 12, 2048)),
}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", default="small", choices=sorted(SHAPES))
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--beta", type=float, default=0.5)
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--lr", type=float, default=1e-5)
  p.add_argument("--lmbdas", default="1,0", help="comma-separated λ values")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--no_memory", action="store_true", help="skip the per-side RSS children")
  p.add_argument("--side", choices=("gkd", "trl"), help=argparse.SUPPRESS)
  p.add_argument("--model_dir", help=argparse.SUPPRESS)
  loadguard.add_flags(p)
  return p.parse_args(argv)


def decoder_config(shape: tuple, vocab: int, dtype: str = "float32", remat: str = "none",
                   attention: str = "dense"):
  from gkd.models import DecoderConfig
  layers, width, heads, kv_heads, mlp = shape
  return DecoderConfig(vocab_size=vocab, embed_dim=width, mlp_dim=mlp, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=width // heads,
                       tie_embeddings=False, dtype=dtype, max_len=2048, remat=remat,
                       attention=attention)


def batch_arrays(args) -> dict:
  """Full-length prompts and dataset targets, int32 numpy [B, I] / [B, N]."""
  rng = np.random.default_rng(0)
  b, i, n = args.batch, args.prompt_len, args.new_tokens
  return {"input_tokens": rng.integers(3, args.vocab, (b, i)).astype(np.int32),
          "input_mask": np.ones((b, i), np.int32),
          "target_tokens": rng.integers(3, args.vocab, (b, n)).astype(np.int32),
          "target_mask": np.ones((b, n), np.int32)}


def init_models(args, dtype: str = "float32") -> list:
  """[(model, params)] for the student (seed 0) and the teacher (seed 1), from gkd.models."""
  import jax
  from gkd import partitioning
  from gkd.models import build_model
  batch = {k: jax.numpy.asarray(v) for k, v in batch_arrays(args).items()}
  out = []
  for seed, shape in enumerate(SHAPES[args.shape]):
    remat = getattr(args, "remat", "none") if seed == 0 else "none"  # the student's
    model = build_model(decoder_config(shape, args.vocab, dtype=dtype, remat=remat,
                                       attention=getattr(args, "attention", "dense")))
    out.append((model, partitioning.strip_boxes(model.init(jax.random.PRNGKey(seed), batch))))
  return out


def export_models(args, path: str) -> None:
  """Writes our student and teacher as HF Llama directories (gkd.models.save_hf)."""
  from gkd.models import save_hf
  for name, (model, params) in zip(("student", "teacher"), init_models(args)):
    save_hf(model, params, os.path.join(path, name))


# ---------------------------------------------------------------- gkd side


def gkd_step(args, student, params, teacher, teacher_params, lmbda: float,
             chunking: dict | None = None, **method):
  """(jitted step, initial TrainState, batch) for our GKD step with JSD(β), AdamW, clip 1.

  `chunking`: the divergence's `chunk_size` or `chunk_elements`; `method`: more
  `Method` fields (`loss_path`, `microbatches`; default: the defaults).

  The student's EOS is disabled, so samples always have `new_tokens` tokens.
  """
  import jax
  import jax.numpy as jnp
  from gkd import losses, sampling
  from gkd.models import DecoderModel
  from gkd.train import Method, TrainState, make_train_step, optimizer, schedule

  student = DecoderModel(dataclasses.replace(student.config, eos_id=-1))
  tx = optimizer("adamw", schedule(args.lr), clip_norm=1.0)
  divergence = losses.Divergence("jsd", {"beta": args.beta}, reduction="token",
                                 **(chunking or {}))
  method = Method(divergence=divergence, lmbda=lmbda,
                  sampler=sampling.SampleConfig(temperature=args.temperature), **method)
  step = jax.jit(make_train_step(student, teacher, tx, method), donate_argnums=0)
  batch = {k: jnp.asarray(v) for k, v in batch_arrays(args).items()}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=tx.init(params), rng=jax.random.PRNGKey(7))
  return step, state, batch


def gkd_runner(args, path: str, lmbda: float):
  """Returns run() -> (seconds, loss, output tokens) for one of our steps (models from `path`)."""
  import jax
  from gkd.models import load_hf
  student, params = load_hf(os.path.join(path, "student"), dtype="float32")
  teacher, teacher_params = load_hf(os.path.join(path, "teacher"), dtype="float32")
  step, state, batch = gkd_step(args, student, params, teacher, teacher_params, lmbda)
  holder = [state]

  def run():
    start = time.perf_counter()
    holder[0], metrics = step(holder[0], teacher_params, batch)
    jax.block_until_ready((holder[0], metrics))
    seconds = time.perf_counter() - start
    return seconds, float(metrics["loss"]), float(metrics["target_tokens"])
  return run


# ---------------------------------------------------------------- TRL side


def _tokenizer():
  """A word-level fast tokenizer built in memory (TRL needs a pad id; nothing is tokenised)."""
  import tokenizers
  import transformers
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
      unk_token="<unk>")


def trl_runner(args, path: str, lmbda: float):
  """Returns run() -> (seconds, loss, output tokens) for one TRL GKD step."""
  import datasets
  import torch
  import transformers
  from trl.experimental.gkd import GKDConfig, GKDTrainer

  transformers.logging.set_verbosity_error()
  torch.manual_seed(0)
  load = lambda name: transformers.LlamaForCausalLM.from_pretrained(
      os.path.join(path, name), dtype=torch.float32)
  student, teacher = load("student"), load("teacher")
  student.generation_config.eos_token_id = None  # never stop early (as on our side)
  config = GKDConfig(
      output_dir=os.path.join(path, "trl_out"), per_device_train_batch_size=args.batch,
      learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0,
      adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
      lmbda=lmbda, beta=args.beta, temperature=args.temperature,
      max_new_tokens=args.new_tokens, use_cpu=True, report_to=[], save_strategy="no",
      logging_strategy="no", bf16=False, fp16=False, seed=0)
  dataset = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "x"}]]})
  trainer = GKDTrainer(model=student, teacher_model=teacher, args=config,
                       train_dataset=dataset, processing_class=_tokenizer())
  trainer.generation_config.eos_token_id = None
  trainer.current_gradient_accumulation_steps = 1  # normally set by Trainer's loop
  optimizer = trainer.create_optimizer()
  a = batch_arrays(args)
  prompts = torch.tensor(a["input_tokens"], dtype=torch.long)
  completion = torch.tensor(a["target_tokens"], dtype=torch.long)
  ids = torch.cat([prompts, completion], 1)
  labels = ids.clone()
  labels[:, :args.prompt_len] = -100

  def run():
    inputs = {"prompts": prompts, "prompt_attention_mask": torch.ones_like(prompts),
              "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    start = time.perf_counter()
    loss = trainer.training_step(trainer.model, inputs)
    torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    seconds = time.perf_counter() - start
    return seconds, float(loss), float((inputs["labels"] != -100).sum())
  return run


RUNNERS = {"gkd": gkd_runner, "trl": trl_runner}


# ---------------------------------------------------------------- driver


def peak_rss_child(args, path: str, side: str, lmbda: float) -> dict:
  """{peak_rss_mib, imports_mib} of a child that runs only `side` (warm-up + 1 step)."""
  cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--model_dir", path,
         "--lmbdas", str(lmbda)] + [f"--{k}={getattr(args, k)}" for k in (
             "shape", "vocab", "batch", "prompt_len", "new_tokens", "beta", "temperature", "lr")]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def child_main(args) -> None:
  if args.side == "gkd":
    import gkd.models, gkd.train  # noqa: F401,E401
  else:
    import transformers, trl.experimental.gkd  # noqa: F401,E401
  imports = peak_rss_mib("VmRSS")
  run = RUNNERS[args.side](args, args.model_dir, float(args.lmbdas))
  run(), run()
  print(json.dumps({"peak_rss_mib": peak_rss_mib(), "imports_mib": imports}))


def peak_rss_mib(field: str = "VmHWM") -> float:
  """This process's peak resident MiB: VmHWM (reset at exec, unlike ru_maxrss, which a
  child inherits from its parent's size at fork); `field="VmRSS"`: the current size."""
  try:
    with open("/proc/self/status") as f:
      return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) / 1024
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"{os.cpu_count()} CPUs ({cpu})"


def versions() -> str:
  import jax
  import torch
  import transformers
  import trl
  return (f"python {platform.python_version()}, jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), transformers {transformers.__version__}, trl {trl.__version__}")


def timed_pair(args, path: str, lmbda: float) -> dict:
  """Alternating repetitions after one warm-up step each: per-side lists of (s, loss, tokens)."""
  runs = {side: RUNNERS[side](args, path, lmbda) for side in RUNNERS}
  first = {side: run() for side, run in runs.items()}  # warm-up: compile, allocate
  times = {side: [] for side in runs}
  for _ in range(args.reps):
    for side, run in runs.items():
      times[side].append(run())
  return {"first": first, "times": times}


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.side:
    return child_main(args)
  loadguard.check(args)
  startup.xla_defaults()  # the XLA options gkd.main runs with
  student, teacher = SHAPES[args.shape]
  print(f"shape {args.shape}: student {student}, teacher {teacher} (layers, width, heads, "
        f"kv heads, mlp); vocab {args.vocab}; batch {args.batch}, prompt {args.prompt_len}, "
        f"new tokens {args.new_tokens}; JSD β={args.beta}, T={args.temperature}; float32 CPU")
  print(f"machine: {machine()}; {versions()}; load average before "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  rows = []
  with tempfile.TemporaryDirectory() as path:
    export_models(args, path)
    for lmbda in [float(x) for x in args.lmbdas.split(",")]:
      result = timed_pair(args, path, lmbda)
      rss = ({side: peak_rss_child(args, path, side, lmbda) for side in RUNNERS}
             if not args.no_memory else
             {side: {"peak_rss_mib": float("nan"), "imports_mib": float("nan")} for side in RUNNERS})
      rows.append((lmbda, result, rss))
  tokens = args.batch * args.new_tokens
  print(f"\nload average after {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"median of {args.reps} alternating steps after 1 warm-up; step-0 loss gkd / TRL shown "
        f"(same weights, same targets at λ=0)\n")
  print("| λ | side | s/step | steps/s | output tok/s | peak RSS MiB | of which imports | "
        "step-0 loss | gkd/TRL throughput | gkd/TRL peak RSS | gkd/TRL RSS above imports |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for lmbda, result, rss in rows:
    med = {s: statistics.median(t for t, _, _ in v) for s, v in result["times"].items()}
    for side in RUNNERS:
      ratio = med["trl"] / med["gkd"] if side == "gkd" else 1.0
      peak, base = rss[side]["peak_rss_mib"], rss[side]["imports_mib"]
      trl_peak, trl_base = rss["trl"]["peak_rss_mib"], rss["trl"]["imports_mib"]
      mem = peak / trl_peak if side == "gkd" else 1.0
      above = (peak - base) / (trl_peak - trl_base) if side == "gkd" else 1.0
      print(f"| {lmbda:g} | {side} | {med[side]:.3f} | {1 / med[side]:.2f} | "
            f"{tokens / med[side]:.0f} | {peak:.0f} | {base:.0f} | "
            f"{result['first'][side][1]:.4f} | {ratio:.2f}x | {mem:.2f}x | {above:.2f}x |")


if __name__ == "__main__":
  main()
