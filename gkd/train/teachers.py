"""Several teachers: routed per example, or mixed into one distribution.

Gin (each teacher a `ModelSource` under its own scope):

    train.teachers = @gkd.train.Teachers()
    gkd.train.Teachers.sources = {'add': @add/gkd.train.ModelSource(),
                                  'sub': @sub/gkd.train.ModelSource()}
    gkd.train.Teachers.combine = 'route'    # each example's route names its teacher
    # or 'mixture', with gkd.train.Teachers.weights = {'add': 0.7, 'sub': 0.3}

Routing reads the example's route (a JSONL field bound to
`tasks.jsonl_task.route_field`, e.g. "teacher_id"): the batch carries
`teacher_route` int32[B], the index of the teacher in `sources` order.
A mixture scores every example with p = Σ_k w_k p_k (probabilities, not
log-probabilities, are mixed). Every teacher scores inside the same compiled
step; a routed step skips (`lax.cond`) each teacher no example of the batch
routes to, and runs a needed teacher on the whole batch (shapes are static),
so a batch that routes to two teachers costs two teachers' forward passes.
"""

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import gin
import jax
import jax.numpy as jnp

from gkd.errors import UserError

Array = jax.Array
COMBINE = ("route", "mixture")


@gin.configurable(module="gkd.train")
@dataclasses.dataclass(frozen=True)
class Teachers:
  """Named teachers and how their distributions are combined.

  Attributes:
    sources: {name: ModelSource}; the order is the route index order.
    combine: 'route' (each example's route names one teacher) or 'mixture'.
    weights: {name: weight ≥ 0} for 'mixture' (normalised; default uniform).
  """

  sources: Any = None
  combine: str = "route"
  weights: Any = None

  def __post_init__(self):
    if not isinstance(self.sources, Mapping) or not self.sources:
      raise UserError("Teachers.sources must be a non-empty dict {name: ModelSource}, e.g. "
                      "{'add': @add/gkd.train.ModelSource()}")
    bad = [n for n in self.sources if not isinstance(n, str) or not n]
    if bad:
      raise UserError(f"teacher names must be non-empty strings; got {bad[0]!r}")
    if self.combine not in COMBINE:
      raise UserError(f"unknown Teachers.combine {self.combine!r}; choose one of "
                      f"{', '.join(COMBINE)}")
    if self.combine == "route" and self.weights is not None:
      raise UserError("Teachers.weights is for combine='mixture'; routed teachers take none")
    if self.weights is not None:
      if not isinstance(self.weights, Mapping) or set(self.weights) != set(self.sources):
        raise UserError(f"Teachers.weights must give a weight to exactly the teachers "
                        f"{list(self.sources)}; got {self.weights!r}")
      values = list(self.weights.values())
      if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)
             or w < 0 for w in values) or not sum(values) > 0:
        raise UserError(f"Teachers.weights {dict(self.weights)!r} must be finite numbers "
                        "≥ 0 with a positive sum")

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self.sources)

  def routes(self) -> dict[str, int]:
    """Route name -> teacher index (the batch's `teacher_route` values)."""
    return {name: i for i, name in enumerate(self.names)}

  def mixture_weights(self) -> tuple[float, ...]:
    """Normalised weights in `names` order."""
    raw = [1.0] * len(self.names) if self.weights is None else [
        float(self.weights[n]) for n in self.names]
    return tuple(w / sum(raw) for w in raw)


@dataclasses.dataclass(frozen=True)
class Combination:
  """How the step combines K teachers' log-probabilities (static under jit)."""

  combine: str = "route"
  weights: tuple[float, ...] = ()


def mix(log_probs: Sequence[Array], weights: Sequence[float]) -> Array:
  """log Σ_k w_k p_k from K `[..., V]` log-probabilities (teachers with weight 0 drop out)."""
  terms = [lp.astype(jnp.float32) + math.log(w) for lp, w in zip(log_probs, weights) if w > 0]
  return jax.nn.logsumexp(jnp.stack(terms), axis=0) if len(terms) > 1 else terms[0]


def select(values: Sequence[Array], route: Array) -> Array:
  """Row b of teacher route[b]'s values: K arrays `[B, ...]` -> `[B, ...]`."""
  out = values[0]
  for k, v in enumerate(values[1:], start=1):
    chosen = (route == k).reshape(route.shape + (1,) * (v.ndim - 1))
    out = jnp.where(chosen, v, out)
  return out


def score(fns: Sequence[Callable[[], Array]], combination: Combination,
          route: Optional[Array]) -> list[Array]:
  """Runs each teacher's scoring thunk; a routed step skips teachers no row needs.

  fns: K thunks, each returning that teacher's output (a pytree of arrays
  with a leading batch axis). Returns the K outputs (zeros for a skipped one).
  """
  if combination.combine != "route" or len(fns) == 1:
    return [fn() for fn in fns]
  outs = []
  for k, fn in enumerate(fns):
    zeros = lambda fn=fn: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn))
    outs.append(jax.lax.cond(jnp.any(route == k), fn, zeros))
  return outs


def combine_log_probs(log_probs: Sequence[Array], combination: Combination,
                      route: Optional[Array]) -> Array:
  """The teacher distribution the student is trained against: `[B, ..., V]` log-probs."""
  if len(log_probs) == 1:
    return log_probs[0]
  if combination.combine == "mixture":
    return mix(log_probs, combination.weights)
  if route is None:
    raise UserError("routed teachers need each example's route: bind "
                    "tasks.jsonl_task.route_field to the field that names the teacher")
  return select(log_probs, route)
