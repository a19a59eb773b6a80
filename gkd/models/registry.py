"""Config class <-> Model class, and configs to/from JSON (model_config.json)."""

import dataclasses
import json
import os
from typing import Any

import gin
import jax
import jax.numpy as jnp

from gkd.errors import UserError
from gkd.models.api import Model, Params
from gkd.models.decoder import DecoderConfig, DecoderModel
from gkd.models.t5 import T5Config, T5Model

Config = DecoderConfig | T5Config

# architecture name (as written in model_config.json) -> (config class, model class)
ARCHITECTURES: dict[str, tuple[type, type]] = {
    'decoder': (DecoderConfig, DecoderModel),
    't5': (T5Config, T5Model),
}


@gin.configurable(module='models')
def build_model(config: Config) -> Model:
  """The Model (gkd/models/api.py) for a DecoderConfig or T5Config."""
  for config_cls, model_cls in ARCHITECTURES.values():
    if isinstance(config, config_cls):
      return model_cls(config)
  raise UserError(f'build_model: {type(config).__name__} is not a model config; '
                  f'use one of {[c.__name__ for c, _ in ARCHITECTURES.values()]}.')


def abstract_params(model: Model) -> Params:
  """Boxed ShapeDtypeStructs of the model's parameters (nothing is allocated)."""
  one = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  batch = dict(input_tokens=one, input_mask=one, target_tokens=one, target_mask=one)
  return jax.eval_shape(model.init, jax.random.key(0), batch)


def architecture_of(config: Config) -> str:
  for name, (config_cls, _) in ARCHITECTURES.items():
    if isinstance(config, config_cls):
      return name
  raise UserError(f'{type(config).__name__} is not a model config.')


def config_to_dict(config: Config) -> dict[str, Any]:
  return {'architecture': architecture_of(config), **dataclasses.asdict(config)}


def config_from_dict(d: dict[str, Any]) -> Config:
  d = dict(d)
  name = d.pop('architecture', None)
  if name not in ARCHITECTURES:
    raise UserError(f'model config: unknown architecture {name!r}; use one of {sorted(ARCHITECTURES)}.')
  config_cls = ARCHITECTURES[name][0]
  known = {f.name for f in dataclasses.fields(config_cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise UserError(f'model config: unknown {name} fields {unknown}; known fields: {sorted(known)}.')
  return config_cls(**d)


def check_new_destination(path: str) -> None:
  """Raises UserError unless `path` is absent or an empty directory."""
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise UserError(f'{path} exists and is not empty; choose a new destination.')


def save_model_config(config: Config, path: str) -> None:
  with open(path, 'w') as f:
    json.dump(config_to_dict(config), f, indent=2, sort_keys=True)


def load_model_config(path: str) -> Config:
  if not os.path.exists(path):
    raise UserError(f'{path} does not exist; a gkd model checkpoint has a model_config.json '
                    'next to its params (write one with `python -m gkd.convert`).')
  with open(path) as f:
    try:
      config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise UserError(f'{path} is not valid JSON ({e}); rewrite it with '
                      '`python -m gkd.convert` or restore it from the run.') from None
  if not isinstance(config, dict):
    raise UserError(f'{path} holds a JSON {type(config).__name__}, not a model config object.')
  return config_from_dict(config)
