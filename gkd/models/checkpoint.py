"""Our model checkpoint: <dir>/model_config.json + an Orbax checkpoint of the params at <dir>/params."""

import os

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, SingleDeviceSharding

from gkd import partitioning
from gkd.errors import UserError
from gkd.models import registry
from gkd.models.api import Model, Params

CONFIG_FILE = 'model_config.json'
PARAMS_DIR = 'params'


def save_model(path: str, model: Model, params: Params) -> None:
  """Writes model_config.json and the (unboxed) params under `path`.

  Multi-process: every process checks the destination before any writes to it
  (else a slow process sees the fast one's files and refuses), and the first
  process writes the config.
  """
  registry.check_new_destination(path)
  partitioning.sync_processes('gkd.save_model:destination_checked')
  os.makedirs(path, exist_ok=True)
  if jax.process_index() == 0:
    registry.save_model_config(model.config, os.path.join(path, CONFIG_FILE))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(os.path.join(path, PARAMS_DIR)),
                      partitioning.strip_boxes(params))


def load_model(path: str, *, mesh: Mesh | None = None,
               rules: partitioning.Rules | None = None, **overrides) -> tuple[Model, Params]:
  """Reads a checkpoint written by `save_model` (or `python -m gkd.convert`).

  `overrides` replace config fields (e.g. dtype='float32'). With `mesh`, params
  are restored directly onto their NamedShardings (default rules: FSDP).
  """
  config = registry.load_model_config(os.path.join(path, CONFIG_FILE))
  if overrides:
    config = registry.config_from_dict({**registry.config_to_dict(config), **overrides})
  model = registry.build_model(config)
  params_dir = os.path.abspath(os.path.join(path, PARAMS_DIR))
  if not os.path.isdir(params_dir):
    raise UserError(f'{params_dir} is missing; {path} is not a gkd model checkpoint.')
  boxed = registry.abstract_params(model)
  if mesh is None:
    shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), partitioning.strip_boxes(boxed))
  else:
    shardings = partitioning.param_shardings(
        boxed, mesh, rules if rules is not None else partitioning.fsdp_rules())
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        partitioning.strip_boxes(boxed), shardings)
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      return model, checkpointer.restore(params_dir, target)
    except (FileNotFoundError, ValueError, KeyError) as e:
      raise UserError(f'{params_dir} does not hold the params of the model in {CONFIG_FILE} '
                      f'({str(e).splitlines()[0][:200]}); {path} is not a complete gkd model '
                      'checkpoint.') from None
