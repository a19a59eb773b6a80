"""Cross-tokenizer alignment (host, numpy): a student batch re-tokenised for a
teacher with another vocabulary, and the text spans the two tokenisations share.

    aligner = Aligner(student_vocab, teacher_vocab, input_length=I_t, target_length=O_t)
    a = aligner(input_tokens, input_mask, target_tokens, target_mask)   # numpy -> Alignment
    a = aligner.in_graph(batch)                     # the same through jax.pure_callback

Texts. The prompt's text is `student.decode(prompt ids)`; the target's text is
`student.decode(target ids)` alone: the string a SeqIO task holds, which
tokenises inputs and targets separately (SentencePiece's dummy-prefix space
and the word vocabulary's joining space are not part of it). The teacher's
prompt and target are `teacher.encode` of those texts, with the teacher's own
BOS / input EOS conventions (`gkd.tasks.features.converter_for`), and the
teacher's EOS appended exactly when the student's text ended (its EOS, or
tokens that spell nothing up to the end: Spans below): what the teacher saw
in training. `target_in_context=True` takes instead the text the target's ids
add to the prompt's, for a teacher trained on prompt and target as one text
(a prompt ending with EOS is a T5 encoder input: its target still reads
alone). For a teacher trained on separate targets that text starts with a
space it never saw first.

Offsets. Every target token's end is a UTF-8 byte offset into its side's
target text, from the vocabulary's own decoder (`Decoder`): each id's bytes
for SentencePiece and bytes (the piece table), Hugging Face
`tokenizers.decoders.DecodeStream` for `HfTokenizerVocabulary`, the same
incremental algorithm over `vocab.decode` for the word vocabulary and any
other; each result is checked against decoding the whole sequence. A token
"ends" where decoding it adds complete characters; a token that adds nothing
or only part of a character (byte-level BPE and byte-fallback pieces) has end
-1 and belongs with the tokens after it. Decoding, not `Encoding.offsets`,
because a span compares the probabilities of texts: offsets map a normalising
teacher's tokens ("hello") back onto text they do not spell ("Hello").

Spans. Common boundaries are the offsets where both sides have a token end;
the aligned spans are the text pieces between consecutive common boundaries
(one token on one side may face several on the other), plus one span for the
end of the text: the student's EOS, with any tokens before it that spell
nothing (padding, control ids; also without EOS, where a sample runs out on
them), against the teacher's EOS appended after its text. Without it a
student could emit only such tokens and be compared on nothing. When the
teacher's decoded text differs from the student's (normalisation, unknown
characters), boundaries are matched through a byte alignment of the two texts
(difflib) and a span counts (`span_mask` 1) only if both sides spell exactly
the same bytes. When the teacher's tokens exceed
`target_length` they are cut; spans the kept tokens do not cover entirely are
dropped (their student tokens get span -1) and `flags` has TARGET_TRUNCATED.
"""

import dataclasses
import difflib
import os
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import seqio

from gkd.errors import UserError
from gkd.tasks import features
from gkd.tasks import vocabularies

# Bits of Alignment.flags.
INPUT_TRUNCATED = 1   # the teacher's prompt did not fit input_length (cut per keep_input_end)
TARGET_TRUNCATED = 2  # the teacher's target (or its EOS) did not fit target_length
NOT_ROUND_TRIP = 4    # the teacher's decoded target text differs from the student's
EMPTY_PROMPT = 8      # the prompt's text is empty and the teacher has no BOS: its input is [EOS]

CONTEXT_TOKENS = 8  # prompt tokens decoded before the target (decoders look only a few tokens back)


class Alignment(NamedTuple):
  """Fixed-shape int32 arrays. B rows, I_t / O_t the teacher's lengths, O_s the
  student's target length, S = min(O_s, O_t) spans (never exceeded: every span
  has at least one token on each side)."""
  input_tokens: Any        # [B, I_t] teacher prompt, LEFT-padded (the batch contract)
  input_mask: Any          # [B, I_t]
  target_tokens: Any       # [B, O_t] teacher target, RIGHT-padded (+ EOS iff the student's text ended)
  target_mask: Any         # [B, O_t]
  student_offsets: Any     # [B, O_s, 2] (start, end) UTF-8 bytes in the target text; -1 unknown
  teacher_offsets: Any     # [B, O_t, 2] the same in the teacher's decoded target text
  student_span: Any        # [B, O_s] span id of each student target token, -1 outside every span
  teacher_span: Any        # [B, O_t] span id of each teacher target token, -1 outside every span
  span_mask: Any           # [B, S] 1 on spans both sides spell identically (the ones to compare)
  span_count: Any          # [B] spans per row (span ids are 0 .. span_count - 1)
  student_span_start: Any  # [B, S] student position of each span's first token (0 past span_count)
  teacher_span_start: Any  # [B, S] teacher position of each span's first token (0 past span_count)
  flags: Any               # [B] INPUT_TRUNCATED | TARGET_TRUNCATED | NOT_ROUND_TRIP | EMPTY_PROMPT

  def teacher_batch(self) -> dict[str, Any]:
    """The teacher's batch (the four contract keys of gkd/models/api.py)."""
    return {"input_tokens": self.input_tokens, "input_mask": self.input_mask,
            "target_tokens": self.target_tokens, "target_mask": self.target_mask}


# --- Offsets by incremental decoding ------------------------------------------------


def _piece_table(vocab: seqio.Vocabulary) -> Optional[list[bytes]]:
  """The bytes each id decodes to, for vocabularies whose decoding concatenates
  them (SentencePiece up to its leading space, bytes); None for the others."""
  if isinstance(vocab, seqio.ByteVocabulary):
    return [b""] * 3 + [bytes([b]) for b in range(256)]
  if isinstance(vocab, seqio.SentencePieceVocabulary):
    sp = vocab.tokenizer
    def piece(i):
      if sp.IsControl(i):
        return b""
      if sp.IsUnknown(i):
        return " \u2047 ".encode()  # SentencePiece's default unk_surface
      if sp.IsByte(i):
        return bytes([int(sp.IdToPiece(i)[3:5], 16)])
      return sp.IdToPiece(i).replace("\u2581", " ").encode()
    table = [piece(i) for i in range(sp.GetPieceSize())]
    return table + [table[sp.unk_id()]] * (vocab.vocab_size - len(table))  # extra ids: unk
  return None


class Decoder:
  """Incremental decoding of one vocabulary: the text ids add and where each token ends.

  Three methods, tried in order, each checked against decoding the whole
  sequence at once, so none can return offsets for another text:
  the piece table (SentencePiece, bytes: each id's bytes, concatenated), the
  stream (Hugging Face's DecodeStream; for the others the same algorithm over
  `vocab.decode`), and decoding every prefix (quadratic, no context).
  """

  def __init__(self, vocab: seqio.Vocabulary):
    self.vocab = vocab
    self.size = vocab.vocab_size
    self.table = _piece_table(vocab)

  def decode(self, ids: Sequence[int]) -> str:
    """`vocab.decode` without ids the vocabulary lacks (a model's padded vocabulary)."""
    return self.vocab.decode([i for i in ids if 0 <= i < self.size])

  def ends(self, ids: Sequence[int], context: Sequence[int] = ()) -> tuple[str, list[int]]:
    """(text, ends): the text `ids` add after `context`; ends[k] is the UTF-8
    byte length of that text up to and including token k, or -1 where token k
    adds nothing or ends inside a character."""
    ids, context = [int(i) for i in ids], [int(i) for i in context]
    text = self.decode(ids)
    if context:
      whole, head = self.decode(context + ids), self.decode(context)
      if whole.startswith(head):
        text = whole[len(head):]
      else:
        context = []
    for method in (self._table_ends, self._stream_ends):
      ends = method(ids, context, text)
      if ends is not None:
        return text, ends
    return text, self._prefix_ends(ids, context, text)

  def _table_ends(self, ids: list[int], context: list[int], text: str) -> Optional[list[int]]:
    if self.table is None:
      return None
    pieces = [self.table[i] if 0 <= i < self.size else b"" for i in ids]
    data = b"".join(pieces)
    try:
      joined = data.decode("utf-8")
    except UnicodeDecodeError:  # invalid bytes: the decoder drops or replaces them
      return None
    shift = 0
    if joined != text:  # SentencePiece drops the leading space of a sequence
      if context or joined[1:] != text or not joined.startswith(" "):
        return None
      shift = 1
    ends, n, last = [], 0, 0
    for piece in pieces:
      n += len(piece)
      ok = n - shift > last and (n == len(data) or data[n] & 0xC0 != 0x80)
      ends.append(n - shift if ok else -1)
      last = n - shift if ok else last
    return ends

  def _stream_ends(self, ids: list[int], context: list[int], text: str) -> Optional[list[int]]:
    chunks = self._stream(ids, context)
    if "".join(c for c in chunks if c is not None) != text:
      return None
    ends, n = [], 0
    for c in chunks:
      n += len(c.encode("utf-8")) if c is not None else 0
      ends.append(n if c is not None else -1)
    return ends

  def _stream(self, ids: list[int], context: list[int]) -> list[Optional[str]]:
    """Text each token adds (None: nothing, or an incomplete character).

    The algorithm of Hugging Face's DecodeStream: decode a short window that
    ends at the new token and starts at the previous emission, and emit what it
    adds to the window without the new tokens, once that is complete text.
    """
    if isinstance(self.vocab, vocabularies.HfTokenizerVocabulary):
      from tokenizers.decoders import DecodeStream  # pylint: disable=g-import-not-at-top
      tokenizer = self.vocab.tokenizer
      stream = DecodeStream(ids=[i for i in context if 0 <= i < self.size],
                            skip_special_tokens=True)
      return [stream.step(tokenizer, i) if 0 <= i < self.size else None for i in ids]
    seq = context + ids
    prefix, read = 0, len(context)
    before, out = self.decode(seq[prefix:read]), []
    for j in range(len(context) + 1, len(seq) + 1):
      after = self.decode(seq[prefix:j])
      if len(after) > len(before) and after.startswith(before) and not after.endswith("\ufffd"):
        out.append(after[len(before):])
        prefix, read = read, j
        before = self.decode(seq[prefix:read])
      else:
        out.append(None)
    return out

  def _prefix_ends(self, ids: list[int], context: list[int], text: str) -> list[int]:
    """Decode every prefix: an end where it is a prefix of the text and adds characters."""
    head = self.decode(context)
    ends, last = [], 0
    for k in range(len(ids)):
      piece = self.decode(context + ids[:k + 1])
      piece = piece[len(head):] if piece.startswith(head) else "\ufffd"
      n = len(piece.encode("utf-8"))
      ok = text.startswith(piece) and n > last and not piece.endswith("\ufffd")
      ends.append(n if ok else -1)
      last = n if ok else last
    return ends


def token_ends(vocab: seqio.Vocabulary, ids: Sequence[int],
               context: Sequence[int] = ()) -> tuple[str, list[int]]:
  """`Decoder(vocab).ends(ids, context)`: the text `ids` add after `context` and
  each token's end in it (UTF-8 bytes; -1 inside a character or adding nothing)."""
  return Decoder(vocab).ends(ids, context)


def _offsets(ends: list[int]) -> list[tuple[int, int]]:
  """(start, end) per token: start is the previous token's end when known (0 first)."""
  out, prev = [], 0
  for e in ends:
    out.append((prev, e))
    prev = e
  return out


# --- Spans ----------------------------------------------------------------------------


def _byte_map(a: bytes, b: bytes) -> dict[int, int]:
  """Offsets in b -> the corresponding offsets in a, where a byte alignment matches them.

  The common prefix and suffix map directly; difflib aligns what lies between.
  """
  head = len(os.path.commonprefix([a, b]))
  tail = len(os.path.commonprefix([a[head:][::-1], b[head:][::-1]]))
  out = {k: k for k in range(head + 1)}
  middle = difflib.SequenceMatcher(None, a[head:len(a) - tail], b[head:len(b) - tail],
                                   autojunk=False)
  for i, j, size in middle.get_matching_blocks():
    for k in range(size + 1):
      out.setdefault(head + j + k, head + i + k)
  for k in range(tail + 1):
    out.setdefault(len(b) - tail + k, len(a) - tail + k)
  return out


def _assign(ends: list[int], cuts: list[int]) -> list[int]:
  """Span id per token: a span closes at the first token whose end is its cut."""
  spans, m = [], 0
  for e in ends:
    if m == len(cuts):
      spans.append(-1)
      continue
    spans.append(m)
    if e == cuts[m]:
      m += 1
  return spans


def _starts(spans: list[int], count: int) -> list[int]:
  first = [0] * count
  for pos in reversed(range(len(spans))):
    if 0 <= spans[pos] < count:
      first[spans[pos]] = pos
  return first


@dataclasses.dataclass
class _Row:
  input_ids: list[int]
  target_ids: list[int]  # kept teacher target, EOS included
  student_bytes: int  # length of the target text, student side
  teacher_bytes: int  # and teacher side
  student_ends: list[int]  # per student text token
  teacher_ends: list[int]  # per kept teacher text token
  student_span: list[int]  # per student target token (text tokens, then EOS)
  teacher_span: list[int]  # per kept teacher target token
  span_valid: list[int]
  flags: int


def _spans(s_text: str, s_ends: list[int], t_text: str, t_ends: list[int], kept: int
           ) -> tuple[list[int], list[int], list[int]]:
  """Span ids of the student's and the kept teacher's text tokens, and each span's validity."""
  sb, tb = s_text.encode("utf-8"), t_text.encode("utf-8")
  to_student = _byte_map(sb, tb)
  student_cuts = set(e for e in s_ends if e > 0)
  xs, ys = [], []  # common boundaries, in student and in teacher coordinates
  for y in t_ends:
    x = to_student.get(y, -1) if y > 0 else -1
    if x in student_cuts and (not xs or (x > xs[-1] and y > ys[-1])):
      xs.append(x)
      ys.append(y)
  s_span, t_span = _assign(s_ends, xs), _assign(t_ends, ys)
  # Spans the kept teacher tokens do not cover entirely are dropped.
  count = len(xs)
  if kept < len(t_ends):
    count = t_span[kept] if t_span[kept] >= 0 else count
    t_span = [m if m < count else -1 for m in t_span[:kept]]
    s_span = [m if m < count else -1 for m in s_span]
  bounds = list(zip([0] + xs, xs, [0] + ys, ys))[:count]
  valid = [int(sb[x0:x1] == tb[y0:y1]) for x0, x1, y0, y1 in bounds]
  return s_span, t_span, valid


def _context(ids: list[int], vocab: seqio.Vocabulary) -> list[int]:
  """The prompt tokens the target is decoded after (none for a T5 encoder input)."""
  if not ids or ids[-1] == vocab.eos_id:
    return []
  return ids[-CONTEXT_TOKENS:]


@dataclasses.dataclass(frozen=True)
class Aligner:
  """Re-tokenises student batches for a teacher and aligns their target spans.

  input_length / target_length: the teacher's I_t / O_t. keep_input_end: a too
  long teacher prompt keeps its end instead of its start. target_in_context:
  the target's text is what its ids add to the prompt's text, not its ids
  decoded alone (module docstring).
  """
  student: seqio.Vocabulary
  teacher: seqio.Vocabulary
  input_length: int
  target_length: int
  keep_input_end: bool = False
  target_in_context: bool = False

  def __post_init__(self):
    for key in ("input_length", "target_length"):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"cross-tokenizer teacher {key}={value!r} must be a positive integer")
    # Validates the lengths against the teacher's affixes (BOS, input EOS).
    object.__setattr__(self, "_converter", features.converter_for(
        self.teacher, self.input_length, self.target_length,
        keep_input_end=self.keep_input_end))
    object.__setattr__(self, "_decoders", (Decoder(self.student), Decoder(self.teacher)))

  def _input_row(self, text: str) -> tuple[list[int], int]:
    conv = self._converter
    ids = self.teacher.encode(text)
    row = conv.input_row(ids).tolist()
    affixes = (conv.bos_id is not None) + (conv.input_eos_id is not None)
    flags = INPUT_TRUNCATED if len(ids) > self.input_length - affixes else 0
    if not row:  # no text and no BOS: the contract needs one real input token
      row, flags = [int(self.teacher.eos_id)], flags | EMPTY_PROMPT
    return row, flags

  def row(self, prompt: Sequence[int], target: Sequence[int], has_eos: bool) -> _Row:
    """One row: the student's prompt ids, target text ids (before EOS), whether EOS followed."""
    prompt, target = [int(i) for i in prompt], [int(i) for i in target]
    context = _context if self.target_in_context else lambda ids, vocab: []
    s_text, s_ends = self._decoders[0].ends(target, context(prompt, self.student))
    input_ids, flags = self._input_row(self._decoders[0].decode(prompt))
    t_all = [int(i) for i in self.teacher.encode(s_text)]
    t_context = context(input_ids, self.teacher)
    t_text, t_ends = self._decoders[1].ends(t_all, t_context)
    lead = s_text[:len(s_text) - len(s_text.lstrip(" "))]
    if lead and not t_context and not t_text.startswith(" "):
      # A target decoded alone (SentencePiece) spells no leading spaces: its first token has them.
      t_text, t_ends = lead + t_text, [e + len(lead) if e >= 0 else -1 for e in t_ends]
    if t_text != s_text:
      flags |= NOT_ROUND_TRIP
    kept = min(len(t_all), self.target_length)
    eos_kept = has_eos and kept < self.target_length
    if kept < len(t_all) or (has_eos and not eos_kept):
      flags |= TARGET_TRUNCATED
    s_span, t_span, valid = _spans(s_text, s_ends, t_text, t_ends, kept)
    target_ids = t_all[:kept]
    # Tokens after the aligned text that spell nothing (padding, control ids)
    # end the text as EOS does: they join the end span, so a sample of only
    # such tokens costs the teacher's probability of ending there.
    tail = len(s_span)
    while tail and s_span[tail - 1] < 0 and s_ends[tail - 1] < 0:
      tail -= 1
    silent = len(s_span) - tail if all(m >= 0 for m in s_span[:tail]) else 0
    if silent and not has_eos:
      eos_kept = kept < self.target_length
      flags |= 0 if eos_kept else TARGET_TRUNCATED
    if has_eos or silent:
      end_span = len(valid) if eos_kept else -1
      if silent:
        s_span[tail:] = [end_span] * silent
      s_span += [end_span] * has_eos
      if eos_kept:
        t_span.append(end_span)
        target_ids.append(int(self.teacher.eos_id))
        valid.append(1)
    return _Row(input_ids, target_ids, len(s_text.encode("utf-8")), len(t_text.encode("utf-8")),
                s_ends, t_ends[:kept], s_span, t_span, valid, flags)

  def __call__(self, input_tokens, input_mask, target_tokens, target_mask) -> Alignment:
    """numpy int[B, I_s], [B, I_s], [B, O_s], [B, O_s] -> Alignment (numpy int32)."""
    input_tokens, input_mask = np.asarray(input_tokens), np.asarray(input_mask)
    target_tokens, target_mask = np.asarray(target_tokens), np.asarray(target_mask)
    b, o_s = target_tokens.shape
    i_t, o_t, s = self.input_length, self.target_length, min(o_s, self.target_length)
    pad = int(self.teacher.pad_id)
    out = Alignment(
        input_tokens=np.full((b, i_t), pad, np.int32), input_mask=np.zeros((b, i_t), np.int32),
        target_tokens=np.full((b, o_t), pad, np.int32), target_mask=np.zeros((b, o_t), np.int32),
        student_offsets=np.full((b, o_s, 2), -1, np.int32),
        teacher_offsets=np.full((b, o_t, 2), -1, np.int32),
        student_span=np.full((b, o_s), -1, np.int32), teacher_span=np.full((b, o_t), -1, np.int32),
        span_mask=np.zeros((b, s), np.int32), span_count=np.zeros((b,), np.int32),
        student_span_start=np.zeros((b, s), np.int32),
        teacher_span_start=np.zeros((b, s), np.int32), flags=np.zeros((b,), np.int32))
    eos = int(self.student.eos_id)
    for r in range(b):
      prompt = input_tokens[r][input_mask[r] > 0].tolist()
      positions = np.flatnonzero(target_mask[r] > 0)
      ids = target_tokens[r, positions].tolist()
      has_eos = eos in ids
      cut = ids.index(eos) if has_eos else len(ids)
      row = self.row(prompt, ids[:cut], has_eos)
      pos = positions[:cut + has_eos]
      out.input_tokens[r, i_t - len(row.input_ids):] = row.input_ids
      out.input_mask[r, i_t - len(row.input_ids):] = 1
      n_t = len(row.target_ids)
      out.target_tokens[r, :n_t] = row.target_ids
      out.target_mask[r, :n_t] = 1
      s_off = _offsets(row.student_ends) + [(row.student_bytes,) * 2] * has_eos
      t_off = _offsets(row.teacher_ends) + [(row.teacher_bytes,) * 2] * (
          n_t - len(row.teacher_ends))
      out.student_offsets[r, pos[:len(s_off)]] = np.asarray(s_off, np.int32).reshape(-1, 2)
      out.teacher_offsets[r, :len(t_off)] = np.asarray(t_off, np.int32).reshape(-1, 2)
      out.student_span[r, pos] = row.student_span
      out.teacher_span[r, :n_t] = row.teacher_span
      count = len(row.span_valid)
      assert count <= s, (count, s)  # every span has a token on each side
      out.span_count[r] = count
      out.span_mask[r, :count] = row.span_valid
      out.student_span_start[r, :count] = pos[_starts(row.student_span, count)]
      out.teacher_span_start[r, :count] = _starts(row.teacher_span, count)
      out.flags[r] = row.flags
    return out

  def result_shapes(self, batch_size: int, student_target_length: int) -> Alignment:
    """`jax.ShapeDtypeStruct`s of `__call__`'s output (for `jax.pure_callback`)."""
    import jax  # pylint: disable=g-import-not-at-top
    b, o_s, i_t, o_t = batch_size, student_target_length, self.input_length, self.target_length
    s = min(o_s, o_t)
    shapes = Alignment(
        input_tokens=(b, i_t), input_mask=(b, i_t), target_tokens=(b, o_t), target_mask=(b, o_t),
        student_offsets=(b, o_s, 2), teacher_offsets=(b, o_t, 2), student_span=(b, o_s),
        teacher_span=(b, o_t), span_mask=(b, s), span_count=(b,), student_span_start=(b, s),
        teacher_span_start=(b, s), flags=(b,))
    return Alignment(*(jax.ShapeDtypeStruct(x, np.int32) for x in shapes))

  def in_graph(self, batch, target_tokens=None, target_mask=None) -> Alignment:
    """`__call__` inside a jitted function, through `jax.pure_callback`.

    batch: the student's batch (input_tokens/input_mask, and target_tokens/
    target_mask unless given: e.g. on-policy samples).
    """
    import jax  # pylint: disable=g-import-not-at-top
    targets = batch["target_tokens"] if target_tokens is None else target_tokens
    mask = batch["target_mask"] if target_mask is None else target_mask
    shapes = self.result_shapes(targets.shape[0], targets.shape[1])
    return jax.pure_callback(
        lambda *a: Alignment(*(np.asarray(x, np.int32) for x in self(*a))), shapes,
        batch["input_tokens"], batch["input_mask"], targets, mask, vmap_method="sequential")

