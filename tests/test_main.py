"""python -m gkd.main end to end, as a subprocess: outputs, kill/resume, preemption, locking,
two processes as one mesh."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

TINY = ["--gin_file=experiments/tiny/gkd.gin"]
CPUS = sorted(os.sched_getaffinity(0))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env_with_devices(n: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def main_args(model_dir, *extra, mode="train"):
  return [sys.executable, "-m", "gkd.main", *TINY, f"--gin.MODEL_DIR={model_dir}",
          f"--mode={mode}", *extra]


def run_main(model_dir, *extra, mode="train", devices=1, timeout=300):
  return subprocess.run(main_args(model_dir, *extra, mode=mode), cwd=ROOT, env=env_with_devices(devices),
                        capture_output=True, text=True, timeout=timeout)


def start_main(model_dir, *extra, devices=1):
  return subprocess.Popen(main_args(model_dir, *extra), cwd=ROOT, env=env_with_devices(devices),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=240):
  start = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    if time.time() - start > timeout:
      proc.kill()
      raise AssertionError("timed out")
    time.sleep(0.2)


def first_error(stderr: str, size: int = 1500) -> str:
  """The part of a crashed run's stderr from its first error or fatal line on."""
  lines = stderr.splitlines()
  for i, line in enumerate(lines):
    if line.startswith(("F0", "E0", "Traceback", "Fatal Python error", "gkd: ")) and (
        "cuInit" not in line):
      return "\n".join(lines[i:])[:size]
  return stderr[-size:]


def steps_saved(model_dir):
  path = os.path.join(model_dir, "checkpoints")
  if not os.path.isdir(path):
    return []
  return sorted(int(d) for d in os.listdir(path) if d.isdigit())


def losses_by_step(model_dir):
  out = {}
  with open(os.path.join(model_dir, "train", "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      out[row["step"]] = row["loss"]  # a resumed run re-logs steps; keep the last
  return out


def export_params(model_dir):
  import jax  # pylint: disable=g-import-not-at-top
  from gkd import models  # pylint: disable=g-import-not-at-top
  _, params = models.load_model(os.path.join(model_dir, "export"))
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def train_and_eval(model_dir, *extra):
  """Runs --mode=train_and_eval (which must succeed); returns (process, results.json)."""
  proc = run_main(model_dir, *extra, mode="train_and_eval")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(model_dir, "results.json")) as f:
    return proc, json.load(f)


def test_train_and_eval_writes_the_model_directory(tmp_path):
  model_dir = str(tmp_path / "run")
  proc, results = train_and_eval(model_dir, "--gin.NUM_STEPS=4")
  assert results["train"]["steps"] == 4
  assert 0.0 <= results["eval"]["accuracy"] <= 100.0
  assert results["config"]["method"]["lmbda"] == 0.5
  # What ran: the step samples the batch's target length (tiny: 16), whatever
  # SampleConfig.max_new_tokens says.
  assert results["config"]["method"]["sampler"]["max_new_tokens"] == 16
  assert results["eval_examples"] == dict(split="validation", count=16, whole_split=True)
  # The end of the output: the final evaluation and where results.json is.
  eval_line = (f"student at step 4 on all 16 examples of 'validation': "
               f"accuracy {results['eval']['accuracy']:.2f}, "
               f"exact_match {results['eval']['exact_match']:.2f}")
  assert proc.stdout.strip().splitlines()[-2:] == [
      eval_line, f"results: {os.path.join(model_dir, 'results.json')}"]
  assert results["config"]["method"]["divergence"]["params"] == {"beta": 0.5}
  operative = open(os.path.join(model_dir, "config.gin")).read()
  assert "LMBDA = 0.5" in operative and "Method.lmbda = %LMBDA" in operative
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(model_dir, "train")))
  assert sorted(losses_by_step(model_dir)) == [1, 2, 3, 4]
  assert steps_saved(model_dir)[-1] == 4
  assert os.path.exists(os.path.join(model_dir, "export", "model_config.json"))
  # eval mode on the finished directory restores the last checkpoint: same metrics
  proc = run_main(model_dir, mode="eval")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(model_dir, "results.json")) as f:
    again = json.load(f)
  assert again["eval"] == results["eval"] and again["step"] == 4
  # Re-running the finished run's command trains nothing and reports the run's
  # real figures (they were rewritten as zero-step statistics: fraction 0.0, 0 tok/s).
  assert 0 < results["train"]["on_policy_fraction"] and results["train"]["tokens_per_sec"] > 0
  _, rerun = train_and_eval(model_dir, "--gin.NUM_STEPS=4")
  assert rerun["train"] == results["train"] and rerun["eval"] == results["eval"]
  assert sorted(losses_by_step(model_dir)) == [1, 2, 3, 4]


@pytest.mark.slow
def test_sigkill_and_restart_reaches_the_same_parameters(tmp_path):
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  proc = run_main(straight)
  assert proc.returncode == 0, proc.stderr[-3000:]
  p = start_main(killed)
  wait_for(lambda: 4 in steps_saved(killed), p)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert not os.path.exists(os.path.join(killed, "results.json"))
  proc = run_main(killed)
  assert proc.returncode == 0, proc.stderr[-3000:]
  a, b = export_params(straight), export_params(killed)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit for bit
  assert losses_by_step(straight) == losses_by_step(killed)


def metrics_rows(model_dir):
  """train/metrics.jsonl without its timing column (tokens_per_sec depends on the clock)."""
  with open(os.path.join(model_dir, "train", "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_sec"} for line in f]


@pytest.mark.slow
def test_the_same_seed_gives_the_same_run_alone_two_at_once_and_pinned(tmp_path):
  # Reproducible bit for bit on one machine: machine load and a concurrent run do not
  # change a run; pinned to one CPU (as the demo runs), which CPU does not either.
  alone = str(tmp_path / "alone")
  proc = run_main(alone, "--gin.NUM_STEPS=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  groups = {"together": [[], []], "pinned": [["--pin_cpus=0"], [f"--pin_cpus={CPUS[-1]}"]]}
  dirs = {}
  for group, flags in groups.items():
    dirs[group] = [str(tmp_path / f"{group}{i}") for i in range(2)]
    procs = [start_main(d, "--gin.NUM_STEPS=4", *f) for d, f in zip(dirs[group], flags)]
    for p in procs:
      _, err = p.communicate(timeout=400)
      assert p.returncode == 0, err[-3000:]
  reference = metrics_rows(alone)
  assert [r["step"] for r in reference] == [1, 2, 3, 4]
  for d in dirs["together"]:
    assert metrics_rows(d) == reference
  assert metrics_rows(dirs["pinned"][0]) == metrics_rows(dirs["pinned"][1])
  a, b = export_params(dirs["pinned"][0]), export_params(dirs["pinned"][1])
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_sigterm_checkpoints_before_exit_and_resumes(tmp_path):
  model_dir = str(tmp_path / "run")
  p = start_main(model_dir, "--gin.NUM_STEPS=400", "--gin.gkd.train.checkpoint_options.every_steps=1000")
  wait_for(lambda: os.path.exists(os.path.join(model_dir, "train", "metrics.jsonl")), p)
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=120)
  assert p.returncode == 143, err[-2000:]
  saved = steps_saved(model_dir)
  assert len(saved) == 1 and 0 < saved[0] < 400 and f"SIGTERM at step {saved[0]}" in err
  proc = run_main(model_dir, f"--gin.NUM_STEPS={saved[0] + 2}",
                  "--gin.gkd.train.checkpoint_options.every_steps=1000")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert steps_saved(model_dir)[-1] == saved[0] + 2
  assert min(losses_by_step(model_dir)) == 1


@pytest.mark.slow
def test_a_second_run_on_the_same_directory_refuses(tmp_path):
  model_dir = str(tmp_path / "run")
  first = start_main(model_dir, "--gin.NUM_STEPS=100000")
  try:
    wait_for(lambda: os.path.exists(os.path.join(model_dir, "train", "metrics.jsonl")), first)
    before = sorted(os.listdir(model_dir))
    second = run_main(model_dir)
    assert second.returncode == 2
    assert "another run is using model directory" in second.stderr.strip().splitlines()[-1]
    assert sorted(os.listdir(model_dir)) == before
  finally:
    first.kill()
    first.wait()


@pytest.mark.slow
def test_two_processes_form_one_mesh_with_the_single_process_losses(tmp_path):
  single = str(tmp_path / "single")
  proc = run_main(single, "--gin.NUM_STEPS=4", devices=2)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  multi = str(tmp_path / "multi")
  procs = [subprocess.Popen(
      main_args(multi, "--gin.NUM_STEPS=4", f"--coordinator_address=localhost:{port}",
                "--num_processes=2", f"--process_id={i}"),
      cwd=ROOT, env=env_with_devices(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  errs = [p.communicate(timeout=400)[1] for p in procs]
  for i, err in enumerate(errs):
    (tmp_path / f"stderr{i}.txt").write_text(err)
  for i, (p, err) in enumerate(zip(procs, errs)):
    # A crash in one process aborts the other too: show both, starting at the first error.
    assert p.returncode == 0, "\n\n".join(f"process {j} (exit {q.returncode}):\n{first_error(e)}"
                                         for j, (q, e) in enumerate(zip(procs, errs)))
  a, b = losses_by_step(single), losses_by_step(multi)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(a)], rtol=1e-5)


BAD_INPUTS = [
    (["--gin.gkd.losses.Divergence.name='kl'"], "unknown divergence 'kl'"),
    (["--gin.LMBDA=1.5"], "lmbda=1.5 is out of range"),
    (["--gin.BETA=-0.1"], "beta=-0.1 is out of range"),
    (["--gin.SampleConfig.temperature=0.0", "--gin.gkd.losses.Divergence.temperature=0.0"],
     "temperature=0.0 is invalid"),
    (["--gin_file=no/such/file.gin"], "gin file 'no/such/file.gin' not found"),
    (["--gin.gkd.train.Method.no_such_param=1"], "bad Gin config"),
    (["--gin.gkd.train.optimizer.name='sgdx'"], "unknown optimizer 'sgdx'"),
    (["--gin.teacher/models.DecoderConfig.vocab_size=300",
      "--gin.teacher/gkd.train.ModelSource.config=@teacher/models.DecoderConfig()"],
     "vocabularies differ"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUTS)
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, extra, message):
  model_dir = tmp_path / "run"
  proc = run_main(str(model_dir), *extra)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert lines[-1].startswith("gkd: error:") and message in lines[-1], lines[-1]
  assert "Traceback" not in proc.stderr
  assert not model_dir.exists()


def _as_a_new_user(env: dict) -> dict:
  """The environment of a shell on a fresh machine: none of the test suite's quieting."""
  return {k: v for k, v in env.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "JAX_PLATFORMS",
                                                    "GRPC_VERBOSITY")}


@pytest.mark.parametrize("extra", [
    ["--gin.LMBDA=1.5"], ["--gin_file=no/such/file.gin"],
    ["--gin.gkd.train.Method.no_such_param=1"], ["--gin.NUM_STEPS"],
    ["--gin.tasks.data_config.name=jsonl", "--gin.tasks.jsonl_task.train_path=/no/such.jsonl",
     "--gin.tasks.jsonl_task.validation_path=/no/such.jsonl"],
])
def test_a_bad_input_is_exactly_one_line_on_stderr(tmp_path, extra):
  # No TensorFlow / absl start-up lines, no "failed call to cuInit" on this CPU machine.
  proc = subprocess.run(main_args(str(tmp_path / "run"), *extra), cwd=ROOT,
                        env=_as_a_new_user(env_with_devices(1)), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("gkd: error: "), lines
  assert proc.stdout == ""


def test_help_exits_zero():
  proc = subprocess.run([sys.executable, "-m", "gkd.main", "--help"], cwd=ROOT,
                        env=_as_a_new_user(env_with_devices(1)), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "--gin_file" in proc.stdout and "Exit codes" in proc.stdout


def test_missing_model_dir_binding(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "gkd.main", *TINY], cwd=ROOT,
                        env=env_with_devices(1), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "MODEL_DIR" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_teacher_from_a_hugging_face_directory(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=512, hidden_size=48, intermediate_size=96,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, bos_token_id=3, eos_token_id=1,
                                    pad_token_id=0, tie_word_embeddings=True)
  hf_dir = str(tmp_path / "hf_teacher")
  transformers.LlamaForCausalLM(config).save_pretrained(hf_dir, safe_serialization=True)
  model_dir = str(tmp_path / "run")
  proc = run_main(model_dir, "--gin.NUM_STEPS=2", "--gin.teacher/gkd.train.ModelSource.config=None",
                  f"--gin.teacher/gkd.train.ModelSource.hf_dir={hf_dir}",
                  "--gin.teacher/gkd.train.ModelSource.dtype='float32'")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(model_dir, "run.json")) as f:
    assert json.load(f)["teacher"] == f"hf:{hf_dir}"
  assert sorted(losses_by_step(model_dir)) == [1, 2]
