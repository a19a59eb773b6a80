"""The model contract: what the trainer, sampler and evaluator may call.

No caller asks whether a model is encoder-decoder or decoder-only.

Batch (a dict of arrays; padding is never inferred from a token id, since id 0
is a real token in Llama 3 / Qwen2 vocabularies):

  input_tokens   int32[B, I]  source (T5 encoder input) or prompt (decoder-only),
                              LEFT-padded so every prompt ends at column I-1.
  input_mask     int32[B, I]  1 on real input tokens, 0 on padding. Every row
                              has at least one real token.
  target_tokens  int32[B, O]  outputs, RIGHT-padded; EOS is a real token.
  target_mask    int32[B, O]  1 on target tokens that count in the loss.

Decoder-only models read the sequence [input_tokens | target_tokens[:, :-1]]
with positions cumsum(mask) - 1, and their logit at column I-1+t predicts
target t. Encoder-decoder models read shift_right(target_tokens) with the
decoder start token.

The train step never needs `logits`: it takes `hidden` states and applies
`head` a chunk of tokens at a time inside the loss (gkd/losses/fused.py), so
no [B, O, V] array exists.

Parameters: `init` returns a *boxed* pytree (flax `nn.LogicallyPartitioned`
leaves carrying logical axis names); every other method takes plain
(`nn.unbox`-ed) parameters.
"""

from typing import Any, Mapping, Protocol

import jax

Array = jax.Array
Batch = Mapping[str, Array]
Params = Any
Cache = Any


class Model(Protocol):
  """An autoregressive LM, encoder-decoder or decoder-only."""

  vocab_size: int  # size of the logits' last axis
  eos_id: int

  def init(self, rng: Array, batch: Batch) -> Params:
    """Boxed parameters (logical axis names on every leaf)."""

  def hidden(self, params: Params, batch: Batch) -> Array:
    """Teacher-forced final decoder states at target positions: [B, O, E].

    Final-normed (T5 with `scale_decoder_outputs`: also scaled by
    d_model**-0.5), in the activation dtype; `head` maps them to logits.
    """

  def head_params(self, params: Params) -> Params:
    """The subtree of `params` that `head` reads (tied embedding or lm_head)."""

  def head(self, params: Params, hidden: Array) -> Array:
    """Output projection [..., E] -> float32[..., V]; `params` is the full tree or
    `head_params(params)`."""

  def logits(self, params: Params, batch: Batch) -> Array:
    """Teacher-forced next-token logits at target positions: float32[B, O, V].

    Equal to `head(params, hidden(params, batch))`.
    """

  def init_cache(self, params: Params, batch: Batch, max_new: int) -> tuple[Cache, Array]:
    """Prepares decoding of up to `max_new` new tokens.

    Runs the encoder once (T5) or pre-fills the prompt but its last token
    (decoder-only). Returns (cache, first_token int32[B]): the token to feed
    to the first `decode_step` (decoder start token, or the last prompt token).
    """

  def decode_step(self, params: Params, cache: Cache, token: Array) -> tuple[Array, Cache]:
    """Feeds token int32[B]; returns (next-token logits float32[B, V], cache).

    Step t's logits equal `logits(...)[:, t]` for the same targets.
    """
