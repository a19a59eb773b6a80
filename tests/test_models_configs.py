"""configs/models/*.gin: every file parses and gives the published parameter count."""

import glob
import math
import os

import gin
import jax
import pytest

from gkd import partitioning
from gkd.models import registry

CONFIG_DIR = os.path.join(os.path.dirname(__file__), '..', 'configs', 'models')

# Published sizes: exact where the model card gives the exact count, else to 3 digits.
PARAMS = {
    't5_1_1_small': 76_961_152, 't5_1_1_base': 247_577_856, 't5_1_1_large': 783_150_080,
    't5_1_1_xl': 2.85e9, 'flan_t5_small': 76_961_152, 'flan_t5_base': 247_577_856,
    'flan_t5_large': 783_150_080, 'flan_t5_xl': 2.85e9,
    'qwen2_5_0_5b': 494_032_768, 'qwen2_5_1_5b': 1.54e9, 'qwen2_5_7b': 7.62e9,
    'llama3_2_1b': 1_235_814_400, 'llama3_2_3b': 3.21e9,
}
FILES = sorted(os.path.basename(f)[:-4] for f in glob.glob(os.path.join(CONFIG_DIR, '*.gin')))


def build(name: str):
  gin.clear_config()
  path = os.path.join(CONFIG_DIR, f'{name}.gin')
  gin.parse_config_file(path)
  cls = 'T5Config' if 'models.T5Config' in open(path).read() else 'DecoderConfig'
  gin.parse_config(f'build_model.config = @{name}/models.{cls}()')
  return gin.get_configurable('models.build_model')()


def test_published_sizes_are_all_there():
  assert set(PARAMS) | {'tiny_t5', 'tiny_decoder'} <= set(FILES)


@pytest.mark.parametrize('name', FILES)
def test_parameter_count(name):
  model = build(name)
  shapes = partitioning.strip_boxes(registry.abstract_params(model))
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  expected = PARAMS.get(name)
  if expected is None:  # tiny test/demo models
    assert count < 2e6
  elif isinstance(expected, int):
    assert count == expected
  else:
    assert abs(count - expected) / expected < 0.005, count
  gin.clear_config()


def test_student_and_teacher_files_combine():
  gin.clear_config()
  for name in ('qwen2_5_0_5b', 'qwen2_5_7b'):
    gin.parse_config_file(os.path.join(CONFIG_DIR, f'{name}.gin'))
  gin.parse_config("""
      student/models.build_model.config = @qwen2_5_0_5b/models.DecoderConfig()
      teacher/models.build_model.config = @qwen2_5_7b/models.DecoderConfig()
      qwen2_5_7b/models.DecoderConfig.dtype = 'float32'
  """)
  build_model_fn = gin.get_configurable('models.build_model')
  with gin.config_scope('student'):
    student = build_model_fn()
  with gin.config_scope('teacher'):
    teacher = build_model_fn()
  assert (student.config.embed_dim, teacher.config.embed_dim) == (896, 3584)
  assert (student.config.dtype, teacher.config.dtype) == ('bfloat16', 'float32')
  gin.clear_config()
