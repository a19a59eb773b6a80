"""Tests for gkd.tasks.vocabularies: the word vocabulary (TF == Python), a
Hugging Face tokenizer.json built here, a SentencePiece model trained here."""

import json

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
