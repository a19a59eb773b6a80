"""Rewards for the RL term of GKD (arXiv 2306.13649, Eq. 5): a task's own metric per sample.

`task_reward(task)` returns a host function `(sample_tokens, sample_mask, batch)
-> float32[B]` that decodes each student sample and the dataset's target and
scores the pair with the task's metric (e.g. GSM8K exact match on the final
number), scaled to [0, 1].
"""

from typing import Optional

import gin
import numpy as np

from gkd import tasks
from gkd.errors import UserError


@gin.configurable(module="gkd.train")
def task_reward(task, metric: Optional[str] = None):
  """The per-example reward of `task` (a seqio Task or name); `metric` picks one of its metrics."""
  task = tasks.resolve(task)
  vocab = tasks.vocabulary_of(task)
  probe = tasks.compute_metrics(task, ["1"], ["1"])
  name = metric or next(iter(probe))
  if name not in probe:
    raise UserError(f"task {task.name} has no metric {name!r}; choose one of {sorted(probe)}")

  def reward(tokens, mask, batch) -> np.ndarray:
    predictions = tasks.decode(vocab, np.asarray(tokens), np.asarray(mask))
    targets = tasks.decode(vocab, np.asarray(batch["target_tokens"]),
                           np.asarray(batch["target_mask"]))
    return np.asarray([tasks.compute_metrics(task, [t], [p])[name] / 100.0
                       for t, p in zip(targets, predictions)], np.float32)

  return reward
