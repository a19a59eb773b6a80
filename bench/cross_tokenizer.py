"""Cost of cross-tokenizer alignment on the host, per batch, and of its losses.

    python bench/cross_tokenizer.py [--batch 32] [--input_len 64] [--target_len 128]
        [--pairs bpe-bpe,bpe-sp,sp-bpe,word-bpe,byte-bpe] [--vocab 0] [--repeats 3]

Two byte-level BPE tokenizers (vocabulary sizes 300 and 2000), a SentencePiece
model (about 340 pieces, byte fallback), the word and byte vocabularies, all built here on a
generated corpus. Each row's prompt and target are generated text tokenised by
the student; a target fills about 3/4 of `target_len`. "align" is the median
time of `Aligner.__call__` on the whole batch (what `jax.pure_callback` runs
once per step). With `--vocab V > 0` it also times the jitted value and
gradient of each loss mode at student and teacher vocabulary V (the sort of
ULD is O(V log V) per position).
"""

import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import seqio
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from gkd.losses import cross_tokenizer
from gkd.tasks import alignment, features, vocabularies

from gkd import startup  # noqa: E402
import loadguard  # bench/loadguard.py: refuses a loaded machine

WORDS = ("the a one two three clips sold many half April May how did sell altogether fox dog "
         "quick brown lazy jumps over summary states key facts document naïve café über "
         "Natalia Weng earns hour babysitting minutes much 48 12 7 + - = . , ? #### 日本").split()


def corpus(n: int, seed: int) -> list[str]:
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, size=rng.integers(8, 40))) for _ in range(n)]


def build_vocabularies(root: str) -> dict:
  lines = corpus(2000, 0)
  out = {}
  for name, size in (("bpe", 300), ("bpe_big", 2000)):
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=size, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = os.path.join(root, f"{name}.json")
    tok.save(path)
    out[name] = vocabularies.HfTokenizerVocabulary(path)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=os.path.join(root, "sp"), vocab_size=340,
      hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True,
      character_coverage=1.0, minloglevel=2)
  out["sp"] = seqio.SentencePieceVocabulary(os.path.join(root, "sp.model"))
  out["word"] = vocabularies.get_vocabulary("word")
  out["byte"] = seqio.ByteVocabulary()
  return out


def student_batch(vocab, batch: int, input_len: int, target_len: int) -> dict:
  conv = features.converter_for(vocab, input_len, target_len)
  texts = corpus(4 * batch, 1)
  examples = []
  for r in range(batch):
    target = vocab.encode(" " + " ".join(texts[2 * r + 1:2 * r + 8]))[:3 * target_len // 4]
    examples.append((vocab.encode(texts[2 * r]), target))
  return conv.batch(examples)


def time_align(aligner, batch: dict, repeats: int) -> float:
  args = [batch[k] for k in features.KEYS]
  aligner(*args)  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    aligner(*args)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_losses(alignment, batch: dict, vocab: int, repeats: int) -> dict:
  b, o_s = batch["target_tokens"].shape
  o_t = alignment.target_tokens.shape[1]
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  student = jax.random.normal(k1, (b, o_s, vocab), jnp.float32)
  teacher = jax.random.normal(k2, (b, o_t, vocab), jnp.float32) * 2
  targets = jnp.asarray(batch["target_tokens"]) % vocab
  a = type(alignment)(*(jnp.asarray(x) for x in alignment))
  a = a._replace(target_tokens=a.target_tokens % vocab)
  out = {}
  for mode in cross_tokenizer.MODES:
    fn = cross_tokenizer.CrossTokenizerLoss(mode=mode)
    step = jax.jit(jax.value_and_grad(lambda s: fn(s, teacher, targets, batch["target_mask"], a)))
    jax.block_until_ready(step(student))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(step(student))
      times.append(time.perf_counter() - start)
    out[mode] = statistics.median(times)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--input_len", type=int, default=64)
  parser.add_argument("--target_len", type=int, default=128)
  parser.add_argument("--pairs", default="bpe-bpe_big,bpe_big-bpe,bpe-sp,sp-bpe,word-bpe,byte-bpe")
  parser.add_argument("--vocab", type=int, default=0)
  parser.add_argument("--repeats", type=int, default=3)
  loadguard.add_flags(parser)
  args = parser.parse_args()
  loadguard.check(args)
  startup.xla_defaults()  # the XLA options gkd.main runs with
  with tempfile.TemporaryDirectory() as root:
    vocabs = build_vocabularies(root)
    print(f"batch={args.batch} input_len={args.input_len} target_len={args.target_len} "
          f"(teacher lengths the same); median of {args.repeats}")
    header = ("| student | teacher | student tokens | teacher tokens | align (ms/batch) "
              "| per row (ms) |")
    if args.vocab:
      header += " " + " | ".join(f"{m} (ms, V={args.vocab})" for m in ("uld", "uld_spans",
                                                                         "spans")) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for pair in args.pairs.split(","):
      s_name, t_name = pair.split("-")
      student, teacher = vocabs[s_name], vocabs[t_name]
      batch = student_batch(student, args.batch, args.input_len, args.target_len)
      aligner = alignment.Aligner(student, teacher, input_length=args.input_len,
                                  target_length=args.target_len)
      seconds = time_align(aligner, batch, args.repeats)
      a = aligner(*(batch[k] for k in features.KEYS))
      row = (f"| {s_name} | {t_name} | {int(batch['target_mask'].sum())} | "
             f"{int(a.target_mask.sum())} | {seconds * 1e3:.1f} | "
             f"{seconds * 1e3 / args.batch:.2f} |")
      if args.vocab:
        row += " " + " | ".join(f"{t * 1e3:.1f}" for t in time_losses(
            a, batch, args.vocab, args.repeats).values()) + " |"
      print(row)


if __name__ == "__main__":
  main()
