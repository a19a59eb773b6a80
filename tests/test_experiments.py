"""Every shipped paper / decoder-only Gin experiment parses and builds (model, task, step).

Each experiment (a size or model-pair file) is combined with every method file,
parsed exactly as `python -m gkd.main` parses it, checked against the paper's
settings, then built at tiny sizes: the experiment's own model scopes get
tiny dimensions, its TFDS task becomes the offline task of the same kind on
the word vocabulary, and the checkpoint / Hugging Face sources become random
initialisation of the experiment's architectures (STUDENT_MODEL, TEACHER_MODEL).
"""

import pathlib

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

import gkd.losses, gkd.partitioning, gkd.sampling  # pylint: disable=unused-import,multiple-imports
from gkd import main, models, tasks, train

CONFIGS = pathlib.Path(__file__).parents[1] / "configs"
FAMILIES = ("xsum", "wmt14", "gsm8k", "decoder")
EXPERIMENTS = sorted(str(p.relative_to(CONFIGS)) for f in FAMILIES
                     for p in (CONFIGS / "experiments" / f).glob("*.gin") if p.name != "base.gin")
METHODS = sorted(f"methods/{p.name}" for p in (CONFIGS / "methods").glob("*.gin"))

# The paper's settings as our notes give them (FORMULAS.md; unverified there):
# steps, learning rate, warm-up, input/output lengths, TFDS task.
PAPER = {
    "xsum": (40000, 3e-4, 2000, 1024, 64, "xsum"),
    "wmt14": (100000, 3e-4, 5000, 80, 80, "wmt14_en_de"),
    "gsm8k": (40000, 3e-4, 0, 512, 320, "gsm8k_fewshot"),
}
OFFLINE = {"xsum": "offline_summarization", "wmt14": "offline_translation",
           "gsm8k": "offline_arithmetic", "decoder": "offline_arithmetic"}
TINY = {
    "T5Config": dict(vocab_size=512, embed_dim=32, mlp_dim=64, num_encoder_layers=2,
                     num_decoder_layers=2, num_heads=2, head_dim=16, eos_id=1,
                     dtype="'float32'"),
    "DecoderConfig": dict(vocab_size=512, embed_dim=32, mlp_dim=64, num_layers=2, num_heads=2,
                          num_kv_heads=1, head_dim=16, eos_id=1, bos_id=3, pad_id=0,
                          dtype="'float32'"),
}
# method file -> (objective, divergence, params, λ, seq_kd, needs a teacher)
EXPECTED_METHODS = {
    "sft": ("sft", None, None, 0.0, False, False),
    "supervised_kd": ("gkd", "forward_kl", {}, 0.0, False, True),
    "seqkd": ("gkd", "forward_kl", {}, 0.0, True, True),
    "gkd_forward_kl": ("gkd", "forward_kl", {}, 1.0, False, True),
    "gkd_reverse_kl": ("gkd", "reverse_kl", {}, 1.0, False, True),
    "gkd_jsd_0_1": ("gkd", "jsd", {"beta": 0.1}, 1.0, False, True),
    "gkd_jsd_0_5": ("gkd", "jsd", {"beta": 0.5}, 1.0, False, True),
    "gkd_jsd_0_9": ("gkd", "jsd", {"beta": 0.9}, 1.0, False, True),
    "gkd_reverse_kl_top_k": ("gkd", "reverse_kl", {}, 1.0, False, True),
    "opd": ("opd", None, None, 1.0, False, True),
}


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def family(experiment: str) -> str:
  return experiment.split("/")[1]


def macro(name: str):
  return gin.query_parameter(f"%{name}")


def required(*names: str) -> bool:
  return all(repr(macro(n)) == "%gin.REQUIRED" for n in names)


def parse(experiment: str, method: str) -> None:
  """Parses like gkd.main, then swaps in tiny models, the offline task and random init."""
  main.parse_gin([experiment, method], ["MODEL_DIR = '/nonexistent/run'"], [])
  bindings = [f"tasks.data_config.name = '{OFFLINE[family(experiment)]}'",
              "tasks.get_vocabulary.kind = 'word'", "tasks.get_vocabulary.path = None",
              "tasks.data_config.input_length = 48", "tasks.data_config.target_length = 16",
              "tasks.data_config.batch_size = 4", "gkd.train.Parallelism.data = -1",
              "gkd.train.Parallelism.fsdp = 1"]
  for role in ("student", "teacher"):
    ref = macro(f"{role.upper()}_MODEL")
    (scope,), cls = ref.scopes, ref.configurable.name
    bindings += [f"{scope}/models.{cls}.{k} = {v}" for k, v in TINY[cls].items()]
    bindings += [f"{role}/gkd.train.ModelSource.checkpoint = None",
                 f"{role}/gkd.train.ModelSource.hf_dir = None",
                 f"{role}/gkd.train.ModelSource.config = %{role.upper()}_MODEL"]
  gin.parse_config(bindings)


def source(role: str) -> train.ModelSource:
  with gin.config_scope(role):
    return train.ModelSource()


def test_the_grid_is_complete():
  sizes = {f: sorted(e.split("/")[2] for e in EXPERIMENTS if family(e) == f) for f in FAMILIES}
  assert sizes["xsum"] == sizes["wmt14"] == ["t5_base.gin", "t5_large.gin", "t5_small.gin",
                                             "t5_xl.gin"]
  assert sizes["gsm8k"] == ["flan_t5_base.gin", "flan_t5_large.gin", "flan_t5_small.gin",
                            "flan_t5_xl.gin"]
  assert "qwen2_5_1_5b_to_0_5b.gin" in sizes["decoder"]
  assert sorted(m[len("methods/"):-4] for m in METHODS) == sorted(EXPECTED_METHODS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_real_settings(experiment):
  """Before any override: the paper's settings, required macros, matching vocabularies."""
  main.parse_gin([experiment, "methods/gkd_jsd_0_9.gin"], [], [])
  q = gin.query_parameter
  assert q("tasks.data_config.batch_size") == 32
  assert q("gkd.train.EvalConfig.max_examples") is None
  assert q("gkd.train.EvalConfig.evaluate_teacher") is True
  student, teacher = (macro(f"{r}_MODEL").scoped_configurable_fn() for r in ("STUDENT", "TEACHER"))
  assert student.vocab_size == teacher.vocab_size and student.eos_id == teacher.eos_id
  if family(experiment) == "decoder":
    assert q("tasks.get_vocabulary.kind") == "hf"
    assert q("tasks.data_config.name") == "gsm8k"
    assert required("STUDENT_HF_DIR", "TEACHER_HF_DIR")
    assert models.build_model(student).__class__.__name__ == "DecoderModel"
    return
  steps, lr, warmup, input_length, target_length, task = PAPER[family(experiment)]
  if experiment.endswith("t5_small.gin") and family(experiment) == "xsum":
    lr = 1e-3
  assert (macro("NUM_STEPS"), macro("LEARNING_RATE"), macro("WARMUP_STEPS")) == (steps, lr, warmup)
  assert q("tasks.data_config.input_length") == input_length
  assert q("tasks.data_config.target_length") == target_length
  assert q("tasks.data_config.name") == task
  assert q("tasks.get_vocabulary.kind") == "sentencepiece"
  assert required("TEACHER_DIR", "STUDENT_INIT")
  assert teacher.embed_dim == 2048 and teacher.num_encoder_layers == 24  # T5-XL
  assert macro("TEACHER_MODEL").scopes[0].startswith("flan_" if task.startswith("gsm8k") else "t5")
  size = experiment.split("_")[-1][:-len(".gin")]
  assert {"small": 512, "base": 768, "large": 1024, "xl": 2048}[size] == student.embed_dim


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_method_and_sources(experiment, method):
  """Every experiment x method cell: the Method, the sources and the data config."""
  parse(experiment, method)
  objective, name, params, lmbda, seq_kd, needs_teacher = EXPECTED_METHODS[method[8:-4]]
  m = train.Method()
  assert (m.objective, m.lmbda, m.seq_kd, m.needs_teacher) == (objective, lmbda, seq_kd,
                                                              needs_teacher)
  if name is not None:
    assert (m.divergence.name, m.divergence.params) == (name, params)
  assert m.sampler.temperature == 1.0  # the paper samples the student at γ = 1
  teacher = gin.query_parameter("gkd.train.train.teacher")
  assert (teacher is not None) == needs_teacher
  for role in ("student", "teacher"):
    assert isinstance(source(role).config, (models.T5Config, models.DecoderConfig))
  assert tasks.data_config()["name"] == OFFLINE[family(experiment)]


def tiny_batch() -> dict:
  data = tasks.data_config()
  task = tasks.get_task(data["name"], tasks.get_vocabulary())
  return next(tasks.batch_iterator(task, data["train_split"], input_length=data["input_length"],
                                   target_length=data["target_length"],
                                   batch_size=data["batch_size"], seed=0))


def build_step(experiment: str, method: str):
  parse(experiment, method)
  batch = tiny_batch()
  student = models.build_model(source("student").config)
  teacher = models.build_model(source("teacher").config)
  params = nn.unbox(student.init(jax.random.PRNGKey(0), batch))
  teacher_params = nn.unbox(teacher.init(jax.random.PRNGKey(1), batch))
  tx = train.optimizer()
  step = train.make_train_step(student, teacher, tx, train.Method())
  state = train.TrainState(step=np.int32(0), params=params, opt_state=tx.init(params),
                           rng=jax.random.PRNGKey(2))
  return step, state, teacher_params, batch


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_builds_model_task_and_step(experiment):
  step, state, teacher_params, batch = build_step(experiment, "methods/gkd_jsd_0_9.gin")
  assert callable(step)
  shapes = jax.eval_shape(step, state, teacher_params, batch)[1]
  assert shapes["loss"].shape == ()


@pytest.mark.parametrize("experiment", ["experiments/xsum/t5_small.gin",
                                        "experiments/decoder/qwen2_5_1_5b_to_0_5b.gin"])
def test_one_step_runs(experiment):
  step, state, teacher_params, batch = build_step(experiment, "methods/gkd_jsd_0_5.gin")
  new_state, metrics = jax.jit(step)(state, teacher_params, batch)
  assert int(new_state.step) == 1
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
  assert float(metrics["finite"]) == 1.0
