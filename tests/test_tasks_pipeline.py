"""Tests for gkd.tasks.features and gkd.tasks.pipeline: the batch contract,
determinism, epochs, sharding, and state save/restore."""

import json

import numpy as np
import pytest

from gkd import tasks
from gkd.errors import UserError
from gkd.tasks import features

LENGTHS = dict(input_length=64, target_length=32)


@pytest.fixture(scope="module")
def vocab():
  return tasks.get_vocabulary("word")


@pytest.fixture(scope="module")
def small(vocab):
  return tasks.get_task("offline_arithmetic", vocab, num_train=10, num_eval=7)


def test_converter_pads_left_and_right_with_bos_and_eos():
  conv = features.Converter(input_length=5, target_length=4, eos_id=1,
                            pad_id=0, bos_id=3)
  got = conv.batch([([7, 8], [9]), ([5, 6, 7, 8, 9, 10], [4, 5, 6, 7, 8])])
  np.testing.assert_array_equal(got["input_tokens"], [[0, 0, 3, 7, 8],
                                                      [3, 5, 6, 7, 8]])
  np.testing.assert_array_equal(got["input_mask"], [[0, 0, 1, 1, 1],
                                                    [1, 1, 1, 1, 1]])
  # EOS when it fits; a too-long target is cut without EOS.
  np.testing.assert_array_equal(got["target_tokens"], [[9, 1, 0, 0],
                                                       [4, 5, 6, 7]])
  np.testing.assert_array_equal(got["target_mask"], [[1, 1, 0, 0],
                                                     [1, 1, 1, 1]])
  assert all(v.dtype == np.int32 for v in got.values())


def test_converter_t5_inputs_end_with_eos_and_prompts_keep_their_end():
  t5 = features.Converter(input_length=4, target_length=2, eos_id=1,
                          input_eos_id=1)
  np.testing.assert_array_equal(t5.input_row([5, 6, 7, 8]), [5, 6, 7, 1])
  prompt = features.Converter(input_length=4, target_length=2, eos_id=1,
                              bos_id=3, keep_input_end=True)
  np.testing.assert_array_equal(prompt.input_row([5, 6, 7, 8]), [3, 6, 7, 8])
  # An empty target is just EOS; id 0 is never special.
  conv = features.Converter(input_length=3, target_length=2, eos_id=1,
                            pad_id=0)
  got = conv.batch([([0], [])])
  np.testing.assert_array_equal(got["input_mask"], [[0, 0, 1]])
  np.testing.assert_array_equal(got["target_tokens"], [[1, 0]])
  np.testing.assert_array_equal(got["target_mask"], [[1, 0]])
  with pytest.raises(UserError, match="empty input"):
    conv.batch([([], [5])])
  with pytest.raises(UserError, match="no room"):
    features.Converter(input_length=1, target_length=2, eos_id=1, bos_id=3)


def test_batches_decode_to_the_task_texts(vocab):
  task = tasks.get_task("offline_arithmetic", vocab)
  batch = next(tasks.batch_iterator(task, "train", batch_size=8, seed=0,
                                    **LENGTHS))
  assert {k: v.shape for k, v in batch.items()} == {
      "input_tokens": (8, 64), "input_mask": (8, 64),
      "target_tokens": (8, 32), "target_mask": (8, 32)}
  rows = np.arange(8)
  first = 64 - batch["input_mask"].sum(1)
  assert (batch["input_tokens"][rows, first] == vocab.bos_id).all()
  last = batch["target_mask"].sum(1) - 1
  assert (batch["target_tokens"][rows, last] == vocab.eos_id).all()
  pairs = set(tasks.offline.generate("arithmetic", "train"))
  inputs = tasks.decode(vocab, batch["input_tokens"], batch["input_mask"])
  targets = tasks.decode(vocab, batch["target_tokens"], batch["target_mask"])
  assert all(pair in pairs for pair in zip(inputs, targets))


def _drain(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(a[k], b[k]) for k in features.KEYS)


def test_epochs_are_seeded_permutations(small, vocab):
  it = tasks.batch_iterator(small, "train", batch_size=5, seed=1, **LENGTHS)
  epochs = [[tuple(r) for b in _drain(it, 2) for r in b["target_tokens"]]
            for _ in range(3)]
  assert all(len(set(e)) == len(e) == 10 for e in epochs)
  assert set(epochs[0]) == set(epochs[1]) == set(epochs[2])
  assert epochs[0] != epochs[1]  # reshuffled per epoch
  again = tasks.batch_iterator(small, "train", batch_size=5, seed=1, **LENGTHS)
  other = tasks.batch_iterator(small, "train", batch_size=5, seed=2, **LENGTHS)
  assert _same(next(again), _drain(tasks.batch_iterator(
      small, "train", batch_size=5, seed=1, **LENGTHS), 1)[0])
  assert not _same(next(other), _drain(tasks.batch_iterator(
      small, "train", batch_size=5, seed=1, **LENGTHS), 1)[0])


@pytest.mark.parametrize("skip", [0, 1, 3, 7])
def test_restore_resumes_at_the_same_example(small, skip):
  # batch 4 over 10 examples: batches straddle epoch boundaries.
  make = lambda: tasks.batch_iterator(small, "train", batch_size=4, seed=5,
                                      **LENGTHS)
  it = make()
  _drain(it, skip)
  state = json.loads(json.dumps(it.state()))
  expected = _drain(it, 4)
  resumed = make()
  resumed.restore(state)
  assert all(_same(a, b) for a, b in zip(expected, _drain(resumed, 4)))


def test_restore_rejects_another_run(small):
  it = tasks.batch_iterator(small, "train", batch_size=4, seed=5, **LENGTHS)
  other = tasks.batch_iterator(small, "train", batch_size=4, seed=6, **LENGTHS)
  with pytest.raises(UserError, match="seed"):
    other.restore(it.state())


def test_shards_split_the_global_batch(small):
  whole = next(tasks.batch_iterator(small, "train", batch_size=4, seed=0,
                                    **LENGTHS))
  parts = [next(tasks.batch_iterator(small, "train", batch_size=4, seed=0,
                                     shard_index=k, num_shards=2, **LENGTHS))
           for k in range(2)]
  for key in features.KEYS:
    np.testing.assert_array_equal(
        whole[key], np.concatenate([p[key] for p in parts]))
  with pytest.raises(UserError, match="multiple"):
    tasks.batch_iterator(small, "train", batch_size=3, seed=0, num_shards=2,
                         **LENGTHS)


def test_no_repeat_stops_and_eval_covers_every_example_once(small, vocab):
  it = tasks.batch_iterator(small, "train", batch_size=4, seed=0,
                            repeat=False, **LENGTHS)
  assert len(list(it)) == 2  # 10 examples: the partial batch is dropped
  evals = list(tasks.eval_examples(small, "validation", batch_size=4,
                                   **LENGTHS))
  assert [int(e.valid.sum()) for e in evals] == [4, 3]
  targets = [t for e in evals for t, v in zip(e.targets, e.valid) if v]
  assert targets == [t for _, t in tasks.offline.generate(
      "arithmetic", "validation", num_train=10, num_eval=7)]
  decoded = tasks.decode(vocab, evals[0].batch["target_tokens"],
                         evals[0].batch["target_mask"])
  assert decoded == evals[0].targets
  assert tasks.compute_metrics(small, targets, targets) == {"accuracy": 100.0, "exact_match": 100.0}


def test_unknown_task_and_split_are_user_errors(vocab, small):
  with pytest.raises(UserError, match="unknown task"):
    tasks.get_task("no_such_task", vocab)
  with pytest.raises(UserError, match="does not take"):
    tasks.get_task("offline_arithmetic", vocab, num_shots=3)
  with pytest.raises(UserError, match="no split"):
    next(tasks.batch_iterator(small, "dev", batch_size=2, seed=0, **LENGTHS))


def test_streaming_backend_is_seeded_and_resumable(small):
  make = lambda seed=5: tasks.batch_iterator(
      small, "train", batch_size=4, seed=seed, in_memory=False, **LENGTHS)
  it = make()
  assert it.state()["backend"] == "TfStream"
  batches = _drain(it, 5)  # 20 examples: two shuffled epochs
  rows = [tuple(r) for b in batches for r in b["target_tokens"]]
  assert len(set(rows[:10])) == 10 and set(rows[:10]) == set(rows[10:])
  assert rows[:10] != rows[10:]
  assert all(_same(a, b) for a, b in zip(batches, _drain(make(), 5)))
  assert not _same(batches[0], next(make(seed=6)))
  for skip in (1, 2, 3):
    state = json.loads(json.dumps(_drain_state(make(), skip)))
    resumed = make()
    resumed.restore(state)
    assert all(_same(a, b) for a, b in zip(batches[skip:], _drain(resumed, 2)))


def _drain_state(it, n):
  _drain(it, n)
  return it.state()


def test_unshuffled_backends_agree(small):
  kwargs = dict(batch_size=5, seed=0, shuffle=False, repeat=False, **LENGTHS)
  memory = list(tasks.batch_iterator(small, "train", in_memory=True, **kwargs))
  stream = list(tasks.batch_iterator(small, "train", in_memory=False, **kwargs))
  assert len(memory) == len(stream) == 2
  assert all(_same(a, b) for a, b in zip(memory, stream))


def test_sharded_eval_batches_concatenate_to_the_whole(small):
  kwargs = dict(split="validation", batch_size=4, **LENGTHS)
  whole = list(tasks.eval_examples(small, **kwargs))
  parts = [list(tasks.eval_examples(small, shard_index=k, num_shards=2,
                                    **kwargs)) for k in range(2)]
  for i, full in enumerate(whole):
    for key in features.KEYS:
      np.testing.assert_array_equal(
          full.batch[key], np.concatenate([p[i].batch[key] for p in parts]))
    np.testing.assert_array_equal(
        full.valid, np.concatenate([p[i].valid for p in parts]))
    assert full.targets == parts[0][i].targets + parts[1][i].targets
