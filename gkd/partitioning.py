"""Device mesh, logical axis rules, and shardings for parameter pytrees.

Parameters and activations carry *logical* axis names; one rules table maps
them onto the mesh axes ('data', 'fsdp', 'tensor'). Weight names ('embed',
'mlp', 'heads', 'kv_heads', 'kv', 'vocab', 'relpos_buckets', 'norm') are kept
apart from activation names ('activation_batch', 'activation_length',
'activation_embed', ...) and KV-cache names ('cache_batch', 'cache_length',
'cache_heads', 'cache_kv'), so that e.g. FSDP shards the 'embed' dimension of
weights without sharding the hidden dimension of activations.

Typical use:

  mesh = make_mesh(data=2, fsdp=4)
  rules = standard_logical_axis_rules('fsdp')
  params, shardings = init_sharded(model, rng, batch, mesh, rules)
  with activation_sharding(mesh, rules):
    logits = jax.jit(model.logits)(params, batch)
"""

import contextlib
import math
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gkd.errors import UserError

MESH_AXES = ('data', 'fsdp', 'tensor')
Rules = Sequence[tuple[str, Any]]

# Batch-like dimensions are split over both data-parallel mesh axes.
_BATCH = ('data', 'fsdp')


@gin.configurable(module='partitioning')
def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all).

  One of the sizes may be -1: it takes whatever the others leave.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise UserError(f'make_mesh: at most one of data/fsdp/tensor may be -1, got {sizes}.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if known <= 0 or len(devices) % known:
      raise UserError(f'make_mesh: {len(devices)} devices cannot be split as {sizes}.')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise UserError(
        f'make_mesh: data*fsdp*tensor = {math.prod(sizes)} but there are '
        f'{len(devices)} devices; pick sizes whose product is {len(devices)}.')
  grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _activation_and_cache_rules(tensor_parallel: bool) -> list[tuple[str, Any]]:
  tp = 'tensor' if tensor_parallel else None
  return [
      ('activation_batch', _BATCH),
      ('activation_length', None),
      ('activation_embed', None),
      ('activation_mlp', tp),
      ('activation_heads', tp),
      ('activation_kv', None),
      ('activation_vocab', tp),
      ('cache_batch', _BATCH),
      ('cache_length', None),
      ('cache_heads', tp),
      ('cache_kv', None),
  ]


def _weight_rules(embed, tp) -> list[tuple[str, Any]]:
  return [
      ('embed', embed),
      ('mlp', tp),
      ('heads', tp),
      ('kv_heads', tp),
      ('kv', None),
      ('vocab', tp),
      ('relpos_buckets', None),
      ('norm', None),
  ]


@gin.configurable(module='partitioning')
def data_parallel_rules() -> list[tuple[str, Any]]:
  """Weights replicated; batch split over ('data', 'fsdp')."""
  return _weight_rules(None, None) + _activation_and_cache_rules(False)


@gin.configurable(module='partitioning')
def fsdp_rules() -> list[tuple[str, Any]]:
  """Weights' 'embed' dimension split over 'fsdp' (ZeRO-3 style); batch over ('data', 'fsdp')."""
  return _weight_rules('fsdp', None) + _activation_and_cache_rules(False)


@gin.configurable(module='partitioning')
def fsdp_tp_rules() -> list[tuple[str, Any]]:
  """FSDP plus Megatron-style tensor parallelism: heads, mlp and vocab over 'tensor'."""
  return _weight_rules('fsdp', 'tensor') + _activation_and_cache_rules(True)


RULE_SETS: dict[str, Callable[[], list[tuple[str, Any]]]] = {
    'data': data_parallel_rules,
    'fsdp': fsdp_rules,
    'fsdp_tp': fsdp_tp_rules,
}


@gin.configurable(module='partitioning')
def standard_logical_axis_rules(name: str = 'fsdp') -> list[tuple[str, Any]]:
  """The rule set called `name`: one of 'data', 'fsdp', 'fsdp_tp'."""
  if name not in RULE_SETS:
    raise UserError(f'Unknown partitioning rule set {name!r}; use one of {sorted(RULE_SETS)}.')
  return RULE_SETS[name]()


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes that do not divide their dimension (e.g. 14 heads on 4 devices)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = []
    for name in names:
      if dim % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[name]) == 0:
        kept.append(name)
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*fitted)


def strip_boxes(boxed: Any) -> Any:
  """The values inside `nn.Partitioned` boxes.

  Unlike `nn.unbox`, adds no sharding constraint under a mesh context, so it
  also works on ShapeDtypeStructs there.
  """
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, boxed,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def param_shardings(boxed: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a boxed (abstract or concrete) params pytree.

  Leaves must be `nn.LogicallyPartitioned`; the result has the unboxed tree's
  structure. Mesh axes that do not divide a dimension are dropped for it.
  """
  specs = nn.get_partition_spec(boxed)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  shapes = strip_boxes(boxed)
  return jax.tree.map(
      lambda s, x: NamedSharding(mesh, _fit_spec(s.spec, x.shape, mesh)),
      shardings, shapes, is_leaf=lambda x: isinstance(x, NamedSharding))


def init_sharded(model: Any, rng: jax.Array, batch: Any, mesh: Mesh,
                 rules: Rules) -> tuple[Any, Any]:
  """Initialises `model` directly onto the mesh.

  eval_shape -> partition specs -> NamedShardings -> jit(init, out_shardings).
  Returns (unboxed params, their NamedShardings).
  """
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  init = lambda r: model.init(r, shapes)
  with activation_sharding(mesh, rules):
    abstract = jax.eval_shape(init, rng)
    shardings = param_shardings(abstract, mesh, rules)
    params = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
  return params, shardings


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Context in which `nn.with_logical_constraint` binds to `mesh` by `rules`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_sharding(mesh: Mesh, rules: Rules, *names: str | None) -> NamedSharding:
  """The NamedSharding of an array whose dimensions have logical `names`."""
  return nn.logical_to_mesh_sharding(PartitionSpec(*names), mesh, rules)


def sync_processes(name: str) -> None:
  """A barrier across all processes of a multi-process run; a no-op in one process."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
