"""Task registration keyed by vocabulary, and the built-in offline tasks.

A task *builder* (Gin-configurable, one per task name) returns a `TaskSpec`:
a raw-text source plus text preprocessors that yield string features
"inputs"/"targets", its metrics and postprocessor. `get_task(name, vocab)`
registers "<name>_<hash>" in `seqio.TaskRegistry` once, the hash covering
the vocabulary and the builder's settings; tokenisation adds no EOS/BOS
(features.py does).
"""

import dataclasses
import functools
import hashlib
import inspect
import json
from typing import Any, Callable, Mapping, Optional, Sequence

import gin
import seqio
import tensorflow as tf

from gkd.errors import UserError
from gkd.tasks import metrics as metrics_lib
from gkd.tasks import offline
from gkd.tasks import vocabularies


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """What a builder returns.

  config identifies the data (text and tokenisation), location where it is
  read from; both key the registration, only config keys iterator states,
  so a run resumes after its data moved.
  """
  source: seqio.DataSource
  metric_fns: Sequence[Callable[..., Mapping[str, float]]]
  config: Mapping[str, Any]
  location: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  preprocessors: Sequence[Callable[..., tf.data.Dataset]] = ()
  postprocess_fn: Callable[..., Any] = metrics_lib.strip
  keep_input_end: bool = False  # truncate prompts from the front


BUILDERS: dict[str, Callable[[], TaskSpec]] = {}
_SPECS: dict[str, TaskSpec] = {}
_DATA_KEYS: dict[str, str] = {}


def _hash(*parts) -> str:
  blob = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha1(blob.encode()).hexdigest()[:10]


def register_builder(name: str):
  def wrap(fn):
    BUILDERS[name] = fn
    return fn
  return wrap


def get_task(name: str, vocabulary: Optional[seqio.Vocabulary] = None,
             **overrides) -> seqio.Task:
  """The seqio Task for `name` tokenised with `vocabulary` (default: Gin's).

  `overrides` are passed to the task's builder (else Gin's bindings apply).
  """
  if name not in BUILDERS:
    raise UserError(f"unknown task {name!r}; known tasks: {sorted(BUILDERS)}")
  vocab = vocabularies.get_vocabulary() if vocabulary is None else vocabulary
  builder = BUILDERS[name]
  settings = inspect.signature(builder)
  try:
    settings.bind(**overrides)
  except TypeError as e:
    raise UserError(f"task {name!r} does not take {sorted(overrides)} ({e}); "
                    f"its settings: {list(settings.parameters)}") from None
  spec = builder(**overrides)
  key = _hash(name, dict(spec.config), vocabularies.fingerprint(vocab))
  task_name = f"{name}_{_hash(key, dict(spec.location))}"
  if task_name not in seqio.TaskRegistry.names():
    feature = seqio.Feature(vocab, add_eos=False, dtype=tf.int32)
    tokenize = functools.partial(seqio.preprocessors.tokenize,
                                 copy_pretokenized=True, with_eos=False)
    seqio.TaskRegistry.add_provider(task_name, seqio.Task(
        task_name, source=spec.source,
        output_features={"inputs": feature, "targets": feature},
        preprocessors=list(spec.preprocessors) + [tokenize],
        postprocess_fn=spec.postprocess_fn, metric_fns=list(spec.metric_fns)))
    _SPECS[task_name] = spec
    _DATA_KEYS[task_name] = f"{name}_{key}"
  return seqio.get_mixture_or_task(task_name)


def resolve(task) -> seqio.Task:
  """A seqio Task from a Task or a registered task name."""
  if isinstance(task, seqio.Task):
    return task
  if isinstance(task, str) and task in seqio.TaskRegistry.names():
    return seqio.get_mixture_or_task(task)
  raise UserError(f"{task!r} is not a registered task; call "
                  "gkd.tasks.get_task(name, vocabulary) first")


def data_key(task: seqio.Task) -> str:
  """Names the task's data and tokenisation, wherever the data lies."""
  return _DATA_KEYS.get(task.name, task.name)


def spec_of(task: seqio.Task) -> TaskSpec:
  return _SPECS.get(task.name) or TaskSpec(None, task.metric_fns, {})


def text_source(splits: Mapping[str, Callable[[], Sequence[tuple[str, ...]]]]
                ) -> seqio.DataSource:
  """A source of {"inputs", "targets"} strings from in-memory pairs.

  Records of three strings also carry a "route" feature (the teacher that
  scores the example when several are configured; see gkd/train/teachers.py).
  """

  def dataset_fn(split: str, shuffle_files: bool, seed=None):
    del shuffle_files, seed
    records = splits[split]()
    columns = {"inputs": [r[0] for r in records], "targets": [r[1] for r in records]}
    if records and len(records[0]) > 2:
      columns["route"] = [r[2] for r in records]
    return tf.data.Dataset.from_tensor_slices(
        {k: tf.constant(v, tf.string) for k, v in columns.items()})

  return seqio.FunctionDataSource(dataset_fn, splits=tuple(splits))


def _with_routes(read: Callable[[], Sequence[tuple[str, str]]],
                 route: Callable[[tuple[str, str]], str]) -> list[tuple[str, str, str]]:
  return [(*pair, route(pair)) for pair in read()]


def _offline(kind: str, metric_fns, seed: int, num_train: int, num_eval: int,
             route_by: Optional[str] = None, **params) -> TaskSpec:
  config = dict(kind=kind, seed=seed, num_train=num_train, num_eval=num_eval,
                **params)
  splits = {s: functools.partial(offline.generate, kind, s, seed=seed,
                                 num_train=num_train, num_eval=num_eval,
                                 **params) for s in offline.SPLITS}
  if route_by is not None:
    if (kind, route_by) not in offline.ROUTES:
      choices = sorted(by for k, by in offline.ROUTES if k == kind) or ["none"]
      raise UserError(f"route_by={route_by!r} is not a route of the {kind} task; "
                      f"choose one of {', '.join(choices)}")
    config["route_by"] = route_by
    splits = {s: functools.partial(_with_routes, read, offline.ROUTES[kind, route_by])
              for s, read in splits.items()}
  return TaskSpec(source=text_source(splits), metric_fns=metric_fns,
                  config=config)


@register_builder("offline_arithmetic")
@gin.configurable(module="tasks")
def offline_arithmetic(seed: int = 0, num_train: int = 20000,
                       num_eval: int = 500, min_steps: int = 1,
                       max_steps: int = 2, max_operand: int = 9,
                       max_value: int = 30, multiply: bool = False,
                       step_order: str = "given", label_noise: float = 0.0,
                       label_noise_kind: str = "slip",
                       route_by: Optional[str] = None) -> TaskSpec:
  """Word problems -> "a + b = c. ... #### n"; accuracy and exact match of the final answer.

  `step_order`: 'given' (one solution per problem) or 'any' (additions and
  subtractions solved in a random valid order: several correct outputs).
  `label_noise`: the fraction of training targets degraded (validation and
  test stay correct): `label_noise_kind` 'slip' (one arithmetic slip, carried
  on) or 'answer_only' (the chain of thought dropped: "#### n").
  `route_by='steps'` gives each example the route "<n>_steps" (its number of
  steps), for teachers routed per example (gkd/train/teachers.py).

  The defaults suit a ~1M-parameter model on CPU (about half the validation
  set right after ~500 steps of batch 32); raise max_steps / max_value for
  a harder task.
  """
  if step_order not in offline.STEP_ORDERS:
    raise UserError(f"step_order={step_order!r}; choose one of {', '.join(offline.STEP_ORDERS)}")
  kinds = sorted(k for kind, k in offline.DEGRADATIONS if kind == "arithmetic")
  if label_noise_kind not in kinds:
    raise UserError(f"label_noise_kind={label_noise_kind!r}; choose one of {', '.join(kinds)}")
  if isinstance(label_noise, bool) or not (isinstance(label_noise, (int, float))
                                           and 0.0 <= label_noise <= 1.0):
    raise UserError(f"label_noise={label_noise!r} must be a fraction in [0, 1]")
  return _offline("arithmetic", [metrics_lib.accuracy, metrics_lib.exact_match], seed, num_train,
                  num_eval, min_steps=min_steps, max_steps=max_steps,
                  max_operand=max_operand, max_value=max_value,
                  multiply=multiply, step_order=step_order, label_noise=label_noise,
                  label_noise_kind=label_noise_kind, route_by=route_by)


@register_builder("offline_translation")
@gin.configurable(module="tasks")
def offline_translation(seed: int = 0, num_train: int = 20000,
                        num_eval: int = 500, max_clauses: int = 2,
                        max_adjectives: int = 2) -> TaskSpec:
  """SVO English-like -> SOV invented language with case/agreement; BLEU."""
  return _offline("translation", [metrics_lib.bleu], seed, num_train,
                  num_eval, max_clauses=max_clauses,
                  max_adjectives=max_adjectives)


@register_builder("offline_summarization")
@gin.configurable(module="tasks")
def offline_summarization(seed: int = 0, num_train: int = 20000,
                          num_eval: int = 500, min_facts: int = 2,
                          max_facts: int = 3, num_distractors: int = 3
                          ) -> TaskSpec:
  """A report about one person among distractors -> their facts; ROUGE."""
  return _offline("summarization", [metrics_lib.rouge], seed, num_train,
                  num_eval, min_facts=min_facts, max_facts=max_facts,
                  num_distractors=num_distractors)
