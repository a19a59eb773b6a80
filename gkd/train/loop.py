"""The run: set up (validate everything, then touch the model directory), train, evaluate.

`run(mode)` is what `python -m gkd.main` calls. Everything that can be wrong
with the input (Gin values, data files, checkpoints, vocabularies, a model
directory holding another model) is checked before anything is written.

Model directory layout:
    config.gin        the operative Gin config
    run.json          what this directory trains (checked on restart)
    checkpoints/      Orbax: <step>/{state, data}
    train/, eval/     TensorBoard events
    export/           the final student (gkd checkpoint: model_config.json + params)
    results.json      final eval metrics and a config summary
    eval_predictions.json   the first 50 evaluated examples: input, target, prediction
                      (teacher_eval_predictions.json likewise for the teacher)

NUM_STEPS = 0 trains nothing: `train` saves and exports the initial student,
`train_and_eval` also evaluates it (e.g. an imported checkpoint as a baseline).
"""

import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from typing import Any, Optional, Union

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.sharding import NamedSharding, PartitionSpec

from gkd import models, partitioning, tasks
from gkd.errors import RunStopped, UserError
from gkd.models import layers, registry
from gkd.tasks import alignment, pipeline
from gkd.train import checkpoints, evaluation, optimizer, rewards, step as step_lib
from gkd.train import teachers as teachers_lib
from gkd.train.sources import ModelSource
from gkd.train.teachers import Teachers

MODES = ("train", "eval", "train_and_eval")


@gin.configurable(module="gkd.train")
@dataclasses.dataclass(frozen=True)
class Parallelism:
  """The device mesh and the logical-axis rule set ('data', 'fsdp' or 'fsdp_tp')."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  rules: str = "data"

  def mesh_and_rules(self):
    return (partitioning.make_mesh(self.data, self.fsdp, self.tensor),
            partitioning.standard_logical_axis_rules(self.rules))


@dataclasses.dataclass
class Setup:
  """Everything a run needs, built and validated before the model directory is touched."""

  model_dir: str
  data: dict
  mesh: Any
  rules: Any
  student: Any
  params: Any
  param_shardings: Any
  teacher: Any  # a Model, or a tuple of them (several teachers), or None
  teacher_params: Any  # likewise: params or a tuple of params
  teacher_shardings: Any
  iterator: Any
  fingerprint: dict
  batch_shardings: Any = None  # {batch key: NamedSharding}
  teacher_names: tuple = ()  # one per teacher model
  combination: Any = None  # teachers.Combination
  aligner: Any = None  # alignment.Aligner of a teacher with another tokenizer
  eval_config: Any = None  # evaluation.EvalConfig, built once per run
  writers: dict = dataclasses.field(default_factory=dict)  # tag -> _Writer

  def writer(self, tag: str) -> "_Writer":
    """One TensorBoard writer per tag for the whole run."""
    if tag not in self.writers:
      self.writers[tag] = _Writer(os.path.join(self.model_dir, tag))
    return self.writers[tag]


def _global_batch(local: dict, shardings: dict) -> dict:
  """This process's rows -> global arrays sharded over the batch axes (one sharding per key)."""
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
          for k, v in local.items()}


def _batch_shardings(mesh, rules, example: dict) -> dict:
  """Each batch key sharded over its leading (batch) axis: [B, L] arrays and the int32[B] route."""
  return {k: partitioning.logical_sharding(mesh, rules, "activation_batch",
                                           *([None] * (np.ndim(v) - 1)))
          for k, v in example.items()}


def _check_model(role: str, model, vocab, what: str = "the task's vocabulary") -> None:
  if model.vocab_size < vocab.vocab_size:
    raise UserError(f"the {role} has {model.vocab_size} output ids but {what} has "
                    f"{vocab.vocab_size}; use a model whose vocab_size is at least "
                    f"{vocab.vocab_size}")
  if model.eos_id != vocab.eos_id:
    raise UserError(f"the {role}'s eos_id is {model.eos_id} but {what}'s is "
                    f"{vocab.eos_id}; set the model config's eos_id = {vocab.eos_id}")


def _check_models(student, teachers: dict, vocab, cross: bool) -> None:
  """teachers: {name: (model, ModelSource)}; `cross`: Method.cross_tokenizer is set."""
  for name, (model, source) in teachers.items():
    role = "teacher" if name == "teacher" else f"teacher {name!r}"
    if cross:
      _check_model(role, model, source.vocabulary, "its ModelSource.vocabulary")
    elif model.vocab_size != student.vocab_size:
      raise UserError(f"{role} and student vocabularies differ ({model.vocab_size} vs "
                      f"{student.vocab_size} ids); distil between models that share one "
                      "tokenizer and vocabulary size, or set Method.cross_tokenizer")
    else:
      _check_model(role, model, vocab)
  _check_model("student", student, vocab)


def _named_teachers(teacher: Union[None, ModelSource, Teachers], method) -> dict:
  """{name: ModelSource} of the configured teachers ('teacher' for a single one)."""
  if teacher is None or not method.needs_teacher:
    return {}
  if isinstance(teacher, Teachers):
    return dict(teacher.sources)
  if not isinstance(teacher, ModelSource):
    raise UserError("train.teacher must be a gkd.train.ModelSource or gkd.train.Teachers; got "
                    f"{type(teacher).__name__}")
  return {"teacher": teacher}


def _check_sources(sources: dict, method) -> None:
  for name, source in sources.items():
    if not isinstance(source, ModelSource):
      raise UserError(f"teacher {name!r} must be a gkd.train.ModelSource; got "
                      f"{type(source).__name__}")
    if (source.vocabulary is not None) != (method.cross_tokenizer is not None):
      raise UserError("a teacher with its own ModelSource.vocabulary needs "
                      "Method.cross_tokenizer, and Method.cross_tokenizer needs the teacher's "
                      "ModelSource.vocabulary; set both or neither")
  if method.cross_tokenizer is not None and len(sources) != 1:
    raise UserError(f"cross-tokenizer distillation takes exactly one teacher; got "
                    f"{len(sources)}")


def _routes(teacher, task, split: str) -> Optional[dict]:
  """Route name -> teacher index for routed teachers (every route of the split checked)."""
  if not isinstance(teacher, Teachers) or teacher.combine != "route":
    return None
  routes = teacher.routes()
  unknown = sorted(pipeline.routes_of(task, split) - set(routes))
  if unknown:
    what = f"route {unknown[0]!r}" if unknown[0] else "no route"
    raise UserError(f"the {split} split has examples with {what}, which names no configured "
                    f"teacher {sorted(routes)}; give every example one of those routes or add "
                    "that teacher to Teachers.sources")
  return routes


_UNSET = "<unset>"


def _differences(there: Any, here: Any, path: str = "") -> list[str]:
  """'field: X there, Y here' for every leaf where two JSON values differ."""
  if isinstance(there, dict) and isinstance(here, dict):
    out = []
    for key in sorted(set(there) | set(here), key=str):
      out += _differences(there.get(key, _UNSET), here.get(key, _UNSET), f"{path}.{key}")
    return out
  if there == here:
    return []
  show = lambda v: v if v is _UNSET else json.dumps(v)
  return [f"{path.lstrip('.') or 'value'}: {show(there)} there, {show(here)} here"]


def _check_writable(model_dir: str) -> None:
  """UserError unless this user can create (or write into) `model_dir`."""
  path = os.path.abspath(model_dir)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise UserError(f"cannot create MODEL_DIR {model_dir}: {path} is a file, not a "
                    "directory; choose another path")
  if not os.access(path, os.W_OK | os.X_OK):
    which = "it" if path == os.path.abspath(model_dir) else f"its parent {path}"
    raise UserError(f"cannot write MODEL_DIR {model_dir}: {which} is not writable by this user; "
                    "choose a directory you can write (or fix its permissions)")


def _check_model_dir(model_dir: str, fingerprint: dict) -> None:
  path = os.path.join(model_dir, "run.json")
  if not os.path.exists(path):
    ckpt_dir = os.path.join(model_dir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):  # run.json is written before any save
      raise UserError(f"model directory {model_dir} has checkpoints but no run.json, so what "
                      "it trains is unknown; choose a new --gin.MODEL_DIR")
    return
  with open(path) as f:
    try:
      previous = json.load(f)
    except ValueError:
      previous = None
  if not isinstance(previous, dict):
    raise UserError(f"{path} is not a JSON object (a damaged run.json); restore it or choose "
                    "a new --gin.MODEL_DIR")
  for key in ("student", "task"):
    diffs = _differences(previous.get(key, _UNSET), fingerprint[key], key)
    if diffs:
      more = f"; and {len(diffs) - 4} more" if len(diffs) > 4 else ""
      raise UserError(f"model directory {model_dir} holds a run with a different {key} "
                      f"({'; '.join(diffs[:4])}{more}); choose a new --gin.MODEL_DIR "
                      "or configure the same model and task to resume it")


def setup(model_dir: str, student: ModelSource, teacher: Union[None, ModelSource, Teachers],
          method: step_lib.Method, seed: int) -> Setup:
  """Builds mesh, data, student and teacher; raises UserError on any bad input."""
  if not model_dir or not isinstance(model_dir, str):  # unset: Gin passes its REQUIRED object
    raise UserError("MODEL_DIR is not set; pass --gin.MODEL_DIR=\"'/path/to/run'\"")
  if os.path.exists(model_dir) and not os.path.isdir(model_dir):
    raise UserError(f"MODEL_DIR {model_dir} is a file, not a directory; choose a new path")
  _check_writable(model_dir)
  if method.needs_teacher and teacher is None:
    raise UserError(f"the {method.objective} objective needs a teacher; bind `train.teacher = "
                    "@teacher/gkd.train.ModelSource()` or use objective='sft'")
  sources = _named_teachers(teacher, method)
  _check_sources(sources, method)
  data = dict(tasks.data_config())
  mesh, rules = Parallelism().mesh_and_rules()
  vocab = tasks.get_vocabulary()
  task = tasks.get_task(data["name"], vocab)
  warning = tasks.check_unknown_tokens(task, data["train_split"])  # refuses too many unks
  if warning and jax.process_index() == 0:
    print(f"gkd: warning: {warning}", file=sys.stderr, flush=True)
  routes = _routes(teacher, task, data["train_split"]) if sources else None
  iterator = tasks.batch_iterator(
      task, data["train_split"], input_length=data["input_length"],
      target_length=data["target_length"], batch_size=data["batch_size"], seed=seed,
      shard_index=jax.process_index(), num_shards=jax.process_count(), routes=routes)
  example = next(tasks.batch_iterator(  # reads the data now: a broken file fails here
      task, data["train_split"], input_length=data["input_length"],
      target_length=data["target_length"], batch_size=data["batch_size"], seed=seed,
      routes=routes))
  k_student, k_teacher = jax.random.split(jax.random.PRNGKey(seed))
  student_model, params, param_sh = student.load(k_student, example, mesh, rules)
  loaded = {}
  for i, (name, source) in enumerate(sources.items()):
    key = k_teacher if len(sources) == 1 else jax.random.fold_in(k_teacher, i)
    loaded[name] = (*source.load(key, example, mesh, rules), source)
  _check_models(student_model, {n: (v[0], v[3]) for n, v in loaded.items()},
                tasks.vocabulary_of(task), method.cross_tokenizer is not None)
  aligner = None
  if method.cross_tokenizer is not None:
    (source,) = sources.values()
    aligner = alignment.Aligner(
        tasks.vocabulary_of(task), source.vocabulary,
        input_length=source.input_length or data["input_length"],
        target_length=source.target_length or data["target_length"],
        target_in_context=source.target_in_context)
  combination = teachers_lib.Combination()
  if isinstance(teacher, Teachers) and sources:
    combination = teachers_lib.Combination(teacher.combine, teacher.mixture_weights())
  several = isinstance(teacher, Teachers)
  pick = lambda j: tuple(v[j] for v in loaded.values()) if several else (
      loaded["teacher"][j] if loaded else None)
  student_config = {k: v for k, v in registry.config_to_dict(student_model.config).items()
                    if k not in layers.RUNTIME_FIELDS}
  described = {n: v[3].describe() for n, v in loaded.items()}
  fingerprint = dict(student=student_config, task=data["name"],
                     teacher=(described if several else described.get("teacher")))
  _check_model_dir(model_dir, fingerprint)
  return Setup(model_dir, data, mesh, rules, student_model, params, param_sh, pick(0), pick(1),
               pick(2), iterator, fingerprint,
               batch_shardings=_batch_shardings(mesh, rules, example),
               teacher_names=tuple(loaded), combination=combination, aligner=aligner)


def _init_state(s: Setup, tx, seed: int):
  """The train state and its shardings (optimizer state sharded like the params)."""
  replicated = NamedSharding(s.mesh, PartitionSpec())
  abstract_opt = jax.eval_shape(tx.init, s.params)
  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt, s.param_shardings,
                                 transform_non_params=lambda _: replicated)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(s.params)
  rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)  # the sampling key
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=s.params,
                              opt_state=opt_state, rng=rng)
  shardings = step_lib.TrainState(step=replicated, params=s.param_shardings,
                                  opt_state=opt_sh, rng=replicated)
  return jax.device_put(state, shardings), shardings


def _write_json(path: str, obj: Any) -> None:
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


class _Writer:
  """TensorBoard scalars, and the same as JSON lines in `<path>/metrics.jsonl`.

  Only the first process writes.
  """

  def __init__(self, path: str):
    self._writer = None
    self._jsonl = os.path.join(path, "metrics.jsonl")
    if jax.process_index() == 0:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._writer = tensorboardX.SummaryWriter(path)

  def scalars(self, step: int, values: dict) -> None:
    if self._writer:
      values = {k: float(v) for k, v in values.items()}
      for k, v in values.items():
        self._writer.add_scalar(k, v, step)
      self._writer.flush()
      with open(self._jsonl, "a") as f:
        f.write(json.dumps(dict(step=step, **values)) + "\n")


class _Sigterm:
  """Records SIGTERM (a TPU VM preemption notice) so the loop can checkpoint and exit."""

  def __init__(self):
    self.received = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, *_):
    self.received = True


def _evaluate(s: Setup, model, params, tag: str, step: int) -> evaluation.Evaluation:
  result = evaluation.evaluate(model, params, s.data, s.eval_config, s.mesh, s.rules)
  s.writer(tag).scalars(step, result.metrics)
  _write_json(os.path.join(s.model_dir, f"{tag}_predictions.json"), result.examples[:50])
  return result


SUMMARY_KEY = "train_summary"  # kept in each checkpoint's data item, beside the iterator state


def _data_state(s: Setup, summary: dict) -> dict:
  return dict(s.iterator.state(), **{SUMMARY_KEY: dict(summary)})


def _audited(method, metrics: dict, step: int) -> bool:
  """Keeps the audit metrics only on audit steps; warns when the top-k keeps too little mass."""
  audited = bool(metrics.pop("audit", 0.0))
  if not audited:
    for key in [k for k in metrics if k.startswith("audit_")]:
      del metrics[key]
    return False
  kept = metrics.get("audit_kept_mass")
  if kept is not None and kept < method.audit_min_kept_mass and jax.process_index() == 0:
    print(f"gkd: warning: step {step + 1}: the teacher's top-{method.divergence.teacher_top_k} "
          f"keeps {kept:.3f} of its probability mass (< audit_min_kept_mass "
          f"{method.audit_min_kept_mass}); the top-k loss is far from the exact divergence "
          f"{metrics['audit_exact_divergence']:.4f}: raise teacher_top_k",
          file=sys.stderr, flush=True)
  return True


def _train(s: Setup, method, num_steps: int, seed: int, log_every: int, eval_every: int,
           ckpt: checkpoints.Checkpointer) -> tuple[Any, dict]:
  tx = optimizer.optimizer()
  state, state_sh = _init_state(s, tx, seed)
  # Counts over the whole run, resumed runs included (a finished run re-reads them).
  summary = dict(on_policy_steps=0, steps=0, skipped_steps=0, tokens=0.0, seconds=0.0)
  start = ckpt.latest_step()
  if start is not None:
    state, data_state = ckpt.restore(start, checkpoints.abstract_like(state, state_sh))
    s.iterator.restore(data_state)
    summary.update(data_state.get(SUMMARY_KEY, {}))
  start = start or 0
  batch_sh = s.batch_shardings
  reward = None
  if method.rl_alpha < 1.0:
    reward = rewards.task_reward(tasks.get_task(s.data["name"], tasks.get_vocabulary()))
  step_fn = step_lib.make_train_step(s.student, s.teacher, tx, method, reward,
                                     combination=s.combination, aligner=s.aligner)
  with partitioning.activation_sharding(s.mesh, s.rules):
    train_step = jax.jit(step_fn, in_shardings=(state_sh, s.teacher_shardings, batch_sh),
                         out_shardings=(state_sh, None), donate_argnums=(0,))
  writer, sigterm = s.writer("train"), _Sigterm()
  bar = tqdm.tqdm(range(start, num_steps), initial=start, total=num_steps, desc="train",
                  disable=jax.process_index() != 0, dynamic_ncols=True)
  for step in bar:
    batch = _global_batch(next(s.iterator), batch_sh)
    began = time.perf_counter()
    with partitioning.activation_sharding(s.mesh, s.rules):
      state, metrics = train_step(state, s.teacher_params, batch)
    metrics = jax.device_get(metrics)
    seconds = time.perf_counter() - began
    if not metrics["finite"]:
      last = ckpt.latest_step()
      if method.on_nonfinite == "stop":
        raise RunStopped(f"non-finite loss at step {step}; the parameters were not updated and "
                         f"no checkpoint was written; last good checkpoint: step {last} in "
                         f"{s.model_dir}/checkpoints", exit_code=3)
      summary["skipped_steps"] += 1
    summary["steps"] += 1
    summary["on_policy_steps"] += int(metrics["on_policy"])
    if step > start:  # the first step includes compilation
      summary["tokens"] += float(metrics["target_tokens"])
      summary["seconds"] += seconds
    metrics["on_policy_fraction"] = summary["on_policy_steps"] / summary["steps"]
    metrics["tokens_per_sec"] = float(metrics["target_tokens"]) / max(seconds, 1e-9)
    audited = _audited(method, metrics, step)
    if step % log_every == 0 or step == num_steps - 1 or audited:
      writer.scalars(step + 1, metrics)
      bar.set_postfix(loss=f"{metrics['loss']:.4f}", on_policy=f"{metrics['on_policy_fraction']:.2f}")
    eval_metrics = None
    if eval_every and (step + 1) % eval_every == 0 and step + 1 < num_steps:
      eval_metrics = _evaluate(s, s.student, state.params, "eval", step + 1).metrics
    ckpt.save(step + 1, state, _data_state(s, summary), metrics=eval_metrics,
              force=eval_metrics is not None)
    if sigterm.received:
      ckpt.save(step + 1, state, _data_state(s, summary), force=True)
      ckpt.wait()
      raise RunStopped(f"SIGTERM at step {step + 1}: checkpoint saved in {s.model_dir}/"
                       "checkpoints; run the same command again to resume", exit_code=143)
  return state, summary


def _export(path: str, model, params) -> None:
  """Writes the final student as a gkd checkpoint, atomically (tmp dir, then rename)."""
  if os.path.exists(path):
    return
  tmp = path + ".tmp"
  if jax.process_index() == 0 and os.path.exists(tmp):
    shutil.rmtree(tmp)
  partitioning.sync_processes("gkd.export:stale_tmp_removed")
  models.save_model(tmp, model, params)
  if jax.process_index() == 0:
    os.replace(tmp, path)


@gin.configurable(module="gkd.train")
def train(mode: str = "train", *, model_dir: str = gin.REQUIRED,
          student: ModelSource = gin.REQUIRED,
          teacher: Union[None, ModelSource, Teachers] = None,
          method: Optional[step_lib.Method] = None, num_steps: int = 100, seed: int = 0,
          log_every: int = 10, eval_every: int = 0) -> dict:
  """Runs `mode` ('train', 'eval' or 'train_and_eval'); returns results.json's content."""
  if mode not in MODES:
    raise UserError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
  if not (isinstance(num_steps, int) and num_steps >= 0):
    raise UserError(f"num_steps={num_steps!r} must be an integer >= 0")
  method = method or step_lib.Method()
  options = checkpoints.checkpoint_options()
  eval_config = evaluation.EvalConfig()  # validated now, before anything is written
  optimizer.optimizer()  # validate now (name, schedule)
  s = setup(model_dir, student, teacher, method, seed)
  s.eval_config = eval_config

  os.makedirs(model_dir, exist_ok=True)
  lock = checkpoints.ModelDirLock(model_dir)
  lock.acquire()
  ckpt = checkpoints.Checkpointer(model_dir, options)
  try:
    _write_json(os.path.join(model_dir, "run.json"), s.fingerprint)
    if jax.process_index() == 0:
      with open(os.path.join(model_dir, "config.gin"), "w") as f:
        f.write(gin.operative_config_str())
    ran = dataclasses.asdict(method)
    ran["sampler"]["max_new_tokens"] = s.data["target_length"]  # the step samples this many
    results: dict = dict(mode=mode, model_dir=model_dir, config=dict(
        s.fingerprint, method=ran, data=s.data, num_steps=num_steps,
        seed=seed, mesh=dict(s.mesh.shape), rules=Parallelism().rules,
        eval=dataclasses.asdict(eval_config)))
    params = s.params
    if mode in ("train", "train_and_eval"):
      state, summary = _train(s, method, num_steps, seed, log_every, eval_every, ckpt)
      ckpt.save(num_steps, state, _data_state(s, summary), force=True)
      ckpt.wait()
      params = state.params
      _export(os.path.join(model_dir, "export"), s.student, params)
      # None where nothing was measured (NUM_STEPS = 0; a single step is all compilation).
      results["train"] = dict(
          steps=int(state.step),
          on_policy_fraction=(summary["on_policy_steps"] / summary["steps"]
                              if summary["steps"] else None),
          skipped_steps=summary["skipped_steps"],
          tokens_per_sec=summary["tokens"] / summary["seconds"] if summary["seconds"] else None)
    elif ckpt.latest_step() is not None:
      state, state_sh = _init_state(s, optimizer.optimizer(), seed)
      state, _ = ckpt.restore(ckpt.latest_step(), checkpoints.abstract_like(state, state_sh))
      params = state.params
    if mode in ("eval", "train_and_eval"):
      step = ckpt.latest_step() or 0
      results["step"] = step
      evaluated = _evaluate(s, s.student, params, "eval", step)
      results["eval"] = evaluated.metrics
      results["eval_examples"] = dict(split=s.data["eval_split"], count=len(evaluated.examples),
                                      whole_split=evaluated.whole_split)
      if eval_config.evaluate_teacher and s.teacher is not None and s.aligner is None:
        if isinstance(s.teacher, tuple):  # several teachers: teacher_eval_<name>
          for name, model, tp in zip(s.teacher_names, s.teacher, s.teacher_params):
            tag = f"teacher_eval_{name}"
            results[tag] = _evaluate(s, model, tp, tag, step).metrics
        else:
          results["teacher_eval"] = _evaluate(s, s.teacher, s.teacher_params, "teacher_eval",
                                              step).metrics
    _write_json(os.path.join(model_dir, "results.json"), results)
    if jax.process_index() == 0:
      with open(os.path.join(model_dir, "config.gin"), "w") as f:
        f.write(gin.operative_config_str())
    return results
  finally:
    ckpt.close()
    lock.release()
