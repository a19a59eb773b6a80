"""Hugging Face checkpoints in and out: config.json + *.safetensors.

load_hf reads T5/FLAN-T5, Llama and Qwen2 directories (one safetensors file,
or shards listed in model.safetensors.index.json) and places every tensor
directly with its NamedSharding; save_hf writes a directory that
`transformers` loads. Pickle checkpoints (*.bin, *.pt) are refused: loading
them can run arbitrary code.
"""

import contextlib
import glob
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from jax.sharding import Mesh

from gkd import partitioning
from gkd.errors import UserError
from gkd.models import hf_maps, registry
from gkd.models.api import Model, Params
from gkd.models.t5 import T5Config

_PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt', '.pkl')
_INDEX = 'model.safetensors.index.json'


def _tensor_files(path: str) -> dict[str, str]:
  """HF tensor name -> safetensors file that holds it."""
  index = os.path.join(path, _INDEX)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)['weight_map']
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  files = sorted(glob.glob(os.path.join(path, '*.safetensors')))
  if not files:
    pickles = sorted(f for f in os.listdir(path) if f.endswith(_PICKLE_SUFFIXES))
    if pickles:
      raise UserError(
          f'{path} holds only pickle checkpoints ({", ".join(pickles)}); they are refused '
          'because unpickling can run arbitrary code. Convert them to safetensors first, e.g. '
          '`transformers.AutoModel.from_pretrained(path).save_pretrained(dst, '
          'safe_serialization=True)` in a trusted environment.')
    raise UserError(f'{path} has no *.safetensors files; expected a Hugging Face model directory.')
  names = {}
  for file in files:
    with safetensors.safe_open(file, framework='np') as f:
      names.update({name: file for name in f.keys()})
  return names


def _read_config(path: str) -> dict[str, Any]:
  file = os.path.join(path, 'config.json')
  if not os.path.isdir(path) or not os.path.exists(file):
    raise UserError(f'{path} is not a Hugging Face model directory (no config.json).')
  with open(file) as f:
    return json.load(f)


def _hf_shape(kind: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor shape that corresponds to our parameter shape."""
  if kind == 'copy':
    return shape
  if kind == 'flat':
    return (math.prod(shape),)
  n_in = kind[1]
  return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def from_hf_tensor(kind: Any, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if kind == 'copy' or kind == 'flat':
    return x.reshape(shape)
  return x.T.reshape(shape)


def to_hf_tensor(kind: Any, x: np.ndarray) -> np.ndarray:
  hf_shape = _hf_shape(kind, x.shape)
  if kind == 'copy' or kind == 'flat':
    return x.reshape(hf_shape)
  return np.ascontiguousarray(x.reshape(hf_shape[::-1]).T)


def _get(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def load_hf(path: str, *, dtype: str = 'bfloat16', param_dtype: str = 'float32',
            mesh: Mesh | None = None, rules: partitioning.Rules | None = None
            ) -> tuple[Model, Params]:
  """Loads an HF T5/Llama/Qwen2 directory into (Model, unboxed params).

  dtype: activations; param_dtype: parameters. With `mesh` (and `rules`, by
  default the FSDP rules) each tensor is placed with its NamedSharding;
  otherwise on the default device.
  """
  hf_config = _read_config(path)
  files = _tensor_files(path)
  config = hf_maps.config_from_hf(hf_config, set(files), dtype=dtype, param_dtype=param_dtype)
  model = registry.build_model(config)
  abstract = registry.abstract_params(model)
  shapes = partitioning.strip_boxes(abstract)
  if mesh is not None:
    shardings = partitioning.param_shardings(
        abstract, mesh, rules if rules is not None else partitioning.fsdp_rules())
  params: dict = {}
  with contextlib.ExitStack() as stack:
    handles = {file: stack.enter_context(safetensors.safe_open(file, framework='np'))
               for file in set(files.values())}
    for name, ours, kind in hf_maps.tensor_table(config):
      if name not in files:
        raise UserError(f'{path}: tensor {name} is missing, but config.json needs it.')
      handle = handles[files[name]]
      shape = tuple(_get(shapes, ours).shape)
      got, want = tuple(handle.get_slice(name).get_shape()), _hf_shape(kind, shape)
      if got != want:
        raise UserError(f'{path}: tensor {name} has shape {list(got)} but config.json implies '
                        f'{list(want)}; the weights do not match the configuration.')
      value = from_hf_tensor(kind, handle.get_tensor(name), shape).astype(jnp.dtype(param_dtype))
      target = _get(shardings, ours) if mesh is not None else None
      _set(params, ours, jax.device_put(value, target))
  assert jax.tree.structure(params) == jax.tree.structure(shapes), 'incomplete tensor table'
  return model, params


def save_hf(model: Model, params: Params, path: str) -> None:
  """Writes config.json + model.safetensors (param dtype) that `transformers` loads."""
  registry.check_new_destination(path)
  config = model.config
  params = partitioning.strip_boxes(params)
  tensors = {}
  for name, ours, kind in hf_maps.tensor_table(config):
    tensors[name] = to_hf_tensor(kind, np.asarray(jax.device_get(_get(params, ours))))
  if isinstance(config, T5Config) and config.tie_embeddings:
    tensors['lm_head.weight'] = tensors['shared.weight'].copy()
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf_maps.config_to_hf(config), f, indent=2, sort_keys=True)
  safetensors.numpy.save_file(tensors, os.path.join(path, 'model.safetensors'),
                              metadata={'format': 'pt'})
