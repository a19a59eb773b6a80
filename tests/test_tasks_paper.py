"""Tests for gkd.tasks.paper: XSum, WMT14 en->de and GSM8K through
tfds.testing.mock_data to model-ready batches, for a SentencePiece model
trained here and a Hugging Face tokenizer built here. Nothing downloads."""

import re
import socket

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from gkd import tasks
from gkd.errors import UserError
from gkd.tasks import paper
from gkd.tasks import vocabularies
from test_vocab import make_hf_tokenizer
from test_vocab import make_sentencepiece

QUESTION = "Natalia sold 48 clips in April and half as many in May. How many?"
ANSWER = ("In May she sold 48/2 = <<48/2=24>>24 clips.\n"
          "In total 48+24 = <<48+24=72>>72.\n#### 72")
MOCK = {
    "xsum": {"document": ["The quick brown fox jumps over the lazy dog. " * 3,
                          "A summary states the key facts."],
             "summary": ["A fox jumps.", "Facts."]},
    "wmt14_translate": {"en": ["the house is small.", "the quick fox."],
                        "de": ["das Haus ist klein.", "der schnelle Fuchs."]},
    "gsm8k": {"question": [QUESTION, "How many clips did she sell?"],
              "answer": [ANSWER, "She sold 3 + 4 = <<3+4=7>>7.\n#### 7"],
              "annotation": ["", ""], "short_answer": ["72", "7"]},
}


def _as_dataset(builder, split, **kwargs):
  del split, kwargs
  return tf.data.Dataset.from_tensor_slices(MOCK[builder.name])


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  """Records (and refuses) every connection attempt during a test."""
  attempts = []

  def refuse(self, address, *args):
    del self, args
    attempts.append(address)
    raise OSError("network access in a test")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket.socket, "connect_ex", refuse)
  yield
  assert not attempts, f"tried to reach {attempts}"


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("vocab")
  return {"sentencepiece": vocabularies.get_vocabulary(
              "sentencepiece", make_sentencepiece(tmp)),
          "hf": vocabularies.get_vocabulary(
              "hf", make_hf_tokenizer(tmp / "hf"))}


@pytest.fixture
def mock_tfds(tmp_path):
  with tfds.testing.mock_data(as_dataset_fn=_as_dataset,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    yield str(tmp_path)


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
@pytest.mark.parametrize("name,split,source,target", [
    ("xsum", "validation", "summarize: " + MOCK["xsum"]["document"][1],
     "Facts."),
    ("wmt14_en_de", "test", "translate English to German: the quick fox.",
     "der schnelle Fuchs."),
])
def test_task_to_model_batches(mock_tfds, vocabs, kind, name, split, source,
                               target):
  vocab = vocabs[kind]
  task = tasks.get_task(name, vocab, data_dir=mock_tfds)
  batch = next(tasks.batch_iterator(task, "train", input_length=48,
                                    target_length=16, batch_size=2, seed=0))
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "input_tokens": ((2, 48), np.int32), "input_mask": ((2, 48), np.int32),
      "target_tokens": ((2, 16), np.int32), "target_mask": ((2, 16), np.int32)}
  (ev,) = tasks.eval_examples(task, split, input_length=256, target_length=16,
                              batch_size=2)
  assert ev.inputs[1] == source and ev.targets[1] == target
  row = ev.batch["input_tokens"][1][ev.batch["input_mask"][1] == 1].tolist()
  affixes = ([vocab.bos_id] if kind == "hf" else []) + vocab.encode(source)
  assert row == affixes + ([vocab.eos_id] if kind == "sentencepiece" else [])
  decoded = tasks.decode(vocab, ev.batch["target_tokens"],
                         ev.batch["target_mask"])
  assert decoded[1] == target
  assert ev.batch["target_tokens"][1][len(vocab.encode(target))] == vocab.eos_id


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
@pytest.mark.parametrize("num_shots", [0, 4])
def test_gsm8k_prompts_and_targets(mock_tfds, vocabs, kind, num_shots):
  vocab = vocabs[kind]
  task = tasks.get_task("gsm8k", vocab, data_dir=mock_tfds,
                        num_shots=num_shots)
  (ev,) = tasks.eval_examples(task, "test", input_length=32, target_length=64,
                              batch_size=2)
  assert ev.inputs[0].endswith(f"Q: {QUESTION}\nA:")
  assert ev.inputs[0].count("Q: ") == num_shots + 1
  assert ev.targets[0] == (" In May she sold 48/2 = 24 clips.\n"
                           "In total 48+24 = 72.\n#### 72")
  # Truncated prompts keep their end (the question) between BOS/EOS affixes.
  row = ev.batch["input_tokens"][0]
  assert ev.batch["input_mask"][0].all()
  bos, eos = ([vocab.bos_id], []) if kind == "hf" else ([], [vocab.eos_id])
  assert row.tolist() == bos + vocab.encode(ev.inputs[0])[-31:] + eos
  scores = tasks.compute_metrics(
      task, ev.targets, ["#### 72\n\nQ: next question? #### 5", "#### 8"])
  assert scores == {"accuracy": 50.0, "exact_match": 50.0}


def test_fewshot_task_and_bad_shots(mock_tfds, vocabs):
  vocab = vocabs["hf"]
  few = tasks.get_task("gsm8k_fewshot", vocab, data_dir=mock_tfds)
  assert few.name != tasks.get_task("gsm8k", vocab, data_dir=mock_tfds).name
  with pytest.raises(UserError, match="num_shots"):
    tasks.get_task("gsm8k", vocab, data_dir=mock_tfds, num_shots=9)


def test_fewshot_exemplars_are_consistent():
  for _, answer in paper.GSM8K_SHOTS:
    for lhs, rhs in re.findall(r"([\d+\-*/ ]+)= \$?(\d+)", answer):
      assert eval(lhs) == int(rhs)  # pylint: disable=eval-used
    assert tasks.metrics.extract_answer(answer) == answer.split("#### ")[1]


def test_missing_dataset_is_a_user_error(tmp_path, vocabs):
  task = tasks.get_task("xsum", vocabs["hf"], data_dir=str(tmp_path))
  with pytest.raises(UserError, match="not prepared"):
    next(tasks.batch_iterator(task, "train", input_length=8, target_length=8,
                              batch_size=1, seed=0))
