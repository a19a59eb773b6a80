"""Tokenised examples -> the model batch contract (gkd/models/api.py).

One contract for both architectures:
  input_tokens  int32[B, I]  [BOS] + input (+ [EOS]), LEFT-padded
  input_mask    int32[B, I]  1 on real input tokens
  target_tokens int32[B, O]  target + [EOS] when it fits, RIGHT-padded
  target_mask   int32[B, O]  1 on target tokens (EOS included)
Padding is filled with `pad_id` but only the masks say what is padding.
"""

import dataclasses
from typing import Optional, Sequence

import numpy as np
import seqio

from gkd.errors import UserError
from gkd.tasks import vocabularies

KEYS = ("input_tokens", "input_mask", "target_tokens", "target_mask")


@dataclasses.dataclass(frozen=True)
class Converter:
  """How one example's ids become one row (see module docstring).

  bos_id: prepended to every input (decoder-only prompts), or None.
  input_eos_id: appended to every input (T5 encoder inputs), or None.
  keep_input_end: on overflow keep the input's end (few-shot prompts whose
    question comes last) instead of its start (documents).
  """
  input_length: int
  target_length: int
  eos_id: int
  pad_id: int = 0
  bos_id: Optional[int] = None
  input_eos_id: Optional[int] = None
  keep_input_end: bool = False

  def __post_init__(self):
    affixes = (self.bos_id is not None) + (self.input_eos_id is not None)
    if self.input_length <= affixes or self.target_length < 1:
      raise UserError(
          f"input_length={self.input_length} / target_length="
          f"{self.target_length} leave no room for tokens; use larger lengths")

  def input_row(self, ids: Sequence[int]) -> np.ndarray:
    prefix = [] if self.bos_id is None else [self.bos_id]
    suffix = [] if self.input_eos_id is None else [self.input_eos_id]
    room = self.input_length - len(prefix) - len(suffix)
    body = list(ids[-room:] if self.keep_input_end else ids[:room])
    return np.asarray(prefix + body + suffix, np.int32)

  def target_row(self, ids: Sequence[int]) -> np.ndarray:
    body = list(ids[:self.target_length])
    if len(body) < self.target_length:
      body.append(self.eos_id)
    return np.asarray(body, np.int32)

  def batch(self, examples: Sequence[tuple[Sequence[int], Sequence[int]]]
            ) -> dict[str, np.ndarray]:
    """(input ids, target ids) pairs -> the four contract arrays."""
    b, i, o = len(examples), self.input_length, self.target_length
    out = {"input_tokens": np.full((b, i), self.pad_id, np.int32),
           "input_mask": np.zeros((b, i), np.int32),
           "target_tokens": np.full((b, o), self.pad_id, np.int32),
           "target_mask": np.zeros((b, o), np.int32)}
    for row, (inputs, targets) in enumerate(examples):
      x, y = self.input_row(inputs), self.target_row(targets)
      if not len(x):
        raise UserError(
            f"example {row} of this batch has an empty input and the "
            "vocabulary has no BOS; drop empty inputs from the data")
      out["input_tokens"][row, i - len(x):] = x
      out["input_mask"][row, i - len(x):] = 1
      out["target_tokens"][row, :len(y)] = y
      out["target_mask"][row, :len(y)] = 1
    return out


def converter_for(vocab: seqio.Vocabulary, input_length: int,
                  target_length: int, *, add_bos: Optional[bool] = None,
                  add_input_eos: Optional[bool] = None,
                  keep_input_end: bool = False) -> Converter:
  """The converter for a vocabulary's conventions.

  By default prompts start with BOS when the vocabulary has one (Llama, the
  word vocabulary), and inputs end with EOS for SentencePiece (T5 encoders).
  """
  bos = vocabularies.bos_id(vocab)
  if add_bos is None:
    add_bos = bos is not None
  if add_bos and bos is None:
    raise UserError("add_bos=True but the vocabulary has no BOS token")
  if add_input_eos is None:
    add_input_eos = isinstance(vocab, seqio.SentencePieceVocabulary)
  return Converter(
      input_length=input_length, target_length=target_length,
      eos_id=int(vocab.eos_id), pad_id=int(vocab.pad_id),
      bos_id=bos if add_bos else None,
      input_eos_id=int(vocab.eos_id) if add_input_eos else None,
      keep_input_end=keep_input_end)


def decode(vocab: seqio.Vocabulary, ids: np.ndarray, mask: np.ndarray
           ) -> list[str]:
  """Texts of int[B, L] ids where mask is 1, cut at the first EOS.

  Ids the vocabulary does not have (a model's padded vocabulary) are dropped.
  """
  ids, mask = np.asarray(ids), np.asarray(mask)
  texts = []
  for row, keep in zip(ids, mask):
    tokens = [int(t) for t in row[keep.astype(bool)]]
    if vocab.eos_id in tokens:
      tokens = tokens[:tokens.index(vocab.eos_id)]
    # Models may pad their vocabulary: ids past the tokenizer's are dropped.
    texts.append(vocab.decode([t for t in tokens if t < vocab.vocab_size]))
  return texts
