"""How much of a task's text its vocabulary cannot represent (maps to unk).

A vocabulary that misses the task's symbols trains the model to emit unk and
makes every metric on decoded text meaningless (the word vocabulary, made
for the offline tasks, maps most of another task's words to unk). Before a
run writes anything, `check_task` counts unk ids in the first examples of the
training split: above `unknown_token_limits.warn` (1%) of the tokens it warns,
above `refuse` (10%) it refuses with a UserError: so many unknowns are a
wrong vocabulary, not rare symbols. Both name the most frequent unknown words
and how to build a vocabulary for the data (`python -m gkd.vocab`).
"""

import collections
from typing import Optional, Sequence

import gin
import numpy as np
import seqio

from gkd.errors import UserError

FIX = ("train a vocabulary on this data: python -m gkd.vocab --jsonl=<train.jsonl> "
       "--kind=sentencepiece --size=N --out=DIR (docs/tasks.md)")


def unk_id(vocab: seqio.Vocabulary) -> Optional[int]:
  """The vocabulary's unk id, or None when it has none (byte-level BPE, bytes)."""
  try:
    value = vocab.unk_id
  except (AttributeError, NotImplementedError):
    return None
  return None if value is None or value < 0 else int(value)


def unknown_fraction(vocab: seqio.Vocabulary, texts: Sequence[str]) -> float:
  """The fraction of the tokens of `texts` that `vocab` encodes as unk (0 without an unk)."""
  unk = unk_id(vocab)
  if unk is None:
    return 0.0
  ids = [np.asarray(vocab.encode(t)) for t in texts]
  total = sum(len(x) for x in ids)
  return float(sum(int(np.sum(x == unk)) for x in ids)) / max(total, 1)


def unknown_words(vocab: seqio.Vocabulary, texts: Sequence[str], limit: int = 5) -> list[str]:
  """The most frequent whitespace-separated words of `texts` whose encoding holds unk."""
  unk = unk_id(vocab)
  if unk is None:
    return []
  counts = collections.Counter(w for t in texts for w in t.split())
  bad = [w for w, _ in counts.most_common() if unk in vocab.encode(w)]
  return bad[:limit]


@gin.configurable(module="tasks")
def unknown_token_limits(warn: float = 0.01, refuse: float = 0.1) -> tuple[float, float]:
  """Fractions of unk tokens above which a run warns, and refuses to start."""
  return warn, refuse


def check_task(task: seqio.Task, split: str, max_examples: int = 1000) -> Optional[str]:
  """A one-line warning if the split's first examples hold too many unk tokens, else None.

  Raises UserError above the refusal limit.
  """
  from gkd.tasks import pipeline  # pylint: disable=g-import-not-at-top
  vocab = task.output_features["targets"].vocabulary
  unk = unk_id(vocab)
  if unk is None:
    return None
  it = pipeline.batch_iterator(task, split, input_length=8, target_length=8, batch_size=1,
                               seed=0, repeat=False, shuffle=False)
  unknown = total = count = 0
  texts = []
  for count in range(max_examples):
    ex = it.next_example()
    if ex is None:
      break
    inputs, targets, input_text, target_text = ex[:4]
    found = int(np.sum(inputs == unk)) + int(np.sum(targets == unk))
    unknown, total = unknown + found, total + len(inputs) + len(targets)
    if found:
      texts += [input_text, target_text]
  else:
    count = max_examples
  fraction = unknown / max(total, 1)
  warn, refuse = unknown_token_limits()
  if fraction <= warn:
    return None
  words = ", ".join(repr(w) for w in unknown_words(vocab, texts[:200]))
  what = (f"the vocabulary maps {100 * fraction:.1f}% of the tokens of the first {count} "
          f"examples of {task.name.rsplit('_', 1)[0]}'s {split!r} split to unk (e.g. "
          f"{words or 'unknown characters'})")
  if fraction > refuse:
    raise UserError(f"{what}, above tasks.unknown_token_limits.refuse = {refuse}; {FIX}")
  return f"{what}; {FIX}"
