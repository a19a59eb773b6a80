r"""python -m gkd.vocab: train a vocabulary on a JSONL task's text.

    python -m gkd.vocab --jsonl=train.jsonl --kind=sentencepiece --size=8000 --out=/data/vocab
    python -m gkd.vocab --jsonl=train.jsonl --kind=bpe --size=4000 --out=/data/vocab

Reads the "input" and "target" strings of every record (--input_field,
--target_field; --jsonl is repeatable) and trains

  sentencepiece  a SentencePiece unigram model with T5's ids (pad 0, eos 1,
                 unk 2, no BOS), digits split, every character of the text
                 covered: <out>/spiece.model;
  bpe            a byte-level BPE (Hugging Face `tokenizers`; pad 0, eos 1,
                 unk 2, bos 3; any text encodes, nothing is unk):
                 <out>/tokenizer.json and tokenizer_config.json.

`--size` is the largest vocabulary size (SentencePiece stops earlier when the
text has fewer pieces). It writes <out>/vocab.gin, the bindings that select the
vocabulary; add it after configs/tasks/jsonl.gin:

    python -m gkd.main --gin_file=... --gin_file=tasks/jsonl.gin --gin_file=/data/vocab/vocab.gin

and prints the size and the special ids the models' configs need (vocab_size
at least the size, eos_id). Exit 2 with one line on bad input; --out must be a
new or empty directory.
"""

import json
import os
import sys
from typing import Sequence

from absl import flags

from gkd import startup
from gkd.errors import UserError

KINDS = ("sentencepiece", "bpe")
SPECIALS = ("<pad>", "</s>", "<unk>", "<s>")  # ids 0-3 of a BPE vocabulary
BYTE_ALPHABET = 256

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags (defined when run as a program: `gkd.demo` also has --out)."""
  flags.DEFINE_multi_string("jsonl", [], "JSONL file(s) whose text the vocabulary learns.")
  flags.DEFINE_enum("kind", "sentencepiece", KINDS, "SentencePiece unigram or byte-level BPE.")
  flags.DEFINE_integer("size", 8000, "Largest vocabulary size (ids).")
  flags.DEFINE_string("out", None, "New (or empty) directory for the vocabulary and vocab.gin.")
  flags.DEFINE_string("input_field", "input", "The records' input field.")
  flags.DEFINE_string("target_field", "target", "The records' target field.")


def _check_out(out: str) -> None:
  if not out:
    raise UserError("--out is required: a new directory for the vocabulary")
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise UserError(f"--out={out} exists and is not an empty directory; choose a new one")


def texts_of(paths: Sequence[str], fields: Sequence[str] = ("input", "target")) -> list[str]:
  """Every field value of every record of the JSONL files (checked as gkd.tasks reads them)."""
  from gkd.tasks import jsonl  # pylint: disable=g-import-not-at-top
  if not paths:
    raise UserError("no --jsonl given; pass the task's training file, e.g. --jsonl=train.jsonl")
  return [text for path in paths for record in jsonl.read_jsonl(path, fields) for text in record]


def train_sentencepiece(texts: Sequence[str], size: int, out: str) -> str:
  """Trains `<out>/spiece.model` (unigram, T5's ids); returns its path."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  prefix = os.path.join(out, "spiece")
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        character_coverage=1.0, split_digits=True, hard_vocab_limit=False,
        max_sentence_length=1 << 16, minloglevel=2)
  except RuntimeError as e:
    raise UserError(f"SentencePiece cannot train a {size}-id vocabulary on this text "
                    f"({str(e).splitlines()[-1][:200]}); change --size") from None
  return prefix + ".model"


def train_bpe(texts: Sequence[str], size: int, out: str) -> str:
  """Trains a byte-level BPE `<out>/tokenizer.json` (+ tokenizer_config.json); returns its path."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  if size < BYTE_ALPHABET + len(SPECIALS):
    raise UserError(f"--size={size} is too small for a byte-level BPE: it needs at least "
                    f"{BYTE_ALPHABET + len(SPECIALS)} ids (256 bytes and {len(SPECIALS)} "
                    "special tokens)")
  tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=list(SPECIALS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator(texts, trainer)
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "tokenizer.json")
  tokenizer.save(path)
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
               "bos_token": "<s>"}, f, indent=2)
  return path


def write_gin(out: str, kind: str, path: str, sources: Sequence[str]) -> str:
  """`<out>/vocab.gin`: the bindings that select the trained vocabulary."""
  gin_kind = "sentencepiece" if kind == "sentencepiece" else "hf"
  gin_path = os.path.join(out, "vocab.gin")
  with open(gin_path, "w") as f:
    f.write(f"# A {kind} vocabulary trained by `python -m gkd.vocab` on {', '.join(sources)}.\n"
            "# Add after configs/tasks/jsonl.gin.\n"
            f"tasks.get_vocabulary.kind = '{gin_kind}'\n"
            f"tasks.get_vocabulary.path = {os.path.abspath(path)!r}\n")
  return gin_path


def build(paths: Sequence[str], kind: str, size: int, out: str,
          fields: Sequence[str] = ("input", "target")) -> dict:
  """Trains the vocabulary and writes vocab.gin; returns what `main` prints."""
  if kind not in KINDS:
    raise UserError(f"unknown --kind={kind!r}; choose one of {', '.join(KINDS)}")
  if not (isinstance(size, int) and size > 4):
    raise UserError(f"--size={size!r} must be an integer above 4")
  _check_out(out)
  texts = texts_of(paths, fields)  # reads and checks every file before writing anything
  train = train_sentencepiece if kind == "sentencepiece" else train_bpe
  path = train(texts, size, out)
  gin_path = write_gin(out, kind, path, paths)
  from gkd.tasks import coverage, vocabularies  # pylint: disable=g-import-not-at-top
  vocab = vocabularies.get_vocabulary("sentencepiece" if kind == "sentencepiece" else "hf", path)
  unknown = coverage.unknown_fraction(vocab, texts)
  return dict(path=path, gin=gin_path, size=vocab.vocab_size, eos_id=vocab.eos_id,
              bos_id=vocabularies.bos_id(vocab), unknown=unknown)


def main(argv: list[str]) -> None:
  del argv
  try:
    info = build(FLAGS.jsonl, FLAGS.kind, FLAGS.size, FLAGS.out,
                 (FLAGS.input_field, FLAGS.target_field))
  except UserError as e:
    print(f"gkd: error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
  print(f"vocabulary: {info['path']} ({info['size']} ids; eos {info['eos_id']}, "
        f"bos {info['bos_id']}; {100 * info['unknown']:.2f}% of the text's tokens unknown)")
  print(f"Gin: {info['gin']} (add it after tasks/jsonl.gin)")
  print(f"models: vocab_size >= {info['size']}, eos_id = {info['eos_id']}")


if __name__ == "__main__":
  startup.quiet()
  define_flags()
  startup.run_app(main, sys.argv)
