"""Bad input through `python -m gkd.main`: exit 2, one line naming the problem and the fix,
no traceback, and the model directory untouched (not created, or byte-for-byte unchanged).

Extends tests/test_main.py's table (bad flag values) with bad files: a broken JSONL line, a
directory given as a JSONL file, a pickle-only HF directory, a student checkpoint that is not
one, a model directory of another model (train and eval; the message names the fields), a
damaged run.json, a MODEL_DIR that is a file or that this user cannot write, a Gin file with a
mistake (the message names the file and line), a malformed flag.
"""

import hashlib
import json
import os
import pickle
import shutil
import subprocess

import pytest

from test_main import ROOT, env_with_devices, main_args, run_main, train_and_eval

pytestmark = pytest.mark.slow  # each case is a subprocess that imports jax (~10 s)


def snapshot(path):
  """{relative path: (size, mtime_ns, sha1)} of every file under `path` (None if absent)."""
  if not os.path.exists(path):
    return None
  if not os.path.isdir(path):
    return open(path, "rb").read()
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      st = os.stat(full)
      with open(full, "rb") as f:
        out[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns,
                                            hashlib.sha1(f.read()).hexdigest())
  return out


class _RunsCodeWhenUnpickled:
  """Unpickling this creates a directory: evidence that a pickle was loaded."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.makedirs, (self.marker,))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A model directory with two steps of the tiny run (checkpoints, export, run.json)."""
  model_dir = str(tmp_path_factory.mktemp("trained") / "run")
  proc = run_main(model_dir, "--gin.NUM_STEPS=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return model_dir


def _jsonl_with_broken_line(tmp):
  path = tmp / "train.jsonl"
  path.write_text('{"input": "1 + 2", "target": "3"}\n{"input": "2 + 2", "target": \n')
  return ["--gin.tasks.data_config.name=jsonl", f"--gin.tasks.jsonl_task.train_path={path}",
          f"--gin.tasks.jsonl_task.validation_path={path}"], f"{path}, line 2: bad JSON"


def _jsonl_directory(tmp):
  path = tmp / "data.jsonl"
  path.mkdir()
  return ["--gin.tasks.data_config.name=jsonl", f"--gin.tasks.jsonl_task.train_path={path}",
          f"--gin.tasks.jsonl_task.validation_path={path}"], f"{path}' is a directory, not a file"


def _jsonl_the_word_vocabulary_cannot_read(tmp):
  path = tmp / "symbols.jsonl"
  path.write_text('{"input": "x^2 + y^2 = z^2 ?", "target": "#### \\u03c0"}\n' * 4)
  return ["--gin.tasks.data_config.name=jsonl", f"--gin.tasks.jsonl_task.train_path={path}",
          f"--gin.tasks.jsonl_task.validation_path={path}"], "to unk (e.g. "


def _gin_file_with_a_mistake(tmp, text, message):
  path = tmp / "mine.gin"
  path.write_text(text)
  return [f"--gin_file={path}"], message.format(path=path)


def _pickle_hf_teacher(tmp):
  hf = tmp / "hf_teacher"
  hf.mkdir()
  (hf / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 512}))
  (hf / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCodeWhenUnpickled(str(tmp / "pwned"))))
  return [f"--gin.teacher/gkd.train.ModelSource.hf_dir={hf}",
          "--gin.teacher/gkd.train.ModelSource.config=None"], "only pickle checkpoints"


def _student_checkpoint(tmp, kind):
  path = tmp / f"student_{kind}"
  path.mkdir()
  if kind == "bad_json":
    (path / "model_config.json").write_text("{not json")
  elif kind == "bad_params":
    (path / "model_config.json").write_text(json.dumps(dict(
        architecture="decoder", vocab_size=512, embed_dim=64, mlp_dim=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, eos_id=1)))
    (path / "params").mkdir()
    (path / "params" / "weights.npy").write_bytes(b"\x93NUMPY garbage")
  messages = dict(empty="model_config.json does not exist", bad_json="is not valid JSON",
                  bad_params="is not a complete gkd model checkpoint")
  return [f"--gin.student/gkd.train.ModelSource.checkpoint={path}",
          "--gin.student/gkd.train.ModelSource.config=None"], messages[kind]


FRESH_DIR_CASES = {
    "jsonl_broken_line": _jsonl_with_broken_line,
    "hf_pickle_teacher": _pickle_hf_teacher,
    "student_checkpoint_empty_dir": lambda tmp: _student_checkpoint(tmp, "empty"),
    "student_checkpoint_bad_json": lambda tmp: _student_checkpoint(tmp, "bad_json"),
    "student_checkpoint_bad_params": lambda tmp: _student_checkpoint(tmp, "bad_params"),
    "malformed_gin_flag": lambda tmp: (["--gin.NUM_STEPS"], "must look like --gin.NAME=VALUE"),
    "unbalanced_gin_value": lambda tmp: (["--gin.NUM_STEPS=("], "bad Gin config in the --gin"),
    "unknown_gin_parameter_flag": lambda tmp: (
        ["--gin.gkd.train.Method.no_such=1"],
        "bad Gin config in the binding 'gkd.train.Method.no_such = 1': Configurable "
        "'gkd.train.Method' doesn't have a parameter named 'no_such'"),
    "jsonl_directory": _jsonl_directory,
    "jsonl_mostly_unknown_to_the_vocabulary": _jsonl_the_word_vocabulary_cannot_read,
    "gin_file_unknown_parameter": lambda tmp: _gin_file_with_a_mistake(
        tmp, "# mine\ngkd.train.Method.lmbda = 0.5\ngkd.train.Method.no_such = 1\n",
        "bad Gin config in {path}, line 3: Configurable 'gkd.train.Method' doesn't have a "
        "parameter named 'no_such'"),
    "gin_file_unbalanced": lambda tmp: _gin_file_with_a_mistake(
        tmp, "NUM_STEPS = (\n", "bad Gin config in {path}, line 2: EOF in multi-line statement"),
    "gin_file_is_a_directory": lambda tmp: ([f"--gin_file={tmp}"], "is a directory"),
}


def assert_one_clear_line(proc, message):
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert lines and lines[-1].startswith("gkd: error:") and message in lines[-1], lines[-3:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("case", sorted(FRESH_DIR_CASES))
def test_bad_file_is_one_line_and_creates_nothing(tmp_path, case):
  extra, message = FRESH_DIR_CASES[case](tmp_path)
  model_dir = tmp_path / "run"
  proc = run_main(str(model_dir), *extra)
  assert_one_clear_line(proc, message)
  assert not model_dir.exists()
  assert not (tmp_path / "pwned").exists()  # the pickle was never loaded


@pytest.mark.parametrize("extra, mode, message", [
    (["--gin.tiny_decoder/models.DecoderConfig.embed_dim=32"], "train",
     "holds a run with a different student (student.embed_dim: 64 there, 32 here)"),
    (["--gin.tiny_decoder/models.DecoderConfig.num_layers=1",
      "--gin.tiny_decoder/models.DecoderConfig.mlp_dim=96"], "eval",
     "holds a run with a different student (student.mlp_dim: 128 there, 96 here; "
     "student.num_layers: 2 there, 1 here)"),
])
def test_a_directory_of_another_model_is_left_as_it_was(trained, extra, mode, message):
  before = snapshot(trained)
  proc = run_main(trained, *extra, mode=mode)
  assert_one_clear_line(proc, message)
  assert "choose a new --gin.MODEL_DIR" in proc.stderr
  assert snapshot(trained) == before


def test_a_damaged_run_json_is_reported_and_left_alone(tmp_path):
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  (model_dir / "run.json").write_text('{"student": ')
  before = snapshot(str(model_dir))
  proc = run_main(str(model_dir))
  assert_one_clear_line(proc, "damaged run.json")
  assert snapshot(str(model_dir)) == before


def test_checkpoints_without_run_json_are_not_overwritten(trained, tmp_path):
  model_dir = str(tmp_path / "run")
  shutil.copytree(trained, model_dir)
  os.remove(os.path.join(model_dir, "run.json"))
  before = snapshot(model_dir)
  proc = run_main(model_dir, "--gin.tiny_decoder/models.DecoderConfig.embed_dim=32")
  assert_one_clear_line(proc, "has checkpoints but no run.json")
  assert snapshot(model_dir) == before


def test_model_dir_that_is_a_file(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("not a directory")
  proc = run_main(str(path))
  assert_one_clear_line(proc, "is a file, not a directory")
  assert path.read_text() == "not a directory"


def _can_drop_dac_override():
  try:
    return subprocess.run(["setpriv", "--bounding-set=-dac_override", "true"],
                          capture_output=True, timeout=30).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


@pytest.mark.skipif(not _can_drop_dac_override(), reason="needs setpriv and CAP_SETPCAP")
@pytest.mark.parametrize("where", ["parent", "itself"])
def test_an_unwritable_model_dir_is_one_line(tmp_path, where):
  # Tests run as root, who may write anywhere: the run drops CAP_DAC_OVERRIDE (and
  # DAC_READ_SEARCH, FOWNER) with setpriv, so permission bits apply to it as to any user.
  locked = tmp_path / "locked"
  locked.mkdir()
  model_dir = locked / "run" if where == "parent" else locked
  before = snapshot(str(locked))
  locked.chmod(0o555)
  try:
    proc = subprocess.run(
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--",
         *main_args(str(model_dir))], cwd=ROOT, env=env_with_devices(1), capture_output=True,
        text=True, timeout=300)
  finally:
    locked.chmod(0o755)
  which = f"its parent {locked}" if where == "parent" else "it"
  assert_one_clear_line(proc, f"cannot write MODEL_DIR {model_dir}: {which} is not writable")
  assert snapshot(str(locked)) == before


def test_num_steps_zero_exports_and_evaluates_the_initial_student(tmp_path):
  model_dir = str(tmp_path / "run")
  _, results = train_and_eval(model_dir, "--gin.NUM_STEPS=0")
  assert results["train"] == dict(steps=0, on_policy_fraction=None, skipped_steps=0,
                                  tokens_per_sec=None)
  assert results["step"] == 0 and "accuracy" in results["eval"]
  assert os.path.exists(os.path.join(model_dir, "export", "model_config.json"))
  assert not os.path.exists(os.path.join(model_dir, "train", "metrics.jsonl"))  # no step ran
