"""Tasks: vocabularies, SeqIO tasks, batch iterators, metrics.

The API the trainer uses (see docs/tasks.md):

  vocab = get_vocabulary()                       # Gin: tasks.get_vocabulary.*
  task = get_task("offline_arithmetic", vocab)   # a registered seqio.Task
  it = batch_iterator(task, "train", input_length=64, target_length=32,
                      batch_size=32, seed=0)     # .state() / .restore(state)
  for eb in eval_examples(task, "validation", ...): eb.batch, eb.valid, ...
  texts = decode(vocab, tokens, mask)
  scores = compute_metrics(task, targets, predictions)  # {"accuracy": ..}
  warning = check_unknown_tokens(task, "train")  # None, a warning, or UserError
"""

from typing import Mapping, Sequence

import gin

from gkd import startup

startup.import_tensorflow()  # first, so that TensorFlow never sees the accelerators

# Importing jsonl and paper registers their task builders.
from gkd.tasks import jsonl  # pylint: disable=unused-import
from gkd.tasks import paper  # pylint: disable=unused-import
from gkd.tasks.coverage import check_task as check_unknown_tokens
from gkd.tasks.features import decode
from gkd.tasks.pipeline import batch_iterator
from gkd.tasks.pipeline import BatchIterator
from gkd.tasks.pipeline import eval_examples
from gkd.tasks.pipeline import EvalBatch
from gkd.tasks.registry import BUILDERS
from gkd.tasks.registry import get_task
from gkd.tasks.registry import resolve
from gkd.tasks.vocabularies import get_vocabulary


def vocabulary_of(task):
  """The vocabulary a task (or registered task name) tokenises with."""
  return resolve(task).output_features["targets"].vocabulary


def compute_metrics(task, targets: Sequence[str], predictions: Sequence[str]
            ) -> dict[str, float]:
  """The task's metrics on raw target texts and decoded predictions."""
  task = resolve(task)
  post = task.postprocess_fn or (lambda x, **_: x)
  targets = [post(t, example=None, is_target=True) for t in targets]
  predictions = [post(p, example=None, is_target=False) for p in predictions]
  scores: dict[str, float] = {}
  for fn in task.metric_fns:
    scores.update({k: float(v) for k, v in fn(targets, predictions).items()})
  return scores


@gin.configurable(module="tasks")
def data_config(name: str = gin.REQUIRED, *, input_length: int = 64,
                target_length: int = 32, batch_size: int = 32,
                train_split: str = "train", eval_split: str = "validation"
                ) -> Mapping[str, object]:
  """The run's data settings, bound in configs/tasks/*.gin."""
  return dict(name=name, input_length=input_length,
              target_length=target_length, batch_size=batch_size,
              train_split=train_split, eval_split=eval_split)


__all__ = ["BUILDERS", "BatchIterator", "EvalBatch", "batch_iterator",
           "check_unknown_tokens", "data_config", "decode", "eval_examples", "get_task",
           "compute_metrics", "get_vocabulary", "vocabulary_of"]
