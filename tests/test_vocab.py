"""Tests for gkd.tasks.vocabularies: the word vocabulary (TF == Python), a
Hugging Face tokenizer.json built here, a SentencePiece model trained here."""

import json
import os
import subprocess
import sys

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest
import seqio
import sentencepiece as spm
import tensorflow as tf
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from gkd import tasks
from gkd.errors import UserError
from gkd.tasks import features
from gkd.tasks import vocabularies

LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "Natalia sold 48 clips in April and half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May?",
    "A summary states the key facts of a long document.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "translate English to German: the house is small.",
] * 4


def make_sentencepiece(tmp_dir) -> str:
  """A tiny unigram model with T5's ids: pad 0, eos 1, unk 2, no BOS."""
  prefix = str(tmp_dir / "sp")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(LINES), model_prefix=prefix, vocab_size=120,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
      character_coverage=1.0)
  return prefix + ".model"


def make_hf_tokenizer(tmp_dir, bos: bool = True) -> str:
  """A tiny byte-level BPE tokenizer.json (+ tokenizer_config.json)."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(LINES, trainer)
  tmp_dir.mkdir(parents=True, exist_ok=True)
  tok.save(str(tmp_dir / "tokenizer.json"))
  config = {"bos_token": "<|begin_of_text|>" if bos else None,
            "eos_token": "<|end_of_text|>"}
  (tmp_dir / "tokenizer_config.json").write_text(json.dumps(config))
  return str(tmp_dir / "tokenizer.json")


WORD = vocabularies.get_vocabulary("word")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_word_vocabulary_specials_and_canonical_text():
  assert (WORD.pad_id, WORD.eos_id, WORD.unk_id, WORD.bos_id) == (0, 1, 2, 3)
  assert WORD.vocab_size == len(WORD.tokens) <= 512
  ids = WORD.encode("Tom has 12 apples. #### 12")
  assert WORD.decode(ids) == "Tom has 12 apples. #### 12"
  assert WORD.encode("Tom zebra") == [WORD.encode("Tom")[0], WORD.unk_id]
  # id 0 is padding only by the masks: decode reads what the mask keeps.
  got = tasks.decode(WORD, np.array([[0, 3] + ids + [1, 5]]),
                     np.array([[0, 1] + [1] * len(ids) + [1, 1]]))
  assert got == ["Tom has 12 apples. #### 12"]
  # Ids past the vocabulary (a model's padded embedding) are dropped.
  assert tasks.decode(WORD, np.array([ids[:1] + [WORD.vocab_size + 5]]),
                      np.ones((1, 2))) == ["Tom"]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=30)
       | st.sampled_from(["#### 5", "a\tb\nc", "x\u00a0y", "##### 1", "3.5"]))
def test_word_vocabulary_tf_matches_python(text):
  tf_ids = WORD.encode_tf(tf.constant(text)).numpy().tolist()
  assert tf_ids == WORD.encode(text)


def test_hf_vocabulary_roundtrip_and_specials(tmp_path):
  vocab = vocabularies.get_vocabulary("hf", make_hf_tokenizer(tmp_path / "a"))
  tok = tokenizers.Tokenizer.from_file(str(tmp_path / "a" / "tokenizer.json"))
  assert vocab.bos_id == tok.token_to_id("<|begin_of_text|>")
  assert vocab.eos_id == tok.token_to_id("<|end_of_text|>")
  text = "Natalia sold 48 clips, über 9!"
  ids = vocab.encode(text)
  assert ids == tok.encode(text, add_special_tokens=False).ids
  assert vocab.decode(ids) == text
  assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == ids
  assert vocab.decode_tf(tf.constant(ids)).numpy().decode() == text
  # Qwen2-style: no BOS, so prompts get none.
  no_bos = vocabularies.get_vocabulary(
      "hf", make_hf_tokenizer(tmp_path / "b", bos=False))
  assert vocabularies.bos_id(no_bos) is None
  conv = features.converter_for(no_bos, 8, 4)
  assert conv.bos_id is None and conv.input_eos_id is None
  assert features.converter_for(vocab, 8, 4).bos_id == vocab.bos_id


def test_sentencepiece_vocabulary_is_t5_style(tmp_path):
  vocab = vocabularies.get_vocabulary("sentencepiece",
                                      make_sentencepiece(tmp_path))
  assert isinstance(vocab, seqio.SentencePieceVocabulary)
  assert (vocab.pad_id, vocab.eos_id, vocabularies.bos_id(vocab)) == (0, 1, None)
  text = "Natalia sold 48 clips in May."
  assert vocab.decode(vocab.encode(text)) == text
  conv = features.converter_for(vocab, 16, 8)
  assert conv.bos_id is None and conv.input_eos_id == 1  # encoder input EOS


def test_fingerprints_key_the_task_registry(tmp_path):
  sp = vocabularies.get_vocabulary("sentencepiece", make_sentencepiece(tmp_path))
  names = {tasks.get_task("offline_arithmetic", v).name
           for v in (WORD, sp, vocabularies.get_vocabulary("byte"))}
  assert len(names) == 3
  assert tasks.get_task("offline_arithmetic", WORD).name in names
  assert tasks.get_task("offline_arithmetic", WORD, max_steps=3).name not in names


def test_vocabulary_user_errors(tmp_path):
  with pytest.raises(UserError, match="unknown vocabulary kind"):
    vocabularies.get_vocabulary("bpe")
  with pytest.raises(UserError, match="does not exist"):
    vocabularies.get_vocabulary("hf", str(tmp_path / "missing.json"))
  with pytest.raises(UserError, match="does not exist"):
    vocabularies.get_vocabulary("sentencepiece", str(tmp_path / "x.model"))


# ---------------------------------------------------------------- python -m gkd.vocab

RECORDS = [{"input": f"Ana has {a} pens and {b} cups; how many x^2 {{items}} in total?",
            "target": f"{a} + {b} = {a + b}. café #### {a + b}"}
           for a in range(1, 12) for b in range(2, 9)]


def _jsonl(path, records=RECORDS):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
def test_vocab_command_trains_on_the_task_text_and_round_trips(tmp_path, kind):
  import gin  # pylint: disable=g-import-not-at-top
  from gkd import vocab as vocab_cli  # pylint: disable=g-import-not-at-top
  from gkd.tasks import coverage  # pylint: disable=g-import-not-at-top
  data = _jsonl(tmp_path / "train.jsonl")
  out = tmp_path / "vocab"
  info = vocab_cli.build([data], kind, 300, str(out))
  # vocab.gin selects exactly the trained file.
  gin.clear_config()
  gin.parse_config_file(info["gin"])
  kind_bound = gin.query_parameter("tasks.get_vocabulary.kind")
  path = gin.query_parameter("tasks.get_vocabulary.path")
  gin.clear_config()
  assert path == info["path"] and os.path.isfile(path)
  vocab = vocabularies.get_vocabulary(kind_bound, path)
  assert vocab.eos_id == info["eos_id"] == 1 and 4 < vocab.vocab_size <= 300
  texts = [t for r in RECORDS for t in (r["input"], r["target"])]
  if kind == "sentencepiece":
    reference = spm.SentencePieceProcessor(model_file=path)
    assert (reference.pad_id(), reference.eos_id(), reference.unk_id()) == (0, 1, 2)
  else:
    reference = tokenizers.Tokenizer.from_file(path)
    assert [reference.token_to_id(t) for t in ("<pad>", "</s>", "<unk>", "<s>")] == [0, 1, 2, 3]
    assert vocabularies.bos_id(vocab) == 3
  for text in texts:
    ids = vocab.encode(text)
    expected = (reference.encode(text) if kind == "sentencepiece"
                else reference.encode(text, add_special_tokens=False).ids)
    assert ids == expected
    assert vocab.decode(ids) == text  # round trip, symbols and accents included
  assert info["unknown"] == coverage.unknown_fraction(vocab, texts) == 0.0
  # Digits are pieces of their own: "37" is two tokens, whatever the training text.
  assert [vocab.decode([i]).strip() for i in vocab.encode("37")][-2:] == ["3", "7"]


def test_vocab_command_line_and_its_bad_input(tmp_path):
  data = _jsonl(tmp_path / "train.jsonl")
  out = tmp_path / "vocab"

  def run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-m", "gkd.vocab", *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)
  proc = run(f"--jsonl={data}", "--kind=bpe", "--size=280", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stderr == ""  # no TensorFlow start-up lines
  assert f"Gin: {out}/vocab.gin" in proc.stdout and "eos_id = 1" in proc.stdout
  for args, message in [
      ([f"--jsonl={data}", "--kind=bpe", "--size=280", f"--out={out}"], "not an empty directory"),
      ([f"--jsonl={tmp_path}", f"--out={tmp_path / 'b'}"], "is a directory, not a file"),
      ([f"--jsonl={data}", "--kind=bpe", "--size=100", f"--out={tmp_path / 'c'}"],
       "too small for a byte-level BPE"),
      ([f"--out={tmp_path / 'd'}"], "no --jsonl given")]:
    proc = run(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0], lines
  assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def _unknown_share(records):
  """Independently of the ids: the share of word-vocabulary tokens not in its word list."""
  known = set(WORD.tokens)
  pieces = [p for r in records for t in (r["input"], r["target"])
            for p in vocabularies._WORD_RE.findall(t)]  # pylint: disable=protected-access
  return sum(p not in known for p in pieces) / len(pieces)


def test_unknown_tokens_warn_then_refuse(tmp_path):
  good = {"input": "Tom has 3 apples.", "target": "#### 3"}
  odd = {"input": "Tom has 3 zebras.", "target": "#### 3"}
  cases = {"clean": [good] * 20, "few": [good] * 9 + [odd],
           "most": [{"input": "x^2 + y^2 = z^2 ?", "target": "#### \u03c0"}] * 20}
  got = {}
  for name, records in cases.items():
    task = tasks.get_task("jsonl", WORD, train_path=_jsonl(tmp_path / f"{name}.jsonl", records))
    try:
      got[name] = tasks.check_unknown_tokens(task, "train")
    except UserError as e:
      got[name] = e
  assert _unknown_share(cases["clean"]) == 0 and got["clean"] is None
  share = _unknown_share(cases["few"])
  assert 0.01 < share < 0.1  # one unknown word among 10 records: warned, not refused
  assert isinstance(got["few"], str) and f"{100 * share:.1f}% of the tokens" in got["few"]
  assert "'zebras.'" in got["few"] and "python -m gkd.vocab" in got["few"]
  assert _unknown_share(cases["most"]) > 0.1
  assert isinstance(got["most"], UserError) and "to unk" in str(got["most"])
  assert "tasks.unknown_token_limits.refuse" in str(got["most"])
  # A vocabulary trained on that text has no unknowns there.
  from gkd import vocab as vocab_cli  # pylint: disable=g-import-not-at-top
  info = vocab_cli.build([str(tmp_path / "most.jsonl")], "sentencepiece", 64,
                         str(tmp_path / "sp"))
  trained = vocabularies.get_vocabulary("sentencepiece", info["path"])
  task = tasks.get_task("jsonl", trained, train_path=str(tmp_path / "most.jsonl"))
  assert tasks.check_unknown_tokens(task, "train") is None
