"""Hugging Face <-> gkd: config.json translation and tensor name tables.

A tensor table lists (hf_name, our_path, kind) where kind says how an HF
tensor becomes our parameter:
  'copy'       same array (embeddings, norm scales, relative-position tables);
  'flat'       HF [H*D] bias <-> ours [H, D];
  ('linear',n) HF torch Linear weight [out, in] <-> our kernel [*in, *out]
               whose first n axes are the input axes: kernel = W.T.reshape(...).
"""

from typing import Any

from gkd.errors import UserError
from gkd.models import layers
from gkd.models.decoder import DecoderConfig
from gkd.models.t5 import T5Config

Entry = tuple[str, tuple[str, ...], Any]

IN = ('linear', 1)  # q/k/v, mlp in, lm_head
OUT_HEADS = ('linear', 2)  # attention output [H, D, E]


def _attention(hf: str, ours: tuple[str, ...], names: str, bias: bool) -> list[Entry]:
  q, k, v, o = names.split(',')
  rows = [(f'{hf}.{q}.weight', ours + ('query', 'kernel'), IN),
          (f'{hf}.{k}.weight', ours + ('key', 'kernel'), IN),
          (f'{hf}.{v}.weight', ours + ('value', 'kernel'), IN),
          (f'{hf}.{o}.weight', ours + ('out', 'kernel'), OUT_HEADS)]
  if bias:
    rows += [(f'{hf}.{n}.bias', ours + (p, 'bias'), 'flat')
             for n, p in ((q, 'query'), (k, 'key'), (v, 'value'))]
  return rows


def decoder_tensors(cfg: DecoderConfig) -> list[Entry]:
  rows = [('model.embed_tokens.weight', ('embed', 'embedding'), 'copy'),
          ('model.norm.weight', ('final_norm', 'scale'), 'copy')]
  for i in range(cfg.num_layers):
    hf, ours = f'model.layers.{i}', (f'layers_{i}',)
    rows += _attention(f'{hf}.self_attn', ours + ('attn',), 'q_proj,k_proj,v_proj,o_proj',
                       cfg.qkv_bias)
    rows += [(f'{hf}.input_layernorm.weight', ours + ('attn_norm', 'scale'), 'copy'),
             (f'{hf}.post_attention_layernorm.weight', ours + ('mlp_norm', 'scale'), 'copy'),
             (f'{hf}.mlp.gate_proj.weight', ours + ('mlp', 'wi_0', 'kernel'), IN),
             (f'{hf}.mlp.up_proj.weight', ours + ('mlp', 'wi_1', 'kernel'), IN),
             (f'{hf}.mlp.down_proj.weight', ours + ('mlp', 'wo', 'kernel'), IN)]
  if not cfg.tie_embeddings:
    rows.append(('lm_head.weight', ('lm_head', 'kernel'), IN))
  return rows


def _t5_mlp(hf: str, ours: tuple[str, ...], gated: bool) -> list[Entry]:
  names = ('wi_0', 'wi_1', 'wo') if gated else ('wi', 'wo')
  return [(f'{hf}.DenseReluDense.{n}.weight', ours + ('mlp', n, 'kernel'), IN) for n in names]


def t5_tensors(cfg: T5Config) -> list[Entry]:
  rows = [('shared.weight', ('token_embed', 'embedding'), 'copy'),
          ('encoder.final_layer_norm.weight', ('encoder_norm', 'scale'), 'copy'),
          ('decoder.final_layer_norm.weight', ('decoder_norm', 'scale'), 'copy')]
  for stack, n_layers in (('encoder', cfg.num_encoder_layers), ('decoder', cfg.num_decoder_layers)):
    rows.append((f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
                 (f'{stack}_relpos', 'rel_embedding'), 'copy'))
    for i in range(n_layers):
      hf, ours = f'{stack}.block.{i}.layer', (f'{stack}_layers_{i}',)
      rows += _attention(f'{hf}.0.SelfAttention', ours + ('attn',), 'q,k,v,o', False)
      rows.append((f'{hf}.0.layer_norm.weight', ours + ('attn_norm', 'scale'), 'copy'))
      mlp = 1
      if stack == 'decoder':
        rows += _attention(f'{hf}.1.EncDecAttention', ours + ('cross',), 'q,k,v,o', False)
        rows.append((f'{hf}.1.layer_norm.weight', ours + ('cross_norm', 'scale'), 'copy'))
        mlp = 2
      rows += _t5_mlp(f'{hf}.{mlp}', ours, cfg.gated)
      rows.append((f'{hf}.{mlp}.layer_norm.weight', ours + ('mlp_norm', 'scale'), 'copy'))
  if not cfg.tie_embeddings:
    rows.append(('lm_head.weight', ('lm_head', 'kernel'), IN))
  return rows


def tensor_table(cfg: Any) -> list[Entry]:
  return t5_tensors(cfg) if isinstance(cfg, T5Config) else decoder_tensors(cfg)


# --- config.json ---

_DECODER_TYPES = ('llama', 'qwen2')


def _first(x: Any, default: int) -> int:
  if isinstance(x, (list, tuple)):
    x = x[0] if x else None
  return default if x is None else int(x)


def _rope(d: dict[str, Any]) -> dict[str, Any]:
  """RoPE fields from either transformers 5 `rope_parameters` or v4 `rope_theta`/`rope_scaling`."""
  params = dict(d.get('rope_scaling') or {})
  params.update(d.get('rope_parameters') or {})
  theta = params.get('rope_theta', d.get('rope_theta', 10000.0))
  kind = params.get('rope_type', params.get('type', 'default'))
  if kind == 'default':
    return dict(rope_theta=float(theta))
  if kind != 'llama3':
    raise UserError(f'config.json: rope_type {kind!r} is not supported (only default and llama3).')
  return dict(rope_theta=float(theta), rope_scaling_factor=float(params['factor']),
              rope_low_freq_factor=float(params['low_freq_factor']),
              rope_high_freq_factor=float(params['high_freq_factor']),
              rope_original_max_len=int(params['original_max_position_embeddings']))


def decoder_config_from_hf(d: dict[str, Any], **overrides) -> DecoderConfig:
  kind = d.get('model_type')
  if d.get('hidden_act', 'silu') != 'silu' or d.get('mlp_bias'):
    raise UserError('config.json: only SiLU MLPs without bias are supported.')
  if kind == 'llama' and d.get('attention_bias'):
    raise UserError('config.json: Llama with attention_bias (o_proj bias) is not supported.')
  if d.get('use_sliding_window'):
    raise UserError('config.json: sliding-window attention is not supported; set '
                    'use_sliding_window to false.')
  heads = d['num_attention_heads']
  default = DecoderConfig()
  return DecoderConfig(
      vocab_size=d['vocab_size'], embed_dim=d['hidden_size'], mlp_dim=d['intermediate_size'],
      num_layers=d['num_hidden_layers'], num_heads=heads,
      num_kv_heads=d.get('num_key_value_heads') or heads,
      head_dim=d.get('head_dim') or d['hidden_size'] // heads, **_rope(d),
      qkv_bias=kind == 'qwen2', tie_embeddings=bool(d.get('tie_word_embeddings', False)),
      norm_eps=d.get('rms_norm_eps', 1e-6), bos_id=_first(d.get('bos_token_id'), default.bos_id),
      eos_id=_first(d.get('eos_token_id'), default.eos_id),
      pad_id=_first(d.get('pad_token_id'), default.pad_id),
      max_len=d.get('max_position_embeddings', default.max_len), **overrides)


def decoder_config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
  kind = 'qwen2' if cfg.qkv_bias else 'llama'
  out = dict(
      architectures=['Qwen2ForCausalLM' if cfg.qkv_bias else 'LlamaForCausalLM'],
      model_type=kind, vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim,
      intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, hidden_act='silu', rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
      max_position_embeddings=cfg.max_len, bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id,
      pad_token_id=cfg.pad_id, torch_dtype=cfg.param_dtype)
  if cfg.rope_scaling:
    out['rope_scaling'] = dict(rope_type='llama3', **cfg.rope_scaling)
  if kind == 'llama':
    out.update(attention_bias=False, mlp_bias=False)
  else:
    out.update(use_sliding_window=False)
  return out


def t5_config_from_hf(d: dict[str, Any], tensor_names: set[str], **overrides) -> T5Config:
  proj = d.get('feed_forward_proj', 'relu')
  parts = proj.split('-')
  # Some FLAN-T5 configs say feed_forward_proj "gelu" with is_gated_act true: trust the
  # explicit fields when present.
  gated = bool(d.get('is_gated_act', parts[0] == 'gated'))
  activation = d.get('dense_act_fn') or ('gelu_new' if proj == 'gated-gelu' else parts[-1])
  if activation not in layers.ACTIVATIONS:
    raise UserError(f'config.json: activation {activation!r} is not supported; use one of '
                    f'{sorted(layers.ACTIVATIONS)}.')
  # transformers < 5 used tie_word_embeddings=False to mean "T5 v1.1: do not scale"; 5 splits
  # that into scale_decoder_outputs. Whether the head is tied shows in the tensors themselves.
  scale = d.get('scale_decoder_outputs', d.get('tie_word_embeddings', True) is not False)
  return T5Config(
      vocab_size=d['vocab_size'], embed_dim=d['d_model'], mlp_dim=d['d_ff'],
      num_encoder_layers=d['num_layers'],
      num_decoder_layers=d.get('num_decoder_layers') or d['num_layers'],
      num_heads=d['num_heads'], head_dim=d['d_kv'],
      relpos_buckets=d.get('relative_attention_num_buckets', 32),
      relpos_max_distance=d.get('relative_attention_max_distance', 128),
      activation=activation, gated=gated,
      tie_embeddings='lm_head.weight' not in tensor_names, scale_decoder_outputs=bool(scale),
      norm_eps=d.get('layer_norm_epsilon', 1e-6), pad_id=_first(d.get('pad_token_id'), 0),
      eos_id=_first(d.get('eos_token_id'), 1),
      decoder_start_id=_first(d.get('decoder_start_token_id'), _first(d.get('pad_token_id'), 0)),
      **overrides)


def t5_config_to_hf(cfg: T5Config) -> dict[str, Any]:
  if cfg.gated and cfg.activation == 'gelu':
    raise UserError('transformers cannot express a gated exact-GELU T5 (its "gated-gelu" is the '
                    'tanh approximation); set activation="gelu_new".')
  proj = ('gated-gelu' if cfg.activation == 'gelu_new' else f'gated-{cfg.activation}'
          ) if cfg.gated else cfg.activation
  return dict(
      architectures=['T5ForConditionalGeneration'], model_type='t5',
      vocab_size=cfg.vocab_size, d_model=cfg.embed_dim, d_ff=cfg.mlp_dim, d_kv=cfg.head_dim,
      num_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers,
      num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relpos_buckets,
      relative_attention_max_distance=cfg.relpos_max_distance, feed_forward_proj=proj,
      dense_act_fn=cfg.activation, is_gated_act=cfg.gated,
      # Read as "scale decoder outputs" by transformers 5 and 4 alike; lm_head.weight is
      # always written, so the head loads right whether or not the reader ties it.
      tie_word_embeddings=cfg.scale_decoder_outputs, layer_norm_epsilon=cfg.norm_eps,
      dropout_rate=0.0, is_encoder_decoder=True, pad_token_id=cfg.pad_id,
      eos_token_id=cfg.eos_id, decoder_start_token_id=cfg.decoder_start_id,
      torch_dtype=cfg.param_dtype)


def config_from_hf(d: dict[str, Any], tensor_names: set[str], **overrides) -> Any:
  kind = d.get('model_type')
  if kind == 't5':
    return t5_config_from_hf(d, tensor_names, **overrides)
  if kind in _DECODER_TYPES:
    return decoder_config_from_hf(d, **overrides)
  raise UserError(f'config.json: model_type {kind!r} is not supported; use a T5/FLAN-T5, '
                  f'Llama or Qwen2 checkpoint.')


def config_to_hf(cfg: Any) -> dict[str, Any]:
  return t5_config_to_hf(cfg) if isinstance(cfg, T5Config) else decoder_config_to_hf(cfg)
