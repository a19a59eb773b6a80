"""Orbax checkpoints of the student's train state and the data iterator.

A checkpoint holds two named items: `state` (step, student parameters,
optimizer state, RNG key) and `data` (the batch iterator's JSON state). The
teacher is never saved. Orbax writes each checkpoint to a temporary directory
and renames it when complete, so a run killed mid-save restarts from the newest
*complete* checkpoint. Saves are asynchronous; the last K and the best by an
eval metric are kept. Restoring takes the target shardings, so a checkpoint
restores onto any mesh shape.
"""

import contextlib
import errno
import fcntl
import os
from typing import Any, Optional

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from gkd.errors import UserError, disk_full_path

LOCK_FILE = ".gkd.lock"


@gin.configurable(module="gkd.train")
def checkpoint_options(every_steps: int = 100, keep: int = 3, best_metric: Optional[str] = None,
                       best_mode: str = "max", async_save: bool = True) -> dict:
  """When to save and what to keep (Gin: `gkd.train.checkpoint_options.*`)."""
  if best_mode not in ("max", "min"):
    raise UserError(f"best_mode={best_mode!r}; choose 'max' or 'min'")
  if not (isinstance(every_steps, int) and every_steps >= 1):
    raise UserError(f"checkpoint every_steps={every_steps!r} must be an integer >= 1")
  return dict(every_steps=every_steps, keep=keep, best_metric=best_metric,
              best_mode=best_mode, async_save=async_save)


class ModelDirLock:
  """An exclusive `flock` on the model directory for the life of a run.

  A second run pointed at the same directory fails at once instead of
  interleaving checkpoints. The kernel releases the lock when the process dies,
  even by SIGKILL.
  """

  def __init__(self, model_dir: str):
    self.path = os.path.join(model_dir, LOCK_FILE)
    self._file = None

  def acquire(self) -> None:
    """Takes the lock (the first process of a multi-host run holds it for all)."""
    held = True
    if jax.process_index() == 0:
      self._file = open(self.path, "a+")
      try:
        fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()
      except BlockingIOError:
        self._file.close()
        self._file = None
        held = False
    if jax.process_count() > 1:
      held = bool(multihost_utils.broadcast_one_to_all(np.int32(held)))
    if not held:
      raise UserError(f"another run is using model directory {os.path.dirname(self.path)} "
                      "(it holds the lock); wait for it to finish or choose another "
                      "--gin.MODEL_DIR")

  def release(self) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


@contextlib.contextmanager
def _naming_a_full_disk(directory: str):
  """Re-raises Orbax's full-disk errors (from its threads) as OSError(ENOSPC, directory)."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    if disk_full_path(e) is None:
      raise
    raise OSError(errno.ENOSPC, "No space left on device while saving a checkpoint",
                  directory) from e


class Checkpointer:
  """Saves and restores (train state, data iterator state) under `<model_dir>/checkpoints`."""

  def __init__(self, model_dir: str, options: dict):
    keep = [policies.LatestN(options["keep"])]
    if options["best_metric"]:
      metric = options["best_metric"]
      keep.append(policies.BestN(
          get_metric_fn=lambda m: m[metric], reverse=options["best_mode"] == "min", n=1,
          keep_checkpoints_without_metrics=False))
    self.best_metric = options["best_metric"]
    self.every_steps = options["every_steps"]
    self._manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(model_dir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=options["async_save"],
            preservation_policy=policies.AnyPreservationPolicy(keep),
            cleanup_tmp_directories=True),
        item_names=("state", "data"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, metrics: Optional[dict] = None,
           force: bool = False) -> bool:
    """Starts an (asynchronous) save; returns whether one was started."""
    if not force and step % self.every_steps:
      return False
    if step in self._manager.all_steps():
      return False
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      metrics = None
    with _naming_a_full_disk(self._manager.directory):
      return self._manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        data=ocp.args.JsonSave(data_state)),
          metrics=metrics, force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores onto the shardings carried by `abstract_state`'s ShapeDtypeStructs."""
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        data=ocp.args.JsonRestore()))
    except (ValueError, KeyError) as e:
      raise UserError(f"checkpoint {step} in {self._manager.directory} does not match this "
                      f"model ({str(e).splitlines()[0][:200]}); point --gin.MODEL_DIR at a "
                      "new directory or configure the model it was trained with") from None
    return restored.state, restored.data

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are complete."""
    with _naming_a_full_disk(self._manager.directory):
      self._manager.wait_until_finished()

  def close(self) -> None:
    with _naming_a_full_disk(self._manager.directory):
      self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying `shardings` (a restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
