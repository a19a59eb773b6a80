"""Tests for cross-tokenizer distillation: gkd.tasks.alignment (two BPE
tokenizers, a SentencePiece model, the word and byte vocabularies, all built
here) and gkd.losses.cross_tokenizer (ULD and the aligned-span divergence
against numpy references and finite differences)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from gkd import losses
from gkd.errors import UserError
from gkd.losses import cross_tokenizer as xt
from gkd.losses import divergences
from gkd.tasks import alignment
from gkd.tasks import features
from gkd.tasks import vocabularies
from gkd.train.objective import SampledKL
from test_vocab import make_sentencepiece

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Natalia sold 48 clips in April and half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May?",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "A summary states the key facts of a long document.",
] * 4
SENTENCES = [
    " clips did Natalia sell?",
    " The lazy fox sold über 48 clips.",
    " naïve 日本 dog",  # characters the corpus never had: split into bytes
    "",
    " Natalia",
]


def _bpe(tmp, vocab_size, normalizer=None) -> vocabularies.HfTokenizerVocabulary:
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  if normalizer is not None:
    tok.normalizer = normalizer
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  tmp.mkdir(parents=True, exist_ok=True)
  tok.save(str(tmp / "tokenizer.json"))
  return vocabularies.HfTokenizerVocabulary(str(tmp / "tokenizer.json"))


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory):
  root = tmp_path_factory.mktemp("vocabs")
  prefix = str(root / "sp")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_prefix=prefix, vocab_size=300, pad_id=0, eos_id=1,
      unk_id=2, bos_id=-1, hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True,
      minloglevel=2)
  return {
      "small": _bpe(root / "small", 280),  # "Natalia" is several tokens
      "big": _bpe(root / "big", 420),      # and one here
      "lower": _bpe(root / "lower", 420, normalizers.Lowercase()),
      "sp": seqio.SentencePieceVocabulary(prefix + ".model"),
      "word": vocabularies.get_vocabulary("word"),
      "byte": seqio.ByteVocabulary(),
  }


def _tokens(vocab, ids):
  return [vocab.tokenizer.id_to_token(i) for i in ids]


def _batch(vocab, prompts, targets, eos=True, input_length=12, target_length=24):
  """A student batch in the contract's layout (BOS-prefixed left-padded prompts)."""
  conv = features.converter_for(vocab, input_length, target_length)
  b = len(prompts)
  out = {"input_tokens": np.zeros((b, input_length), np.int32),
         "input_mask": np.zeros((b, input_length), np.int32),
         "target_tokens": np.zeros((b, target_length), np.int32),
         "target_mask": np.zeros((b, target_length), np.int32)}
  for r, (p, t) in enumerate(zip(prompts, targets)):
    x = conv.input_row(vocab.encode(p))
    y = list(vocab.encode(t))[:target_length - eos] + [vocab.eos_id] * eos
    out["input_tokens"][r, input_length - len(x):] = x
    out["input_mask"][r, input_length - len(x):] = 1
    out["target_tokens"][r, :len(y)] = y
    out["target_mask"][r, :len(y)] = 1
  return out


def _align(student, teacher, batch, **kw):
  kw = {"input_length": 16, "target_length": 32, **kw}
  aligner = alignment.Aligner(student, teacher, **kw)
  return aligner(batch["input_tokens"], batch["input_mask"], batch["target_tokens"],
                 batch["target_mask"])


def _span_texts(text: bytes, offsets, spans, count):
  """Each span's bytes: from the previous span's end to its last token's end."""
  out, start = [], 0
  for m in range(count):
    last = np.flatnonzero(spans == m).max()
    end = offsets[last, 1]
    assert end >= 0, "a span closes at a token with a known end"
    out.append(text[start:end])
    start = end
  return out


def _target_text(vocab, batch, r, in_context=False):
  """The target decoded alone; in_context: what decoding prompt + target adds to
  the prompt's text (the target alone after EOS)."""
  prompt = batch["input_tokens"][r][batch["input_mask"][r] > 0].tolist()
  target = batch["target_tokens"][r][batch["target_mask"][r] > 0].tolist()
  target = target[:target.index(vocab.eos_id)] if vocab.eos_id in target else target
  if not in_context or (prompt and prompt[-1] == vocab.eos_id):
    return vocab.decode(target)
  return vocab.decode(prompt + target)[len(vocab.decode(prompt)):]


# --- alignment ----------------------------------------------------------------------


def test_hand_checked_spans_one_token_against_several(vocabs):
  small, big = vocabs["small"], vocabs["big"]
  words = [" clips", " did", " Natalia", " sell", "?"]
  # The premise, from the two tokenizers themselves: every word is one token of
  # the big one, and " Natalia" is several tokens of the small one.
  assert all(len(big.encode(w)) == 1 for w in words)
  assert len(small.encode(" Natalia")) >= 3
  text = "".join(words)
  for student, teacher in ((small, big), (big, small)):
    batch = _batch(student, ["How many"], [text])
    a = _align(student, teacher, batch)
    count = a.span_count[0]
    assert count == len(words) + 1  # the words and the EOS pair
    assert a.span_mask[0, :count].tolist() == [1] * count
    assert a.flags[0] == 0
    t_len = int(a.target_mask[0].sum())
    s_len = int(batch["target_mask"][0].sum())
    # Spans are consecutive runs 0, 1, ... covering every token, EOS last.
    assert a.student_span[0, :s_len].tolist() == sorted(a.student_span[0, :s_len].tolist())
    assert a.teacher_span[0, :t_len].tolist() == sorted(a.teacher_span[0, :t_len].tolist())
    assert a.student_span[0, s_len - 1] == a.teacher_span[0, t_len - 1] == count - 1
    assert a.target_tokens[0, t_len - 1] == teacher.eos_id
    s_texts = _span_texts(text.encode(), a.student_offsets[0], a.student_span[0], count - 1)
    t_texts = _span_texts(text.encode(), a.teacher_offsets[0], a.teacher_span[0], count - 1)
    assert s_texts == t_texts == [w.encode() for w in words]
    sizes = lambda spans, m: int(np.sum(spans == m))
    nat = words.index(" Natalia")
    small_side = a.student_span[0] if student is small else a.teacher_span[0]
    big_side = a.teacher_span[0] if student is small else a.student_span[0]
    assert sizes(big_side, nat) == 1 and sizes(small_side, nat) >= 3
    # Each span starts at its first token.
    for m in range(count):
      assert a.student_span_start[0, m] == np.flatnonzero(a.student_span[0] == m).min()
      assert a.teacher_span_start[0, m] == np.flatnonzero(a.teacher_span[0] == m).min()


def _bytes_to_unicode():
  """GPT-2's byte <-> printable character table (the ByteLevel alphabet)."""
  keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
  chars, n = list(keep), 0
  for b in range(256):
    if b not in keep:
      keep.append(b)
      chars.append(256 + n)
      n += 1
  return {chr(c): b for b, c in zip(keep, chars)}


def _reference_ends(pieces: list[bytes]) -> list[int]:
  """A token ends where the bytes so far are complete UTF-8 and it added some."""
  ends, data, last = [], b"", 0
  for piece in pieces:
    data += piece
    try:
      data.decode("utf-8")
      ok = len(data) > last
    except UnicodeDecodeError:
      ok = False
    ends.append(len(data) if ok else -1)
    last = len(data) if ok else last
  return ends


@pytest.mark.parametrize("kind", ["small", "big", "byte"])
def test_byte_offsets_match_the_tokens_bytes(vocabs, kind):
  vocab = vocabs[kind]
  if kind == "byte":
    piece = lambda i: bytes([i - 3])
  else:
    table = _bytes_to_unicode()
    piece = lambda i: bytes(table[c] for c in vocab.tokenizer.id_to_token(i))
  for sentence in SENTENCES:
    ids = vocab.encode(sentence)
    text, ends = alignment.token_ends(vocab, ids)
    assert text == sentence
    assert ends == _reference_ends([piece(i) for i in ids])
  assert any(e == -1 for e in alignment.token_ends(vocab, vocab.encode(" 日本"))[1])


@pytest.mark.parametrize("kind", ["sp", "word", "small"])
def test_offsets_agree_with_decoding_each_prefix(vocabs, kind):
  vocab = vocabs[kind]
  for sentence in SENTENCES + ["3 + 4 = 7. #### 7"]:
    ids = vocab.encode(sentence)
    text, ends = alignment.token_ends(vocab, ids)
    assert text == vocab.decode(ids)
    last = 0
    for k, e in enumerate(ends):
      prefix = vocab.decode(ids[:k + 1]).encode()
      if e >= 0:
        assert prefix == text.encode()[:e] and e > last
        last = e
    assert last == len(text.encode())


def test_piece_tables_and_streams_agree_with_decoding(vocabs):
  """Each of the three offset methods gives the same ends where it applies."""
  rng = np.random.default_rng(0)
  for kind in ("sp", "byte", "small"):
    decoder = alignment.Decoder(vocabs[kind])
    for sentence in SENTENCES:
      ids = vocabs[kind].encode(sentence)
      text, ends = decoder.ends(ids)
      assert decoder._stream_ends(ids, [], text) == ends  # pylint: disable=protected-access
      assert decoder._prefix_ends(ids, [], text) == ends  # pylint: disable=protected-access
    # Random ids, as a student samples them early on (specials, unk, byte
    # pieces that form no character, extra ids past the pieces).
    for _ in range(20):
      ids = rng.integers(0, vocabs[kind].vocab_size + 3, 12).tolist()
      text, ends = decoder.ends(ids)
      assert text == decoder.decode(ids)
      assert [e for e in ends if e >= 0] == sorted(set(e for e in ends if e >= 0))
      for k, e in enumerate(ends):
        if e >= 0:
          assert decoder.decode(ids[:k + 1]).encode() == text.encode()[:e]


def test_target_decoded_in_the_prompts_context(vocabs):
  """SentencePiece drops a sequence's leading space; after the prompt it is there."""
  sp = vocabs["sp"]
  prompt, target = sp.encode("How many clips"), sp.encode("did Natalia sell")
  alone, _ = alignment.token_ends(sp, target)
  joined, ends = alignment.token_ends(sp, target, context=prompt)
  assert alone == "did Natalia sell" and joined == " did Natalia sell"
  assert sp.decode(prompt) + joined == sp.decode(prompt + target)
  assert max(ends) == len(joined.encode())


PAIRS = [("small", "big"), ("big", "small"), ("small", "sp"), ("sp", "small"),
         ("word", "big"), ("small", "byte"), ("byte", "small")]


def test_teacher_target_is_the_tasks_target_text(vocabs):
  """The teacher scores the target as SeqIO tokenises it alone: no joining space
  (the word vocabulary's, SentencePiece's dummy prefix) before it, unless asked."""
  word, byte, sp = vocabs["word"], vocabs["byte"], vocabs["sp"]
  # A SentencePiece prompt ends with EOS (a T5 encoder input): its target reads alone anyway.
  for student, target, joined in ((word, "3 + 4 = 7. #### 7", " 3 + 4 = 7. #### 7"),
                                  (sp, "did Natalia sell", "did Natalia sell")):
    batch = _batch(student, ["How many"], [target])
    teacher_ids = lambda a: a.target_tokens[0][a.target_mask[0] > 0].tolist()
    assert teacher_ids(_align(student, byte, batch)) == byte.encode(target) + [byte.eos_id]
    assert teacher_ids(_align(student, byte, batch, target_in_context=True)) == byte.encode(
        joined) + [byte.eos_id]


@pytest.mark.parametrize("in_context", [False, True], ids=["alone", "in_context"])
@pytest.mark.parametrize("pair", PAIRS, ids="-".join)
def test_round_trip_and_consistent_spans(vocabs, pair, in_context):
  student, teacher = vocabs[pair[0]], vocabs[pair[1]]
  sentences = (["3 + 4 = 7. #### 7", "How many clips did Natalia sell?"] if pair[0] == "word"
               else SENTENCES)
  batch = _batch(student, ["How many clips"] * len(sentences), sentences)
  a = _align(student, teacher, batch, target_in_context=in_context)
  for r in range(len(sentences)):
    s_text = _target_text(student, batch, r, in_context)
    t_ids = a.target_tokens[r][a.target_mask[r] > 0].tolist()
    assert t_ids[-1] == teacher.eos_id
    prompt = batch["input_tokens"][r][batch["input_mask"][r] > 0].tolist()
    assert teacher.decode(a.input_tokens[r][a.input_mask[r] > 0].tolist()) == student.decode(
        prompt)
    t_text = teacher.decode(t_ids)
    if pair[1] == "sp":  # T5-style: a target decoded alone spells no leading spaces
      t_text = s_text[:len(s_text) - len(s_text.lstrip(" "))] + t_text
    assert t_text == s_text and not a.flags[r] & alignment.NOT_ROUND_TRIP
    count = a.span_count[r]
    assert 1 <= count <= a.span_mask.shape[1]
    assert a.span_mask[r, :count].all()
    # Counted text spans spell the same bytes on both sides.
    s_sp = _span_texts(s_text.encode(), a.student_offsets[r], a.student_span[r], count - 1)
    t_sp = _span_texts(t_text.encode(), a.teacher_offsets[r], a.teacher_span[r], count - 1)
    for m, (x, y) in enumerate(zip(s_sp, t_sp)):
      assert (x == y) == bool(a.span_mask[r, m])


@pytest.mark.parametrize("pair", [("small", "big"), ("sp", "small"), ("byte", "small"),
                                  ("word", "big"), ("big", "byte")], ids="-".join)
@pytest.mark.parametrize("in_context", [False, True], ids=["alone", "in_context"])
def test_random_samples_keep_every_invariant(vocabs, pair, in_context):
  """Student samples of random ids (specials, unknown and padded-vocabulary ids,
  partial characters, EOS anywhere or nowhere) and a short teacher target."""
  student, teacher = vocabs[pair[0]], vocabs[pair[1]]
  rng = np.random.default_rng(1)
  batch = _batch(student, ["How many"] * 6, [""] * 6, eos=False)
  o_s = batch["target_tokens"].shape[1]
  batch["target_tokens"] = rng.integers(0, student.vocab_size + 4, (6, o_s)).astype(np.int32)
  batch["target_tokens"][:3, 5] = student.eos_id
  batch["target_mask"] = (np.arange(o_s)[None] < rng.integers(0, o_s + 1, (6, 1))).astype(
      np.int32)
  a = _align(student, teacher, batch, target_length=12, target_in_context=in_context)
  assert a.span_mask.sum() > 0
  s = a.span_mask.shape[1]
  for r in range(6):
    count = a.span_count[r]
    assert count <= s and not a.span_mask[r, count:].any()
    n_t = int(a.target_mask[r].sum())
    assert not a.target_mask[r, n_t:].any() and not (a.teacher_span[r, n_t:] >= 0).any()
    for spans, n in ((a.student_span[r], o_s), (a.teacher_span[r], n_t)):
      used = spans[spans >= 0]
      assert used.tolist() == sorted(used.tolist()) and set(used.tolist()) == set(range(count))
    ids = batch["target_tokens"][r][batch["target_mask"][r] > 0].tolist()
    if student.eos_id in ids:  # nothing after the student's EOS is aligned
      after = np.flatnonzero(batch["target_mask"][r])[ids.index(student.eos_id) + 1:]
      assert (a.student_span[r, after] == -1).all()
    s_text = _target_text(student, batch, r, in_context).encode()
    t_ids = a.target_tokens[r, :n_t].tolist()
    t_text = alignment.token_ends(teacher, [i for i in t_ids if i != teacher.eos_id])[0].encode()
    # The end span (the teacher's EOS): the student's EOS and the tokens before
    # it that spell nothing, or such tokens up to the end of the sample.
    has_end = bool(n_t) and t_ids[-1] == teacher.eos_id
    texts = count - has_end
    if has_end:
      end = np.flatnonzero(a.student_span[r] == count - 1)
      assert (a.student_offsets[r, end[:-1], 1] == -1).all()
      assert a.student_offsets[r, end[-1], 1] == -1 or batch["target_tokens"][
          r, end[-1]] == student.eos_id
      assert end.max() == np.flatnonzero(batch["target_mask"][r]).max() or (
          batch["target_tokens"][r, end[-1]] == student.eos_id)
    s_sp = _span_texts(s_text, a.student_offsets[r], a.student_span[r], texts)
    t_sp = _span_texts(t_text, a.teacher_offsets[r], a.teacher_span[r], texts)
    assert [int(x == y) for x, y in zip(s_sp, t_sp)] == a.span_mask[r, :texts].tolist()


def test_fixed_shapes_and_pure_callback(vocabs):
  small, big = vocabs["small"], vocabs["big"]
  aligner = alignment.Aligner(small, big, input_length=10, target_length=20)
  shapes = aligner.result_shapes(3, 24)
  batch = _batch(small, ["How", "A", "The quick"], SENTENCES[:3])
  numpy_out = aligner(batch["input_tokens"], batch["input_mask"], batch["target_tokens"],
                      batch["target_mask"])
  for x, shape in zip(numpy_out, shapes):
    assert x.shape == shape.shape and x.dtype == np.int32
  other = aligner(*(_batch(small, ["x"] * 3, ["", "a", " b c"])[k] for k in (
      "input_tokens", "input_mask", "target_tokens", "target_mask")))
  assert [x.shape for x in other] == [x.shape for x in numpy_out]
  graph_out = jax.jit(aligner.in_graph)({k: jnp.asarray(v) for k, v in batch.items()})
  for x, y in zip(numpy_out, graph_out):
    np.testing.assert_array_equal(x, np.asarray(y))
  # Rows sharded over the 8 test devices: the callback sees the whole batch.
  batch = _batch(small, ["How"] * 8, (SENTENCES * 2)[:8])
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharded = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      "data"))) for k, v in batch.items()}
  graph_out = jax.jit(aligner.in_graph)(sharded)
  for x, y in zip(aligner(*(batch[k] for k in features.KEYS)), graph_out):
    np.testing.assert_array_equal(x, np.asarray(y))


def test_truncated_teacher_target_drops_uncovered_spans(vocabs):
  small, big = vocabs["small"], vocabs["big"]
  text = " clips did Natalia sell?"
  batch = _batch(small, ["How many"], [text])
  full = _align(small, big, batch)
  a = _align(small, big, batch, target_length=3)
  assert a.flags[0] & alignment.TARGET_TRUNCATED
  assert a.target_mask[0].tolist() == [1, 1, 1]
  assert a.target_tokens[0].tolist() == full.target_tokens[0, :3].tolist()  # no EOS squeezed in
  assert a.span_count[0] == 3 and a.span_mask[0].tolist() == [1, 1, 1]
  s_len = int(batch["target_mask"][0].sum())
  kept = full.student_span[0, :s_len] < 3
  np.testing.assert_array_equal(a.student_span[0, :s_len],
                                np.where(kept, full.student_span[0, :s_len], -1))
  # A span cut in the middle is dropped: " Natalia" is one big token but the
  # small tokenizer's teacher cut at 2 tokens leaves " did" and part of it.
  b = _align(big, small, _batch(big, ["How many"], [text]), target_length=5)
  cut_spans = b.teacher_span[0][b.target_mask[0] > 0]
  assert b.span_count[0] == 2 and set(cut_spans.tolist()) == {0, 1, -1}
  assert (b.student_span[0] >= 0).sum() == 2
  # The prompt: too long for the teacher, cut and flagged.
  c = _align(small, big, _batch(small, ["How many clips did Natalia sell altogether"], [text],
                                input_length=16), input_length=3)
  assert c.flags[0] & alignment.INPUT_TRUNCATED and c.input_mask[0].sum() == 3


def test_normalising_teacher_counts_only_identical_spans(vocabs):
  small, lower = vocabs["small"], vocabs["lower"]
  text = " The fox sold Clips"
  a = _align(small, lower, _batch(small, ["How"], [text]))
  assert a.flags[0] & alignment.NOT_ROUND_TRIP
  assert lower.decode(a.target_tokens[0][a.target_mask[0] > 0].tolist()) == text.lower()
  count = a.span_count[0]
  s_sp = _span_texts(text.encode(), a.student_offsets[0], a.student_span[0], count - 1)
  assert s_sp == [b" The", b" fox", b" sold", b" Clips"]
  assert a.span_mask[0, :count].tolist() == [0, 1, 1, 0, 1]


def test_teacher_without_the_characters_counts_the_rest(vocabs, tmp_path):
  """A SentencePiece teacher without byte fallback spells 日本 as its unknown piece."""
  small = vocabs["small"]
  teacher = seqio.SentencePieceVocabulary(make_sentencepiece(tmp_path))
  text = " lazy 日本 fox"
  a = _align(small, teacher, _batch(small, ["How"], [text]))
  t_ids = a.target_tokens[0][a.target_mask[0] > 0].tolist()
  assert teacher.unk_id in t_ids and a.flags[0] & alignment.NOT_ROUND_TRIP
  count = a.span_count[0]
  s_sp = _span_texts(text.encode(), a.student_offsets[0], a.student_span[0], count - 1)
  assert b"".join(s_sp) == text.encode() and a.span_mask[0, count - 1] == 1  # EOS
  unknown = lambda x: any(c in x.decode() for c in "日本")
  assert [a.span_mask[0, m] for m in range(count - 1)] == [0 if unknown(x) else 1 for x in s_sp]


def test_tokens_that_spell_nothing_end_the_text(vocabs):
  """A sample of only padding (no EOS), or text then padding then EOS: the silent
  tokens join the end span, compared with the teacher's EOS after its text. A
  student emitting only padding is not compared on nothing (the failure of
  docs/experiments.md's first cross-tokenizer run)."""
  word, byte = vocabs["word"], vocabs["byte"]
  digits = word.encode("19")
  batch = _batch(word, ["How many"] * 3, ["", "19", "19"], eos=False, target_length=8)
  batch["target_tokens"][:] = 0  # id 0 (padding) decodes to nothing
  batch["target_mask"][0] = 1                           # row 0: eight pads
  batch["target_tokens"][1, :2], batch["target_tokens"][1, 3] = digits, word.eos_id
  batch["target_mask"][1] = np.arange(8) < 4            # row 1: 1 9 pad EOS
  batch["target_tokens"][2, :2], batch["target_tokens"][2, 3] = digits, digits[0]
  batch["target_mask"][2] = np.arange(8) < 4            # row 2: 1 9 pad 1
  a = _align(word, byte, batch)
  eos = byte.eos_id
  assert a.target_tokens[0, :2].tolist() == [eos, 0] and a.span_count[0] == 1
  assert a.student_span[0].tolist() == [0] * 8 and a.span_mask[0, 0] == 1
  assert a.target_tokens[1, :4].tolist() == byte.encode("19") + [eos, 0]
  assert a.student_span[1, :5].tolist() == [0, 1, 2, 2, -1]
  # A silent token before text belongs with the text after it; no EOS, no end span.
  assert a.target_tokens[2, :4].tolist() == byte.encode("191") + [0]
  assert a.student_span[2, :4].tolist() == [0, 1, 2, 2] and a.span_count[2] == 3
  # The all-padding row costs the divergence of {its pads, other} from {EOS, other}.
  rng = np.random.default_rng(0)
  s_logits = rng.normal(size=(3, 8, word.vocab_size))
  s_logits[..., 0] += 12.0  # the student is sure of its padding
  t_logits = rng.normal(size=(3, a.target_tokens.shape[1], byte.vocab_size))
  values, mask = xt.span_divergence(
      "reverse_kl", jnp.asarray(s_logits), jnp.asarray(t_logits),
      jnp.asarray(batch["target_tokens"]), a.target_tokens, a.student_span, a.teacher_span,
      a.span_mask)
  q = np.prod(_softmax(s_logits[0])[:, 0])
  p = _softmax(t_logits[0, 0])[eos]
  expected = q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))
  assert mask[0].tolist() == [1.0] + [0.0] * 7
  np.testing.assert_allclose(values[0, 0], expected, rtol=1e-4)
  assert values[0, 0] > 1.0


def test_no_eos_no_teacher_eos_and_empty_prompt(vocabs):
  small, big, sp = vocabs["small"], vocabs["big"], vocabs["sp"]
  batch = _batch(small, ["How"], [" clips did"], eos=False)
  a = _align(small, big, batch)
  assert big.eos_id not in a.target_tokens[0][a.target_mask[0] > 0].tolist()
  assert a.span_count[0] == 2 and a.span_mask[0, :2].tolist() == [1, 1]
  # A prompt of only BOS: the big teacher's BOS; a SentencePiece teacher (no
  # BOS) gets [EOS] (its input EOS) and no context.
  only_bos = {**batch, "input_tokens": np.full_like(batch["input_tokens"], small.bos_id),
              "input_mask": np.eye(1, batch["input_tokens"].shape[1], -1 + batch[
                  "input_tokens"].shape[1], dtype=np.int32)}
  b = _align(small, big, only_bos)
  assert b.input_tokens[0][b.input_mask[0] > 0].tolist() == [big.bos_id]
  c = _align(small, sp, only_bos)
  assert c.input_tokens[0][c.input_mask[0] > 0].tolist() == [sp.eos_id]


# --- losses -------------------------------------------------------------------------


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _uld_reference(s_logits, t_logits):
  q = -np.sort(-_softmax(s_logits), axis=-1)
  p = -np.sort(-_softmax(t_logits), axis=-1)
  width = max(q.shape[-1], p.shape[-1])
  pad = lambda x: np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
  return np.abs(pad(q) - pad(p)).sum(-1)


def _logits(seed, *shape, scale=2.0):
  return np.random.default_rng(seed).normal(size=shape) * scale


@pytest.mark.parametrize("vs,vt", [(7, 11), (11, 7), (9, 9)])
def test_uld_matches_numpy_and_finite_differences(vs, vt):
  s, t = _logits(0, 2, 3, vs), _logits(1, 2, 3, vt)
  got = jax.jit(xt.uld_distance)(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(got, _uld_reference(s, t), rtol=1e-5, atol=1e-6)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(xt.uld_distance(x, jnp.asarray(t, jnp.float32)))))(
      jnp.asarray(s, jnp.float32))
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
  direction = _logits(2, 2, 3, vs, scale=1.0)
  eps = 1e-5
  fd = (_uld_reference(s + eps * direction, t).sum()
        - _uld_reference(s - eps * direction, t).sum()) / (2 * eps)
  np.testing.assert_allclose(np.sum(np.asarray(grad) * direction), fd, rtol=1e-3, atol=1e-5)
  # The teacher gets no gradient.
  tgrad = jax.jit(jax.grad(lambda y: jnp.sum(xt.uld_distance(jnp.asarray(s, jnp.float32), y))))(
      jnp.asarray(t, jnp.float32))
  assert np.all(np.asarray(tgrad) == 0)


def test_uld_pairings_index_and_span_starts():
  b, o_s, o_t, vs, vt = 2, 5, 4, 6, 9
  s, t = _logits(3, b, o_s, vs), _logits(4, b, o_t, vt)
  s_mask = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
  t_mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
  values, mask = jax.jit(xt.uld_per_token)(jnp.asarray(s), jnp.asarray(t), s_mask, t_mask)
  ref = np.zeros((b, o_s))
  for r in range(b):
    n = min(s_mask[r].sum(), t_mask[r].sum())  # the official code: min of the two lengths
    ref[r, :n] = _uld_reference(s[r, :n], t[r, :n])
    assert mask[r].tolist() == [1.0] * n + [0.0] * (o_s - n)
  np.testing.assert_allclose(values, ref, rtol=1e-5, atol=1e-6)
  starts_s, starts_t = np.array([[0, 2, 3], [1, 0, 0]]), np.array([[0, 1, 3], [0, 0, 0]])
  span_mask = np.array([[1, 0, 1], [1, 0, 0]])
  values, mask = jax.jit(xt.uld_per_span)(jnp.asarray(s), jnp.asarray(t), starts_s, starts_t,
                                          span_mask)
  for r in range(b):
    for m in range(3):
      want = _uld_reference(s[r, starts_s[r, m]], t[r, starts_t[r, m]]) * span_mask[r, m]
      np.testing.assert_allclose(values[r, m], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(mask, span_mask)


# Hand-made spans of unequal token counts: span 0 is 3 student tokens vs 1
# teacher token, span 1 is 1 vs 2, span 2 is 2 vs 1, span 3 masked; -1 tokens
# belong to no span.
S_SPAN = np.array([[0, 0, 0, 1, 2, 2, 3, -1], [0, 1, 1, 1, 2, -1, -1, -1]])
T_SPAN = np.array([[0, 1, 1, 2, 3, -1], [0, 0, 1, 2, 2, 2]])
SPAN_MASK = np.array([[1, 1, 1, 0], [1, 1, 1, 0]])


def _two_buckets(logits, targets, spans, num_spans):
  """Brute force: P(span) = Π softmax[y]; returns [B, S, 2] probabilities."""
  prob = np.take_along_axis(_softmax(logits), targets[..., None], -1)[..., 0]
  out = np.zeros(spans.shape[:1] + (num_spans, 2))
  for r in range(spans.shape[0]):
    for m in range(num_spans):
      p = np.prod(prob[r][spans[r] == m])
      out[r, m] = [p, 1 - p]
  return out


def _span_inputs(seed, scale=2.0):
  b, o_s, o_t, vs, vt = 2, 8, 6, 5, 7
  s, t = _logits(seed, b, o_s, vs, scale=scale), _logits(seed + 1, b, o_t, vt, scale=scale)
  ys = np.random.default_rng(seed + 2).integers(0, vs, (b, o_s))
  yt = np.random.default_rng(seed + 3).integers(0, vt, (b, o_t))
  return s, t, ys, yt


NUMPY_DIVERGENCES = {
    "forward_kl": lambda q, p: np.sum(p * np.log(p / q), -1),
    "reverse_kl": lambda q, p: np.sum(q * np.log(q / p), -1),
    "tvd": lambda q, p: 0.5 * np.abs(p - q).sum(-1),
    "jsd": lambda q, p, beta=0.5: (
        beta * np.sum(p * np.log(p / (beta * p + (1 - beta) * q)), -1)
        + (1 - beta) * np.sum(q * np.log(q / (beta * p + (1 - beta) * q)), -1)),
}


@pytest.mark.parametrize("name", [n for n in losses.NAMES if n != "atkd"])
def test_span_divergence_matches_brute_force(name):
  s, t, ys, yt = _span_inputs(5)
  params = {"jsd": {"beta": 0.9}, "skew_kl": {"alpha": 0.3}}.get(name, {})
  fn = jax.jit(functools.partial(xt.span_divergence, name, **params))
  values, mask = fn(jnp.asarray(s), jnp.asarray(t), ys, yt, S_SPAN, T_SPAN, SPAN_MASK)
  q2, p2 = _two_buckets(s, ys, S_SPAN, 4), _two_buckets(t, yt, T_SPAN, 4)
  with np.errstate(all="ignore"):  # the masked span has no tokens: P = 1
    if name in NUMPY_DIVERGENCES:
      ref = NUMPY_DIVERGENCES[name](q2, p2, **params)
    else:  # the registered formula on the brute-force buckets
      ref = np.asarray(divergences.DIVERGENCES[name](jnp.log(q2), jnp.log(p2), **params))
  np.testing.assert_allclose(values, np.where(SPAN_MASK > 0, ref, 0.0), rtol=2e-4, atol=1e-6)
  np.testing.assert_array_equal(mask, SPAN_MASK)


def test_span_log_probs_stable_when_a_token_is_certain():
  logits = np.zeros((1, 3, 4))
  logits[0, :, 0] = 40.0  # q(y = 0) rounds to 1 in float32
  lp, rest = jax.jit(lambda x: xt.span_log_probs(
      *xt.token_log_probs(x, np.zeros((1, 3), np.int32)), np.array([[0, 0, 0]]), 1))(
          jnp.asarray(logits, jnp.float32))
  # 1 − P = 1 − (1 − 3e^-40)^3 ≈ 9·e^-40
  np.testing.assert_allclose(rest[0, 0], np.log(9.0) - 40.0, rtol=1e-5)
  assert np.isfinite(lp[0, 0])
  value, _ = jax.jit(functools.partial(xt.span_divergence, "forward_kl"))(
                                jnp.asarray(logits, jnp.float32),
                                jnp.asarray(logits, jnp.float32), np.zeros((1, 3), np.int32),
                                np.zeros((1, 3), np.int32), np.array([[0, 0, 0]]),
                                np.array([[0, 0, 0]]), np.array([[1]]))
  assert float(value[0, 0]) == 0.0


def test_span_divergence_gradient_reaches_every_token_of_a_span():
  s, t, ys, yt = _span_inputs(7)

  def loss(x):
    values, _ = xt.span_divergence("forward_kl", x, jnp.asarray(t, jnp.float32), ys, yt,
                                   S_SPAN, T_SPAN, SPAN_MASK)
    return jnp.sum(values)
  grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(s, jnp.float32)))
  counted = np.take_along_axis(np.pad(SPAN_MASK, [(0, 0), (0, 1)]),
                               np.where(S_SPAN >= 0, S_SPAN, 4), 1) > 0
  assert np.all(np.abs(grad).sum(-1)[counted] > 0)
  assert np.all(grad[~counted] == 0)

  def reference(x):
    q2, p2 = _two_buckets(x, ys, S_SPAN, 4), _two_buckets(t, yt, T_SPAN, 4)
    with np.errstate(all="ignore"):
      return np.sum(np.where(SPAN_MASK > 0, NUMPY_DIVERGENCES["forward_kl"](q2, p2), 0.0))
  direction = _logits(9, *s.shape, scale=1.0)
  eps = 1e-5
  fd = (reference(s + eps * direction) - reference(s - eps * direction)) / (2 * eps)
  np.testing.assert_allclose(np.sum(grad * direction), fd, rtol=1e-3, atol=1e-5)


def test_spans_to_tokens_keeps_each_rows_sum():
  values = jnp.asarray([[0.3, 1.2, 0.5, 9.0], [0.7, 0.1, 2.0, 9.0]])
  tokens, mask = jax.jit(xt.spans_to_tokens)(values, S_SPAN, SPAN_MASK)
  np.testing.assert_allclose(np.sum(tokens, -1), np.sum(np.asarray(values) * SPAN_MASK, -1),
                             rtol=1e-6)
  np.testing.assert_allclose(tokens[0, :3], [0.1] * 3, rtol=1e-6)
  assert mask[0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]


def _span_log_prob_reference(logits, targets, spans, num_spans):
  """log P(span) `[B, S]` as a plain loop over tokens (differentiable in logits)."""
  lp = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(targets)[..., None], -1)[..., 0]
  return jnp.stack([jnp.stack([jnp.sum(jnp.where(spans[r] == m, lp[r], 0.0))
                               for m in range(num_spans)]) for r in range(spans.shape[0])])


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_span_sampled_kl_values_and_gradient(gamma):
  s, t, ys, yt = _span_inputs(17)
  s, t = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
  fn = lambda x: xt.span_sampled_kl(x, t, ys, yt, S_SPAN, T_SPAN, SPAN_MASK, gamma=gamma)
  values, mask = jax.jit(fn)(s)
  with np.errstate(divide="ignore"):
    ratio = (np.log(_two_buckets(np.asarray(s), ys, S_SPAN, 4)[..., 0])
             - np.log(_two_buckets(np.asarray(t), yt, T_SPAN, 4)[..., 0]))
  np.testing.assert_allclose(values, np.where(SPAN_MASK > 0, ratio, 0.0), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(mask, SPAN_MASK)

  # Gradient: −A_s·∇log q_s with A_s = −Σ_{s' ≥ s} γ^{s'−s}(log q_s' − log p_s').
  log_p = _span_log_prob_reference(t, yt, T_SPAN, 4)
  def surrogate(x):
    log_q = _span_log_prob_reference(x, ys, S_SPAN, 4)
    r = jax.lax.stop_gradient(log_q - log_p) * SPAN_MASK
    adv = jnp.stack([sum(gamma ** (k - j) * r[:, k] for k in range(j, 4)) for j in range(4)], 1)
    return jnp.sum(adv * log_q * SPAN_MASK)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(fn(x)[0])))(s)
  np.testing.assert_allclose(grad, jax.grad(surrogate)(s), rtol=1e-4, atol=1e-6)
  # Tokens of masked spans and of no span get no gradient.
  counted = np.take_along_axis(np.pad(SPAN_MASK, [(0, 0), (0, 1)]),
                               np.where(S_SPAN >= 0, S_SPAN, 4), 1) > 0
  assert np.all(np.asarray(grad)[~counted] == 0)
  assert np.all(np.abs(np.asarray(grad)).sum(-1)[counted] > 0)


def test_sampled_spans_through_the_loss_and_its_refusals():
  s, t, ys, yt = _span_inputs(19)
  a = alignment.Alignment(**dict.fromkeys(alignment.Alignment._fields))._replace(
      target_tokens=jnp.asarray(yt), student_span=jnp.asarray(S_SPAN),
      teacher_span=jnp.asarray(T_SPAN), span_mask=jnp.asarray(SPAN_MASK))
  fn = xt.CrossTokenizerLoss(mode="spans", name="reverse_kl")
  fn.check_sampled()
  options = SampledKL(gamma=0.0, estimator="reinforce")
  terms = fn.terms(jnp.asarray(s), jnp.asarray(t), ys, np.ones(ys.shape), a, sampled_kl=options)
  values, _ = xt.span_sampled_kl(jnp.asarray(s), jnp.asarray(t), ys, yt, S_SPAN, T_SPAN,
                                 SPAN_MASK)
  per_row = np.sum(values, -1) / np.sum(SPAN_MASK, -1)
  np.testing.assert_allclose(terms["distill"], per_row.mean(), rtol=1e-6)
  with pytest.raises(UserError, match="set CrossTokenizerLoss.mode = 'spans'"):
    xt.CrossTokenizerLoss(mode="uld", name="reverse_kl").check_sampled()
  with pytest.raises(UserError, match="set CrossTokenizerLoss.name = 'reverse_kl'"):
    xt.CrossTokenizerLoss(name="jsd", params={"beta": 0.5}).check_sampled()
  with pytest.raises(UserError, match="temperature 1"):
    xt.CrossTokenizerLoss(name="reverse_kl", temperature=2.0).check_sampled()
  with pytest.raises(UserError, match="behavior_logq has shape"):
    xt.span_sampled_kl(jnp.asarray(s), jnp.asarray(t), ys, yt, S_SPAN, T_SPAN, SPAN_MASK,
                       behavior_logq=jnp.zeros((2, 3)))


def test_loss_on_a_real_alignment_and_reductions(vocabs):
  small, big = vocabs["small"], vocabs["big"]
  batch = _batch(small, ["How many", "The"], [" clips did Natalia sell?", " lazy dog"])
  a = _align(small, big, batch, target_length=16)
  o_s = batch["target_tokens"].shape[1]
  s = jnp.asarray(_logits(11, 2, o_s, small.vocab_size), jnp.float32)
  t = jnp.asarray(_logits(12, 2, 16, big.vocab_size), jnp.float32)
  a = alignment.Alignment(*(jnp.asarray(x) for x in a))
  for mode in xt.MODES:
    fn = xt.CrossTokenizerLoss(mode=mode, crossentropy_weight=1.0, distillation_weight=1.5)
    terms = jax.jit(fn.terms)(s, t, batch["target_tokens"], batch["target_mask"], a)
    values, mask = jax.jit(fn.distillation)(s, t, batch["target_tokens"], batch["target_mask"],
                                            a)
    per_row = np.sum(values, -1) / np.maximum(np.sum(mask, -1), 1)
    np.testing.assert_allclose(terms["distill"], per_row.mean(), rtol=1e-5)
    nll = -np.log(np.take_along_axis(_softmax(np.asarray(s)), batch["target_tokens"][..., None],
                                     -1)[..., 0])
    m = batch["target_mask"]
    ce = np.mean((nll * m).sum(-1) / m.sum(-1))
    np.testing.assert_allclose(terms["crossentropy"], ce, rtol=1e-5)
    np.testing.assert_allclose(terms["loss"], ce + 1.5 * per_row.mean(), rtol=1e-5)
    grad = jax.jit(jax.grad(lambda x: fn(x, t, batch["target_tokens"], batch["target_mask"],
                                         a)))(s)
    assert np.all(np.isfinite(grad))


def test_user_errors():
  with pytest.raises(UserError, match="unknown divergence"):
    xt.CrossTokenizerLoss(name="kl")
  with pytest.raises(UserError, match="atkd"):
    xt.CrossTokenizerLoss(name="atkd")
  with pytest.raises(UserError, match="unknown cross-tokenizer mode"):
    xt.CrossTokenizerLoss(mode="sorted")
  with pytest.raises(UserError, match="no divergence parameters"):
    xt.CrossTokenizerLoss(mode="uld", name="jsd", params={"beta": 0.9})
  with pytest.raises(UserError, match="out of range"):
    xt.CrossTokenizerLoss(name="jsd", params={"beta": 2.0})
  s, t, ys, yt = _span_inputs(13)
  with pytest.raises(UserError, match="student_span has shape"):
    xt.span_divergence("forward_kl", s, t, ys, yt, S_SPAN[:, :5], T_SPAN, SPAN_MASK)
  with pytest.raises(UserError, match="batch sizes"):
    xt.uld_per_token(s, t[:1], np.ones((2, 8)), np.ones((1, 6)))
  with pytest.raises(UserError, match=r"\[batch, length, vocab\]"):
    xt.uld_per_token(s[0], t[0], np.ones(8), np.ones(6))
  with pytest.raises(UserError, match="target_length"):
    alignment.Aligner(vocabularies.get_vocabulary("word"), seqio.ByteVocabulary(), 4, 0)
