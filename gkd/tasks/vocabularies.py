"""Vocabularies: SentencePiece (T5), Hugging Face `tokenizers`, a word vocabulary.

All are `seqio.Vocabulary` objects, chosen by Gin through `get_vocabulary`.
`bos_id(vocab)` is the BOS to prepend to prompts, or None (T5, Qwen2).

The TF encode/decode of our two vocabularies run their Python code through
`tf.numpy_function`, so the TF and Python paths can never disagree.
"""

import hashlib
import json
import os
import re
from typing import Optional, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from gkd.errors import UserError
from gkd.tasks import offline

_WORD_RE = re.compile(r"####|[A-Za-z]+|[0-9]|[^ \t\n\r\f\v]")
_NO_SPACE_BEFORE = frozenset(".,?!;:")


class _PythonTfVocabulary(seqio.Vocabulary):
  """TF methods that call the Python ones (1-D ids, scalar strings)."""

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    def encode(b):  # a bytes scalar, as a 0-d array in eager mode
      return np.asarray(self._encode(np.asarray(b).item().decode("utf-8")),
                        np.int32)
    ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
    return tf.ensure_shape(ids, [None])

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    text = tf.numpy_function(
        lambda a: self._decode(a.tolist()).encode("utf-8"), [ids], tf.string,
        stateful=False)
    return tf.ensure_shape(text, [])


class WordVocabulary(_PythonTfVocabulary):
  """A fixed word/digit/punctuation vocabulary: pad 0, eos 1, unk 2, bos 3.

  Words are runs of ASCII letters; digits and other characters are single
  tokens ("####" is one). Decoding joins tokens with spaces, except between
  digits and before . , ? ! ; : -- the canonical form of the offline tasks.
  """

  SPECIALS = ("<pad>", "<eos>", "<unk>", "<bos>")

  def __init__(self, words: Sequence[str]):
    super().__init__(extra_ids=0)
    self._tokens = self.SPECIALS + tuple(w for w in words
                                         if w not in self.SPECIALS)
    self._ids = {t: i for i, t in enumerate(self._tokens)}

  @property
  def bos_id(self) -> int:
    return 3

  @property
  def eos_id(self) -> int:
    return 1

  @property
  def unk_id(self) -> int:
    return 2

  @property
  def _base_vocab_size(self) -> int:
    return len(self._tokens)

  @property
  def tokens(self) -> tuple[str, ...]:
    return self._tokens

  def _encode(self, s: str) -> list[int]:
    return [self._ids.get(t, 2) for t in _WORD_RE.findall(s)]

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    """Native TF twin of `_encode` (RE2 and Python agree on these classes)."""
    if not hasattr(self, "_table"):
      with tf.init_scope():  # eager, outside whichever graph traces this
        self._table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(self._tokens), tf.range(len(self._tokens))), 2)
    s = tf.strings.regex_replace(s, r"[\t\n\r\f\v]", " ")
    s = tf.strings.regex_replace(s, f"({_WORD_RE.pattern})", r" \1 ")
    tokens = tf.strings.split(s, sep=" ")
    tokens = tf.boolean_mask(tokens, tf.strings.length(tokens) > 0)
    return tf.cast(self._table.lookup(tokens), tf.int32)

  def _decode(self, ids: Sequence[int]) -> str:
    words = [self._tokens[i] for i in ids if 4 <= i < len(self._tokens)]
    text = words[:1]
    for prev, word in zip(words, words[1:]):
      glued = word in _NO_SPACE_BEFORE or (prev.isdigit() and word.isdigit())
      text.append(word if glued else " " + word)
    return "".join(text)

  def __eq__(self, other):
    return isinstance(other, WordVocabulary) and other.tokens == self.tokens


def _first_token(tokenizer, candidates: Sequence[str]) -> Optional[int]:
  for token in candidates:
    if token and tokenizer.token_to_id(token) is not None:
      return tokenizer.token_to_id(token)
  return None


def _token_name(value) -> Optional[str]:
  return value.get("content") if isinstance(value, dict) else value


class HfTokenizerVocabulary(_PythonTfVocabulary):
  """A Hugging Face `tokenizers` tokenizer.json as a seqio vocabulary.

  Special tokens come from arguments, else from a tokenizer_config.json next
  to the file, else from common names (<s>, <|begin_of_text|>, </s>, ...).
  Encoding never adds special tokens: the feature converter adds BOS/EOS.
  """

  def __init__(self, path: str, *, bos_token: Optional[str] = None,
               eos_token: Optional[str] = None, pad_token: Optional[str] = None):
    import tokenizers  # pylint: disable=g-import-not-at-top
    super().__init__(extra_ids=0)
    if not os.path.isfile(path):
      raise UserError(f"tokenizer file {path!r} does not exist; point "
                      "get_vocabulary.path at a tokenizer.json")
    self._path = path
    with open(path, "rb") as f:
      self._fingerprint = hashlib.sha1(f.read()).hexdigest()
    self._tokenizer = tokenizers.Tokenizer.from_file(path)
    config = {}
    config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if os.path.isfile(config_path):
      try:
        with open(config_path) as f:
          config = dict(json.load(f))
      except (ValueError, TypeError) as e:
        raise UserError(f"{config_path} is not a JSON object ({e}); fix or "
                        "remove it") from None

    def names(key, arg, defaults):  # the argument, else config, else defaults
      if arg or key in config:
        return [arg or _token_name(config.get(key))]
      return defaults
    self._bos = _first_token(self._tokenizer, names(
        "bos_token", bos_token, ["<s>", "<|begin_of_text|>", "<bos>"]))
    if not bos_token and config.get("add_bos_token") is False:
      self._bos = None
    self._eos = _first_token(self._tokenizer, names(
        "eos_token", eos_token,
        ["</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<eos>"]))
    if self._eos is None:
      raise UserError(f"{path}: no EOS token found; set "
                      "tasks.get_vocabulary.eos_token to its end token")
    self._unk = _first_token(self._tokenizer, ["<unk>"])
    self._pad = _first_token(self._tokenizer,
                             names("pad_token", pad_token, ["<pad>"]))

  @property
  def tokenizer(self):
    return self._tokenizer

  @property
  def fingerprint(self) -> str:
    return self._fingerprint

  @property
  def bos_id(self) -> Optional[int]:
    return self._bos

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def pad_id(self) -> int:
    return self._eos if self._pad is None else self._pad  # only a fill value

  @property
  def unk_id(self) -> Optional[int]:
    return self._unk

  @property
  def _base_vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def _encode(self, s: str) -> list[int]:
    return self._tokenizer.encode(s, add_special_tokens=False).ids

  def _decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode(list(ids), skip_special_tokens=True)

  def __eq__(self, other):
    return (isinstance(other, HfTokenizerVocabulary)
            and other.fingerprint == self.fingerprint
            and (other.bos_id, other.eos_id) == (self.bos_id, self.eos_id))


def bos_id(vocab: seqio.Vocabulary) -> Optional[int]:
  """The BOS id to prepend to prompts, or None when the vocabulary has none."""
  try:
    value = vocab.bos_id
  except NotImplementedError:
    return None
  return None if value is None or value < 0 else int(value)


def fingerprint(vocab: seqio.Vocabulary) -> str:
  """A short stable hash identifying a vocabulary's tokenisation."""
  if isinstance(vocab, WordVocabulary):
    data = "word:" + "\n".join(vocab.tokens)
  elif isinstance(vocab, HfTokenizerVocabulary):
    data = f"hf:{vocab.fingerprint}:{vocab.bos_id}:{vocab.eos_id}"
  elif isinstance(vocab, seqio.SentencePieceVocabulary):
    data = f"sp:{hashlib.sha1(vocab.sp_model).hexdigest()}:{vocab.extra_ids}"
  else:
    data = f"{type(vocab).__name__}:{vocab.vocab_size}:{vocab.extra_ids}"
  return hashlib.sha1(data.encode()).hexdigest()[:10]


_CACHE = {}
KINDS = ("word", "sentencepiece", "hf", "byte")


@gin.configurable(module="tasks")
def get_vocabulary(kind: str = "word", path: Optional[str] = None, *,
                   extra_ids: int = 0, bos_token: Optional[str] = None,
                   eos_token: Optional[str] = None) -> seqio.Vocabulary:
  """The vocabulary of one kind: 'word' (offline tasks, no file),
  'sentencepiece' (a .model file, T5), 'hf' (a tokenizer.json), 'byte'."""
  key = (kind, path, extra_ids, bos_token, eos_token)
  if key in _CACHE:
    return _CACHE[key]
  if kind == "word":
    vocab = WordVocabulary(offline.WORDS)
  elif kind == "byte":
    vocab = seqio.ByteVocabulary(extra_ids=extra_ids)
  elif kind == "sentencepiece":
    if not path or not tf.io.gfile.exists(path):
      raise UserError(f"SentencePiece model {path!r} does not exist; set "
                      "tasks.get_vocabulary.path to a .model file")
    vocab = seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)
  elif kind == "hf":
    vocab = HfTokenizerVocabulary(path or "", bos_token=bos_token,
                                  eos_token=eos_token)
  else:
    raise UserError(f"unknown vocabulary kind {kind!r}; use one of {KINDS}")
  _CACHE[key] = vocab
  return vocab
