"""Converts model checkpoints between Hugging Face and gkd formats.

  python -m gkd.convert --direction=hf_to_gkd --src=/path/to/hf_model --dst=/path/to/ours
  python -m gkd.convert --direction=gkd_to_hf --src=/path/to/ours --dst=/path/to/hf_model

Hugging Face: config.json + *.safetensors (T5/FLAN-T5, Llama, Qwen2).
gkd: model_config.json + an Orbax checkpoint of the params in params/.
The destination must not exist or be empty; nothing is overwritten.
"""

import sys

from absl import app, flags

from gkd import startup
from gkd.errors import UserError
from gkd.models import checkpoint, hf, registry

_DIRECTION = flags.DEFINE_enum('direction', None, ['hf_to_gkd', 'gkd_to_hf'],
                               'Which way to convert.')
_SRC = flags.DEFINE_string('src', None, 'Source checkpoint directory.')
_DST = flags.DEFINE_string('dst', None, 'Destination directory (absent or empty).')
_PARAM_DTYPE = flags.DEFINE_enum('param_dtype', 'float32', ['float32', 'bfloat16'],
                                 'hf_to_gkd: dtype of the stored parameters.')


def convert(direction: str, src: str, dst: str, param_dtype: str = 'float32') -> None:
  """Converts `src` into `dst` (see the module docstring)."""
  registry.check_new_destination(dst)
  if direction == 'hf_to_gkd':
    model, params = hf.load_hf(src, param_dtype=param_dtype)
    checkpoint.save_model(dst, model, params)
  elif direction == 'gkd_to_hf':
    model, params = checkpoint.load_model(src)
    hf.save_hf(model, params, dst)
  else:
    raise UserError(f'--direction must be hf_to_gkd or gkd_to_hf, got {direction!r}.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    convert(_DIRECTION.value, _SRC.value, _DST.value, _PARAM_DTYPE.value)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  startup.quiet()
  flags.mark_flags_as_required(['direction', 'src', 'dst'])
  startup.run_app(main, sys.argv)
