"""Where a run's student and teacher come from: a config, a gkd checkpoint, or an HF directory.

Gin (scoped per role):
    student/gkd.train.ModelSource.config = @tiny/DecoderConfig()     # random init
    teacher/gkd.train.ModelSource.checkpoint = '/runs/teacher/export' # ours
    teacher/gkd.train.ModelSource.hf_dir = '/models/Qwen2.5-1.5B'     # Hugging Face
"""

import dataclasses
import os
from typing import Any, Optional

import gin
import jax
import jax.numpy as jnp

from gkd import models, partitioning
from gkd.errors import UserError
from gkd.models import layers
from gkd.models.api import Model


@gin.configurable(module="gkd.train")
@dataclasses.dataclass(frozen=True)
class ModelSource:
  """Exactly one of `config`, `checkpoint` or `hf_dir`.

  Attributes:
    config: a model config (DecoderConfig / T5Config): random initialisation.
    checkpoint: a directory written by `gkd.models.save_model`,
      `python -m gkd.convert`, or a training run's `<model_dir>/export`.
    hf_dir: a Hugging Face directory (config.json + *.safetensors).
    dtype: activation dtype override ('bfloat16', 'float32').
    param_dtype: parameter dtype override (e.g. a bfloat16 teacher).
    remat: activation rematerialisation of each block in the student's
      backward pass: 'none', 'full' or 'dots' (gkd.models.layers.REMAT_POLICIES);
      unset keeps the model config's (default 'none').
    attention: 'dense' or 'blockwise' (decoder models: full sequences a block of
      keys at a time, gkd.models.blockwise); unset keeps the model config's.
    vocabulary: a teacher's own tokenizer (a `seqio.Vocabulary`, e.g.
      `@teacher/tasks.get_vocabulary()`) when it differs from the student's
      (`Method.cross_tokenizer`); None: the task's.
    input_length, target_length: that teacher's prompt and target lengths in
      its own tokens (default: the task's).
    target_in_context: a cross-tokenizer teacher trained on prompt and target
      as one text: re-tokenise the target's text as it reads after the prompt
      (`gkd.tasks.alignment.Aligner`); default: the target alone, as SeqIO
      tokenises it.
  """

  config: Any = None
  checkpoint: Optional[str] = None
  hf_dir: Optional[str] = None
  dtype: Optional[str] = None
  param_dtype: Optional[str] = None
  remat: Optional[str] = None
  attention: Optional[str] = None
  vocabulary: Any = None
  input_length: Optional[int] = None
  target_length: Optional[int] = None
  target_in_context: bool = False

  def __post_init__(self):
    if self.remat is not None:
      layers.check_remat(self.remat)
    if self.attention is not None:
      layers.check_attention(self.attention, 1)
    given = [k for k in ("config", "checkpoint", "hf_dir") if getattr(self, k) is not None]
    if len(given) != 1:
      raise UserError(f"a ModelSource needs exactly one of config / checkpoint / hf_dir; "
                      f"got {given or 'none'}")
    for key in ("checkpoint", "hf_dir"):
      path = getattr(self, key)
      if path is not None and not os.path.isdir(path):
        raise UserError(f"ModelSource.{key}={path!r} is not a directory; point it at an "
                        f"existing {'gkd checkpoint' if key == 'checkpoint' else 'HF model'}")

  def describe(self) -> str:
    if self.config is not None:
      return f"init:{type(self.config).__name__}"
    return f"checkpoint:{self.checkpoint}" if self.checkpoint else f"hf:{self.hf_dir}"

  def _overrides(self) -> dict:
    return {k: v for k, v in (("dtype", self.dtype), ("param_dtype", self.param_dtype)) if v}

  def _with_runtime(self, model: Model) -> Model:
    """The model with this source's remat / attention: same parameters, other programs."""
    change = {k: getattr(self, k) for k in ("remat", "attention") if getattr(self, k)}
    if not change:
      return model
    missing = [k for k in change if not hasattr(model.config, k)]
    if missing:
      raise UserError(f"ModelSource.{missing[0]} does not apply to a "
                      f"{type(model.config).__name__} (decoder models only); unset it")
    return models.build_model(dataclasses.replace(model.config, **change))

  def load(self, rng: jax.Array, batch: dict, mesh, rules) -> tuple[Model, Any, Any]:
    """Returns (model, params placed on the mesh, their shardings)."""
    if self.config is not None:
      config = self.config
      if self._overrides():
        config = dataclasses.replace(config, **self._overrides())
      model = self._with_runtime(models.build_model(config))
      params, shardings = partitioning.init_sharded(model, rng, batch, mesh, rules)
      return model, params, shardings
    if self.checkpoint is not None:
      model, params = models.load_model(self.checkpoint, mesh=mesh, rules=rules,
                                        **self._overrides())
    else:
      model, params = models.load_hf(self.hf_dir, mesh=mesh, rules=rules, **self._overrides())
    if self.param_dtype:
      params = jax.tree.map(lambda x: x.astype(jnp.dtype(self.param_dtype)), params)
    return self._with_runtime(model), params, jax.tree.map(lambda x: x.sharding, params)
