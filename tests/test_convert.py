"""python -m gkd.convert: HF -> gkd -> HF round trips and the no-overwrite rule."""

import os

import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from gkd import convert, partitioning
from gkd.errors import UserError
from gkd.models import load_hf, load_model
from test_hf import BATCH, assert_rel_close, hf_logits, tiny_hf


@pytest.mark.parametrize('kind', ['qwen2', 't5'])
def test_round_trip_keeps_transformers_logits(kind, tmp_path):
  hf_model = tiny_hf(kind, untied_t5=True)
  hf_model.save_pretrained(str(tmp_path / 'hf'), safe_serialization=True)
  convert.convert('hf_to_gkd', str(tmp_path / 'hf'), str(tmp_path / 'ours'))
  assert sorted(os.listdir(tmp_path / 'ours')) == ['model_config.json', 'params']
  convert.convert('gkd_to_hf', str(tmp_path / 'ours'), str(tmp_path / 'back'))
  load = lambda p: type(hf_model).from_pretrained(str(p), attn_implementation='eager')
  np.testing.assert_array_equal(hf_logits(load(tmp_path / 'back'), BATCH),
                                hf_logits(load(tmp_path / 'hf'), BATCH))
  # Our checkpoint restores onto a mesh and computes the same logits as a direct import.
  mesh = partitioning.make_mesh(data=2, fsdp=4)
  model, params = load_model(str(tmp_path / 'ours'), mesh=mesh, dtype='float32')
  assert len(jax.tree.leaves(params)[0].sharding.device_set) == 8
  direct_model, direct = load_hf(str(tmp_path / 'hf'), dtype='float32')
  # Sharded sums may round differently.
  assert_rel_close(model.logits(params, BATCH), direct_model.logits(direct, BATCH), 1e-5)


def test_cli_refuses_to_overwrite(tmp_path, capsys):
  (tmp_path / 'dst').mkdir()
  (tmp_path / 'dst' / 'keep.txt').write_text('precious')
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(direction='hf_to_gkd', src=str(tmp_path / 'missing'),
                           dst=str(tmp_path / 'dst')):
    with pytest.raises(SystemExit) as exit_info:
      convert.main(['convert'])
  assert exit_info.value.code == 2
  assert 'not empty' in capsys.readouterr().err
  assert (tmp_path / 'dst' / 'keep.txt').read_text() == 'precious'


def test_missing_source_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match='no config.json'):
    convert.convert('hf_to_gkd', str(tmp_path / 'nothing'), str(tmp_path / 'dst'))
  with pytest.raises(UserError, match='model_config.json'):
    convert.convert('gkd_to_hf', str(tmp_path / 'nothing'), str(tmp_path / 'dst2'))
