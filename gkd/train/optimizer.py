"""The optimizer: AdamW or Adafactor, a learning-rate schedule, clipping, accumulation."""

import gin
import optax

from gkd.errors import UserError

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("constant", "linear", "cosine", "rsqrt")


@gin.configurable(module="gkd.train")
def schedule(learning_rate: float = 1e-3, warmup_steps: int = 0, kind: str = "constant",
             total_steps: int = 1000) -> optax.Schedule:
  """Linear warm-up to `learning_rate`, then constant / linear / cosine decay to 0, or
  inverse square root (t5x's default)."""
  if kind not in SCHEDULES:
    raise UserError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
  if not learning_rate > 0:
    raise UserError(f"learning_rate={learning_rate!r} must be > 0")
  warmup = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
  decay_steps = max(total_steps - warmup_steps, 1)
  after = {
      "constant": optax.constant_schedule(learning_rate),
      "linear": optax.linear_schedule(learning_rate, 0.0, decay_steps),
      "cosine": optax.cosine_decay_schedule(learning_rate, decay_steps),
      "rsqrt": lambda t: learning_rate * (max(warmup_steps, 1) / (t + max(warmup_steps, 1))) ** 0.5,
  }[kind]
  if warmup_steps <= 0:
    return after
  return optax.join_schedules([warmup, after], [warmup_steps])


@gin.configurable(module="gkd.train")
def optimizer(name: str = "adamw", lr_schedule: optax.Schedule | None = None,
              weight_decay: float = 0.0, clip_norm: float | None = 1.0,
              grad_accum_steps: int = 1, b1: float = 0.9, b2: float = 0.999
              ) -> optax.GradientTransformation:
  """The student's optimizer.

  With `grad_accum_steps` = k > 1 each train step is a micro-batch: gradients
  are averaged over k steps and the parameters change every k-th step
  (`optax.MultiSteps`).
  """
  if name not in OPTIMIZERS:
    raise UserError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
  if not (isinstance(grad_accum_steps, int) and grad_accum_steps >= 1):
    raise UserError(f"grad_accum_steps={grad_accum_steps!r} must be an integer >= 1")
  lr = lr_schedule if lr_schedule is not None else schedule()
  if name == "adamw":
    core = optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay)
  else:
    core = optax.adafactor(lr, weight_decay_rate=weight_decay or None)
  chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  tx = optax.chain(*chain, core)
  return optax.MultiSteps(tx, grad_accum_steps) if grad_accum_steps > 1 else tx
