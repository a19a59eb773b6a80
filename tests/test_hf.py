"""Hugging Face import/export against transformers' own PyTorch models (no download)."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P

from gkd import partitioning
from gkd.errors import UserError
from gkd.models import DecoderConfig, T5Config, build_model, load_hf, registry, save_hf
from test_models_decoder import make_batch

VOCAB = 128


def tiny_hf(kind: str, untied_t5: bool = False):
  torch.manual_seed(0)
  common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
  if kind == 'llama':
    config = transformers.LlamaConfig(
        **common, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling=dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=16))
    model = transformers.LlamaForCausalLM(config)
  elif kind == 'qwen2':
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **common, tie_word_embeddings=True, rope_theta=1e6))
  else:
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
        num_heads=4, feed_forward_proj='gated-gelu', relative_attention_num_buckets=8,
        relative_attention_max_distance=20, tie_word_embeddings=not untied_t5)
    model = transformers.T5ForConditionalGeneration(config)
    if untied_t5:  # T5 v1.1: a separate output head
      model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32))
  with torch.no_grad():  # random norm scales, so that a transposed scale would show
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.uniform_(0.5, 1.5)
  model.config._attn_implementation = 'eager'
  return model.eval()


def hf_logits(model, batch) -> np.ndarray:
  """transformers' logits at our target positions, float32[B, O, V]."""
  t = lambda x: torch.tensor(np.asarray(x), dtype=torch.long)
  inputs, mask, targets = (t(batch[k]) for k in ('input_tokens', 'input_mask', 'target_tokens'))
  with torch.no_grad():
    if model.config.is_encoder_decoder:
      start_id = getattr(model.config, 'decoder_start_token_id', None)
      start = torch.full((targets.shape[0], 1), 0 if start_id is None else start_id)
      out = model(input_ids=inputs, attention_mask=mask,
                  decoder_input_ids=torch.cat([start, targets[:, :-1]], 1))
      return out.logits.numpy()
    ids = torch.cat([inputs, targets[:, :-1]], 1)
    full_mask = torch.cat([mask, torch.ones_like(targets[:, :-1])], 1)
    positions = (full_mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=full_mask, position_ids=positions)
    return out.logits[:, inputs.shape[1] - 1:].numpy()


def assert_rel_close(ours, ref, tol=1e-4):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape
  err = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
  assert err <= tol, f'relative error {err:.2e} > {tol}'


BATCH = make_batch(np.random.default_rng(0), [7, 3, 1], 7, 5, VOCAB)

CASES = [('llama', False), ('qwen2', False), ('t5', False), ('t5', True)]
IDS = ['llama', 'qwen2', 't5_tied', 't5_v1_1']


@pytest.fixture(scope='module', params=CASES, ids=IDS)
def saved(request, tmp_path_factory):
  kind, untied = request.param
  model = tiny_hf(kind, untied)
  path = str(tmp_path_factory.mktemp(kind) / 'hf')
  # Shard the Llama checkpoint to exercise model.safetensors.index.json.
  model.save_pretrained(path, safe_serialization=True,
                        **({'max_shard_size': '40KB'} if kind == 'llama' else {}))
  if kind == 'llama':
    assert os.path.exists(os.path.join(path, 'model.safetensors.index.json'))
  return model, path


def test_import_matches_transformers(saved):
  hf_model, path = saved
  model, params = load_hf(path, dtype='float32')
  assert model.is_encoder_decoder == hf_model.config.is_encoder_decoder
  assert_rel_close(model.logits(params, BATCH), hf_logits(hf_model, BATCH))


def test_export_reloads_in_transformers(saved, tmp_path):
  hf_model, path = saved
  model, params = load_hf(path, dtype='float32')
  save_hf(model, params, str(tmp_path / 'out'))
  load = lambda p: type(hf_model).from_pretrained(p, attn_implementation='eager')
  # Both loaded by from_pretrained: a freshly constructed model differs in the last bits.
  np.testing.assert_array_equal(hf_logits(load(str(tmp_path / 'out')), BATCH),
                                hf_logits(load(path), BATCH))


@pytest.mark.parametrize('config', [
    DecoderConfig(vocab_size=VOCAB, embed_dim=32, mlp_dim=64, num_heads=4, num_kv_heads=1,
                  head_dim=8, qkv_bias=True, tie_embeddings=False, dtype='float32'),
    DecoderConfig(vocab_size=VOCAB, embed_dim=32, mlp_dim=64, num_heads=4, num_kv_heads=2,
                  head_dim=16, rope_scaling_factor=32.0, rope_original_max_len=8, rope_theta=5e5,
                  dtype='float32'),
    T5Config(vocab_size=VOCAB, embed_dim=32, mlp_dim=64, num_heads=4, head_dim=8,
             relpos_buckets=8, relpos_max_distance=16, dtype='float32'),
], ids=['qwen2', 'llama3', 't5'])
def test_export_of_our_init_matches_transformers(config, tmp_path):
  model = build_model(config)
  params = jax.jit(lambda r: nn.unbox(model.init(r, BATCH)))(jax.random.key(1))
  save_hf(model, params, str(tmp_path / 'hf'))
  reloaded = transformers.AutoModelForSeq2SeqLM if isinstance(config, T5Config) else (
      transformers.AutoModelForCausalLM)
  hf_model = reloaded.from_pretrained(str(tmp_path / 'hf'), attn_implementation='eager').eval()
  assert_rel_close(model.logits(params, BATCH), hf_logits(hf_model, BATCH))


def test_import_places_params_on_mesh(saved):
  _, path = saved
  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  model, params = load_hf(path, dtype='float32', mesh=mesh, rules=partitioning.fsdp_tp_rules())
  embed = params['token_embed' if model.is_encoder_decoder else 'embed']['embedding']
  assert embed.sharding.spec == P('tensor', 'fsdp')
  expected = nn.unbox(registry.abstract_params(model))
  assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape, expected)


def test_refuses_pickle_checkpoints(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps(tiny_hf('qwen2').config.to_dict()))
  (tmp_path / 'pytorch_model.bin').write_bytes(b'not loaded')
  with pytest.raises(UserError, match=r'pickle checkpoints \(pytorch_model\.bin\).*safetensors'):
    load_hf(str(tmp_path))


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
  tiny_hf('llama').save_pretrained(str(tmp_path), safe_serialization=True)
  config = json.loads((tmp_path / 'config.json').read_text())
  config['intermediate_size'] = 48
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(UserError, match=r'model\.layers\.0\.mlp\.gate_proj\.weight has shape '
                     r'\[64, 32\] but config\.json implies \[48, 32\]'):
    load_hf(str(tmp_path))


def test_bfloat16_parameters(saved):
  _, path = saved
  model, params = load_hf(path, dtype='float32')
  _, bf16 = load_hf(path, dtype='float32', param_dtype='bfloat16')
  assert {x.dtype for x in jax.tree.leaves(bf16)} == {jnp.dtype('bfloat16')}
  assert_rel_close(model.logits(bf16, BATCH), model.logits(params, BATCH), 3e-2)


def test_export_refuses_non_empty_destination(saved, tmp_path):
  _, path = saved
  model, params = load_hf(path, dtype='float32')
  (tmp_path / 'keep.txt').write_text('x')
  with pytest.raises(UserError, match='not empty'):
    save_hf(model, params, str(tmp_path))
