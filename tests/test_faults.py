"""Faults during `python -m gkd.main` runs (subprocesses): SIGKILL at random points and while a
checkpoint is being written, a non-finite loss (stop / skip), a full disk while saving.

Complements tests/test_main.py (one SIGKILL after a checkpoint, SIGTERM, the lock).
"""

import glob
import json
import os
import random
import signal
import subprocess
import time

import numpy as np
import pytest

from test_main import export_params, losses_by_step, run_main, start_main, steps_saved, wait_for

pytestmark = pytest.mark.slow  # every test runs the trainer as a subprocess

EVERY_STEP = "--gin.gkd.train.checkpoint_options.every_steps=1"


def tmp_checkpoints(model_dir):
  """Orbax's temporary directories: checkpoints being written (renamed when complete)."""
  return glob.glob(os.path.join(model_dir, "checkpoints", "*.orbax-checkpoint-tmp*"))


def logged_steps(model_dir):
  """Steps in train/metrics.jsonl in the order written (a resumed run appends)."""
  path = os.path.join(model_dir, "train", "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line)["step"] for line in f]


def kill(proc):
  proc.send_signal(signal.SIGKILL)
  proc.wait()


def restore_state(model_dir, step):
  """The saved train state of `step` as numpy arrays, read with Orbax alone (no gkd code)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(model_dir, "checkpoints", str(step), "state")
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, restore_args=as_numpy)


def leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_finite(model_dir, step):
  for name, value in leaves(restore_state(model_dir, step)).items():
    if np.issubdtype(value.dtype, np.floating):
      assert np.all(np.isfinite(value)), f"checkpoint {step}: {name} is not finite"


def test_sigkill_while_saving_and_at_random_points_resumes_bit_for_bit(tmp_path):
  steps = ["--gin.NUM_STEPS=12", EVERY_STEP]
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  proc = run_main(straight, *steps)
  assert proc.returncode == 0, proc.stderr[-3000:]

  # 1. Kill while a checkpoint is being written (Orbax's temporary directory exists).
  p = start_main(killed, *steps)
  wait_for(lambda: any(s >= 3 for s in steps_saved(killed)) and tmp_checkpoints(killed), p)
  kill(p)
  partial, complete = tmp_checkpoints(killed), steps_saved(killed)
  assert partial and complete, (partial, complete)
  # 2. Restart; kill again at a seeded random time after it resumed training.
  logged = len(logged_steps(killed))
  p = start_main(killed, *steps)
  wait_for(lambda: len(logged_steps(killed)) > logged, p)
  resumed_at = logged_steps(killed)[logged]
  assert resumed_at == max(complete) + 1, (resumed_at, complete)  # newest complete, not partial
  time.sleep(random.Random(9).uniform(0.0, 1.0))
  kill(p)
  assert not os.path.exists(os.path.join(killed, "results.json"))
  # 3. Finish.
  proc = run_main(killed, *steps)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not tmp_checkpoints(killed)
  a, b = export_params(straight), export_params(killed)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit for bit
  assert losses_by_step(straight) == losses_by_step(killed)
  assert sorted(losses_by_step(killed)) == list(range(1, 13))


NAN_AT = 5


def test_nonfinite_loss_stops_naming_the_step_and_no_checkpoint_holds_nan(tmp_path):
  model_dir = str(tmp_path / "run")
  proc = run_main(model_dir, EVERY_STEP, "--gin.gkd.train.checkpoint_options.keep=20",
                  f"--gin.gkd.train.Method.inject_nan_at_step={NAN_AT}")
  assert proc.returncode == 3, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("gkd: stopped: non-finite loss at step 5"), last
  assert f"last good checkpoint: step {NAN_AT} in {model_dir}/checkpoints" in last, last
  assert "Traceback" not in proc.stderr
  assert steps_saved(model_dir) == list(range(1, NAN_AT + 1))
  for step in steps_saved(model_dir):
    assert_finite(model_dir, step)
  assert max(logged_steps(model_dir)) == NAN_AT  # the bad step is not logged as trained


def test_nonfinite_loss_skip_finishes_and_counts_the_skipped_step(tmp_path):
  model_dir = str(tmp_path / "run")
  proc = run_main(model_dir, EVERY_STEP, "--gin.gkd.train.checkpoint_options.keep=20",
                  f"--gin.gkd.train.Method.inject_nan_at_step={NAN_AT}",
                  "--gin.gkd.train.Method.on_nonfinite=skip")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(model_dir, "results.json")) as f:
    results = json.load(f)
  assert results["train"]["skipped_steps"] == 1 and results["train"]["steps"] == 8
  for step in steps_saved(model_dir):
    assert_finite(model_dir, step)
  # The skipped step (state.step == 5, logged as step 6) left parameters and optimizer as
  # they were; the steps around it changed them.
  before, skipped, after = (leaves(restore_state(model_dir, s)) for s in (5, 6, 7))
  for name in before:
    if "step" not in name:
      np.testing.assert_array_equal(before[name], skipped[name], err_msg=name)
  assert any(not np.array_equal(skipped[n], after[n]) for n in skipped if "params" in n)
  with open(os.path.join(model_dir, "train", "metrics.jsonl")) as f:
    finite = {row["step"]: row["finite"] for row in map(json.loads, f)}
  assert finite == {s: float(s != NAN_AT + 1) for s in range(1, 9)}


@pytest.fixture
def small_disk(tmp_path):
  """A 64 MiB tmpfs (needs root / CAP_SYS_ADMIN): a disk the test can fill."""
  path = tmp_path / "disk"
  path.mkdir()
  mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(path)],
                         capture_output=True, text=True, check=False)
  if mount.returncode:
    pytest.skip(f"cannot mount a tmpfs to fill (needs root): {mount.stderr.strip()}")
  yield path
  subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path):
  """Writes zeros into `path` until the disk is full."""
  with open(path, "wb") as f:
    try:
      while True:
        f.write(b"\0" * (1 << 20))
        f.flush()
    except OSError:
      pass


def test_disk_full_while_saving_is_one_line_and_the_last_checkpoint_restores(small_disk):
  model_dir = str(small_disk / "run")
  p = start_main(model_dir, "--gin.NUM_STEPS=400")
  wait_for(lambda: 2 in steps_saved(model_dir), p)
  fill(small_disk / "filler")
  _, err = p.communicate(timeout=240)
  last = err.strip().splitlines()[-1]
  assert p.returncode == 4, err[-3000:]
  assert last.startswith(f"gkd: error: no space left on device writing {model_dir}"), last
  assert "resumes from its last complete checkpoint" in last
  assert "gkd/main.py" not in err  # not an uncaught exception (Orbax's own error logs may show)
  complete = steps_saved(model_dir)
  assert complete and max(complete) < 400
  os.remove(small_disk / "filler")
  proc = run_main(model_dir, "--gin.NUM_STEPS=400", mode="eval")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(model_dir, "results.json")) as f:
    assert json.load(f)["step"] == max(complete)
  assert_finite(model_dir, max(complete))
