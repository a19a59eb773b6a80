"""Evaluation: decode a split (greedy, sampling or beams), then the task's metrics."""

import dataclasses
from typing import Any, NamedTuple, Optional

import gin
import jax
import numpy as np
from jax.experimental import multihost_utils

from gkd import partitioning, sampling, tasks
from gkd.errors import UserError
from gkd.models.api import Model

DECODINGS = ("greedy", "sample", "beam")


@gin.configurable(module="gkd.train")
@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """How evaluation decodes (Gin: `gkd.train.EvalConfig.*`).

  Attributes:
    decoding: "greedy", "sample" (at `temperature`, `top_p`) or "beam".
    max_examples: evaluate the first this many examples of the split (None,
      the default: all of them).
    batch_size: global evaluation batch size.
    evaluate_teacher: also evaluate the teacher (once) into results.json.
  """

  decoding: str = "greedy"
  temperature: float = 1.0
  top_p: float = 1.0
  num_beams: int = 4
  length_alpha: float = 0.6
  max_examples: Optional[int] = None
  batch_size: int = 64
  seed: int = 0
  evaluate_teacher: bool = False

  def __post_init__(self):
    if self.decoding not in DECODINGS:
      raise UserError(f"unknown decoding {self.decoding!r}; choose one of {', '.join(DECODINGS)}")

  def decoder(self, max_new_tokens: int):
    """A jittable `(model, params, batch, rng) -> (tokens, mask)`."""
    if self.decoding == "beam":
      config = sampling.BeamConfig(max_new_tokens=max_new_tokens, num_beams=self.num_beams,
                                   alpha=self.length_alpha)
      return lambda m, p, b, r: sampling.beam_search(m, p, b, config)[:2]
    config = sampling.SampleConfig(max_new_tokens=max_new_tokens, temperature=self.temperature,
                                   top_p=self.top_p, greedy=self.decoding == "greedy")

    def decode(m, p, b, r):
      s = sampling.sample(m, p, b, r, config)
      return s.tokens, s.mask
    return decode


class Evaluation(NamedTuple):
  metrics: dict[str, float]  # the task's metrics
  examples: list[dict[str, str]]  # per example: input, target and prediction texts
  whole_split: bool  # False when max_examples left examples of the split out


def _has_example(task, data: dict, index: int) -> bool:
  """Whether the evaluation split has an example at `index` (0-based)."""
  it = tasks.batch_iterator(task, data["eval_split"], input_length=data["input_length"],
                            target_length=data["target_length"], batch_size=1, seed=0,
                            repeat=False, shuffle=False)
  it.restore(dict(it.state(), position=index))
  return it.next_example() is not None


def evaluate(model: Model, params: Any, data: dict, config: EvalConfig, mesh, rules
             ) -> Evaluation:
  """Decodes `data["eval_split"]` of `data["name"]` (its first `max_examples`) and scores it.

  Every process reads the whole split (evaluation sets are small), builds
  global arrays, decodes on the mesh and gathers the tokens back.
  """
  task = tasks.get_task(data["name"], tasks.get_vocabulary())
  vocab = tasks.vocabulary_of(task)
  batch_sharding = partitioning.logical_sharding(mesh, rules, "activation_batch", None)
  decode = config.decoder(data["target_length"])
  with partitioning.activation_sharding(mesh, rules):
    decode_fn = jax.jit(lambda p, b, r: decode(model, p, b, r))
    predictions, targets, inputs = [], [], []
    rng = jax.random.PRNGKey(config.seed)
    for i, eb in enumerate(tasks.eval_examples(
        task, data["eval_split"], input_length=data["input_length"],
        target_length=data["target_length"], batch_size=config.batch_size,
        max_examples=config.max_examples)):
      batch = {k: jax.make_array_from_callback(v.shape, batch_sharding, lambda idx, v=v: v[idx])
               for k, v in eb.batch.items()}
      tokens, mask = decode_fn(params, batch, jax.random.fold_in(rng, i))
      tokens, mask = multihost_utils.process_allgather((tokens, mask), tiled=True)
      keep = np.asarray(eb.valid) > 0
      predictions += [t for t, k in zip(tasks.decode(vocab, np.asarray(tokens),
                                                     np.asarray(mask)), keep) if k]
      targets += [t for t, k in zip(eb.targets, keep) if k]
      inputs += [t for t, k in zip(eb.inputs, keep) if k]
  if not targets:
    raise UserError(f"the {data['eval_split']!r} split of {data['name']} has no examples")
  metrics = tasks.compute_metrics(task, targets, predictions)
  examples = [dict(input=i, target=t, prediction=p)
              for i, t, p in zip(inputs, targets, predictions)]
  whole = (config.max_examples is None or len(targets) < config.max_examples
           or not _has_example(task, data, len(targets)))
  return Evaluation(metrics, examples, whole)
