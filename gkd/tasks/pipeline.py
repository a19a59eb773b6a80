"""Deterministic, resumable batch iterators over a seqio Task.

The examples of a split form one stream: epoch 0's examples, then epoch 1's,
...; with `shuffle`, epoch e is ordered by a permutation that depends only on
(seed, e). A *global* batch is the next `batch_size` examples of the stream;
shard k of n takes rows [k*B/n, (k+1)*B/n), so every process count sees the
same global batches. The position in the stream, (epoch, position), is the
whole iterator state.

Two backends give the same contract:
  in memory  (default) the split's tokenised examples are read once into
             numpy; epoch order is `default_rng([seed, epoch]).permutation`.
             Restoring is O(1).
  streaming  for splits of more than `max_in_memory_examples` (WMT14 train):
             tf.data with a seeded `shuffle(buffer)` per epoch; restoring
             re-opens the epoch and skips `position` examples.
"""

import dataclasses
import functools
from typing import Any, Iterator, Mapping, Optional

import gin
import numpy as np
import seqio
import tensorflow as tf

from gkd.errors import UserError
from gkd.tasks import features
from gkd.tasks import registry

# inputs, targets, their texts, and the example's route ("" when it has none)
Example = tuple[np.ndarray, np.ndarray, str, str, str]
ROUTE_KEY = "teacher_route"  # int32[B] in batches of an iterator given `routes`


def _as_example(ex: dict) -> Example:
  text = lambda k: ex[k].decode("utf-8") if k in ex else ""
  return (np.asarray(ex["inputs"], np.int32), np.asarray(ex["targets"], np.int32),
          text("inputs_pretokenized"), text("targets_pretokenized"), text("route"))


def _dataset(task: seqio.Task, split: str) -> tf.data.Dataset:
  if split not in task.splits:
    raise UserError(f"task {task.name} has no split {split!r}; it has "
                    f"{list(task.splits)}")
  return task.get_dataset(sequence_length=None, split=split, shuffle=False,
                          num_epochs=1, use_cached=False)


def _columns(batch: dict) -> dict[str, list]:
  """A ragged batch of examples -> per-feature lists of numpy values."""
  cols = {}
  for key, x in batch.items():
    if isinstance(x, tf.RaggedTensor):
      cols[key] = np.split(x.values.numpy(), x.row_splits.numpy()[1:-1])
    else:
      cols[key] = list(x.numpy())
  return cols


@functools.lru_cache(maxsize=8)
def materialise(task_name: str, split: str) -> tuple[Example, ...]:
  """All examples of a split, in source order (cached per task and split)."""
  ds = _dataset(seqio.get_mixture_or_task(task_name), split)
  examples = []
  for batch in ds.ragged_batch(4096):  # per-example iteration is 10x slower
    cols = _columns(batch)
    examples += [_as_example({k: v[i] for k, v in cols.items()})
                 for i in range(len(cols["inputs"]))]
  return tuple(examples)


class _MemoryStream:
  """Examples by (epoch, position) from a materialised split."""

  def __init__(self, examples, seed: int, shuffle: bool):
    self.examples, self.seed, self.shuffle = examples, seed, shuffle

  @functools.lru_cache(maxsize=2)
  def order(self, epoch: int) -> np.ndarray:
    n = len(self.examples)
    if not self.shuffle:
      return np.arange(n)
    return np.random.default_rng([self.seed, epoch]).permutation(n)

  def get(self, epoch: int, position: int) -> Optional[Example]:
    if position >= len(self.examples):
      return None
    return self.examples[self.order(epoch)[position]]


class _TfStream:
  """Examples by (epoch, position) from tf.data, read sequentially."""

  def __init__(self, task: seqio.Task, split: str, seed: int, shuffle: bool,
               buffer_size: int):
    self.task, self.split, self.seed = task, split, seed
    self.shuffle, self.buffer_size = shuffle, buffer_size
    self._at, self._it = None, None

  def _open(self, epoch: int, position: int):
    ds = _dataset(self.task, self.split)
    if self.shuffle:
      seed = int(np.random.default_rng([self.seed, epoch]).integers(2**31))
      ds = ds.shuffle(self.buffer_size, seed=seed,
                      reshuffle_each_iteration=False)
    self._it = ds.skip(position).as_numpy_iterator()
    self._at = (epoch, position)

  def get(self, epoch: int, position: int) -> Optional[Example]:
    if self._at != (epoch, position):
      self._open(epoch, position)
    ex = next(self._it, None)
    self._at = (epoch, position + 1)
    return None if ex is None else _as_example(ex)


class BatchIterator:
  """Yields contract batches (features.KEYS -> int32 numpy) of one shard.

  `state()` is a JSON-serialisable dict; `restore(state)` makes the iterator
  yield exactly the batch the saved one would have yielded next.
  """

  def __init__(self, stream, converter: features.Converter, *, batch_size: int,
               shard_index: int, num_shards: int, repeat: bool,
               identity: dict[str, Any], routes: Optional[Mapping[str, int]] = None):
    if num_shards < 1 or not 0 <= shard_index < num_shards:
      raise UserError(f"shard_index={shard_index} is not in [0, {num_shards})")
    if batch_size < 1 or batch_size % num_shards:
      raise UserError(f"batch_size={batch_size} must be a positive multiple "
                      f"of the number of shards ({num_shards})")
    self._stream, self.converter, self._routes = stream, converter, routes
    self.batch_size, self.repeat, self._identity = batch_size, repeat, identity
    rows = batch_size // num_shards
    self._rows = slice(shard_index * rows, (shard_index + 1) * rows)
    self._epoch, self._position = 0, 0

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def next_example(self) -> Optional[Example]:
    """The stream's next example (crossing epochs when repeating), or None."""
    for _ in range(2):  # at most one epoch boundary per example
      ex = self._stream.get(self._epoch, self._position)
      if ex is not None:
        self._position += 1
        return ex
      if not self.repeat or self._position == 0:
        return None  # the end, or an empty split
      self._epoch, self._position = self._epoch + 1, 0
    return None

  def __next__(self) -> dict[str, np.ndarray]:
    saved = (self._epoch, self._position)
    examples = []
    for _ in range(self.batch_size):
      ex = self.next_example()
      if ex is None:  # without repeat, the last partial batch is dropped
        self._epoch, self._position = saved
        raise StopIteration
      examples.append(ex)
    mine = examples[self._rows]
    batch = self.converter.batch([ex[:2] for ex in mine])
    if self._routes is not None:
      batch[ROUTE_KEY] = np.asarray([route_index(self._routes, ex[4]) for ex in mine],
                                    np.int32)
    return batch

  def state(self) -> dict[str, Any]:
    return dict(self._identity, epoch=self._epoch, position=self._position)

  def restore(self, state: dict[str, Any]) -> None:
    for key, value in self._identity.items():
      if state.get(key) != value:
        raise UserError(f"data iterator state has {key}={state.get(key)!r} "
                        f"but this run has {value!r}; restore with the same "
                        "task data, split, seed, batch size and backend")
    self._epoch, self._position = int(state["epoch"]), int(state["position"])


def route_index(routes: Mapping[str, int], route: str) -> int:
  """The teacher index of an example's route; UserError if no teacher has that name."""
  if route not in routes:
    what = f"route {route!r}" if route else "no route"
    raise UserError(f"an example has {what} but the configured teachers are "
                    f"{sorted(routes)}; give every example a route naming one of them "
                    "(e.g. the JSONL field bound to tasks.jsonl_task.route_field)")
  return routes[route]


def routes_of(task, split: str) -> set[str]:
  """Every route name in a split (the examples are read into memory)."""
  task = registry.resolve(task)
  return {ex[4] for ex in materialise(task.name, split)}


@gin.configurable(module="tasks")
def stream_settings(max_in_memory_examples: int = 200_000,
                    shuffle_buffer_size: int = 10_000) -> tuple[int, int]:
  return max_in_memory_examples, shuffle_buffer_size


def _stream(task: seqio.Task, split: str, seed: int, shuffle: bool,
            in_memory: Optional[bool]):
  max_examples, buffer_size = stream_settings()
  if in_memory is None:
    size = task.num_input_examples(split) if split in task.splits else None
    in_memory = size is None or size <= max_examples
  if in_memory:
    return _MemoryStream(materialise(task.name, split), seed, shuffle)
  return _TfStream(task, split, seed, shuffle, buffer_size)


def batch_iterator(task, split: str, *, input_length: int, target_length: int,
                   batch_size: int, seed: int, shard_index: int = 0,
                   num_shards: int = 1, repeat: bool = True,
                   shuffle: Optional[bool] = None,
                   in_memory: Optional[bool] = None,
                   routes: Optional[Mapping[str, int]] = None) -> BatchIterator:
  """Training batches of a task (a seqio Task or registered name).

  batch_size is global; this shard gets batch_size // num_shards rows.
  shuffle defaults to `repeat` (training); without repeat the iterator stops
  at the end of the split, dropping a last partial batch. in_memory: None
  picks by split size (see stream_settings), True/False forces a backend.
  routes: route name -> teacher index; batches then also hold
  `teacher_route` int32[B] (an example whose route is not a key: UserError).
  """
  task = registry.resolve(task)
  shuffle = repeat if shuffle is None else shuffle
  vocab = task.output_features["targets"].vocabulary
  converter = features.converter_for(
      vocab, input_length, target_length,
      keep_input_end=registry.spec_of(task).keep_input_end)
  stream = _stream(task, split, seed, shuffle, in_memory)
  identity = dict(data=registry.data_key(task), split=split,
                  seed=int(seed), shuffle=bool(shuffle), batch_size=int(batch_size),
                  backend=type(stream).__name__.strip("_"))
  return BatchIterator(stream, converter,
                       batch_size=batch_size, shard_index=shard_index,
                       num_shards=num_shards, repeat=repeat, identity=identity,
                       routes=routes)


@dataclasses.dataclass(frozen=True)
class EvalBatch:
  """One evaluation batch: the contract arrays plus what metrics need.

  batch: features.KEYS -> int32[b, ...]; valid: int32[b], 0 on the rows that
  pad the last batch (they repeat a real row); inputs/targets: raw texts.
  """
  batch: dict[str, np.ndarray]
  valid: np.ndarray
  inputs: list[str]
  targets: list[str]


def eval_examples(task, split: str, *, input_length: int, target_length: int,
                  batch_size: int, shard_index: int = 0, num_shards: int = 1,
                  max_examples: Optional[int] = None) -> Iterator[EvalBatch]:
  """Every example of a split once, in order, in fixed-shape batches."""
  it = batch_iterator(task, split, input_length=input_length,
                      target_length=target_length, batch_size=1, seed=0,
                      repeat=False, shuffle=False)
  examples = []
  while max_examples is None or len(examples) < max_examples:
    ex = it.next_example()
    if ex is None:
      break
    examples.append(ex)
  if batch_size % num_shards or not 0 <= shard_index < num_shards:
    raise UserError(f"batch_size={batch_size} must be a multiple of "
                    f"num_shards={num_shards} > shard_index={shard_index}")
  rows = batch_size // num_shards
  mine = slice(shard_index * rows, (shard_index + 1) * rows)
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    valid = (np.arange(batch_size) < len(chunk)).astype(np.int32)
    chunk = (chunk + [chunk[0]] * (batch_size - len(chunk)))[mine]
    yield EvalBatch(batch=it.converter.batch([ex[:2] for ex in chunk]),
                    valid=valid[mine], inputs=[ex[2] for ex in chunk],
                    targets=[ex[3] for ex in chunk])
