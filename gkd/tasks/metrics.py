"""Metrics on decoded text: seqio-style `fn(targets, predictions) -> dict`.

ROUGE-1/2/L F-measure x100 (rouge-score, stemming, averaged over examples),
sacreBLEU corpus BLEU, and on the final answer after "####" (GSM8K's format):
`accuracy` (numeric) and `exact_match` (text), both x100.
"""

import decimal
import re
from typing import Optional, Sequence

MARKER = "####"
# A number: optional sign or "$" (a "-" right after a word or ")" is a minus
# sign of an expression, not a negative number), digits with optional
# thousands commas, optional decimals.
_SIGN = r"(?:(?<![\w)])-\$?|\$\s?-?)?"
_BODY = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_NUMBER = re.compile(f"{_SIGN}(?:{_BODY})")
# What may surround the one number of an answer: unit words, a currency sign,
# "%", a colon or a final period -- not a second number, an operator or a list.
_UNITS = re.compile(r"[A-Za-z\s$%.:'\u00a3\u20ac]*")


def _canonical(number: str) -> str:
  text = number.replace(",", "").replace("$", "").replace(" ", "")
  if text.startswith("-."):
    text = "-0" + text[1:]
  elif text.startswith("."):
    text = "0" + text
  if "." in text:
    text = text.rstrip("0").rstrip(".")
  return "0" if text in ("-0", "") else text


def final_answer(text: str) -> str:
  """The text after the last "####" (whitespace collapsed), or all of `text` if it has none."""
  marker = text.rfind(MARKER)
  return " ".join((text[marker + len(MARKER):] if marker >= 0 else text).split())


def parse_number(answer: str) -> Optional[str]:
  """The one number `answer` consists of, canonicalised; None if it has none or several.

  Strips what the GSM8K reference evaluation strips (thousands commas) and
  units around the number (words, "$", "%", a final period): "1,234.50" ->
  "1234.5", "$-3 dollars." -> "-3", "7.0" -> "7". "14, 15", "3 + 4 = 7" and
  "12. Then 99" hold several numbers: None.
  """
  numbers = list(_NUMBER.finditer(answer))
  if len(numbers) != 1:
    return None
  found = numbers[0]
  if not (_UNITS.fullmatch(answer[:found.start()]) and _UNITS.fullmatch(answer[found.end():])):
    return None
  return _canonical(found.group())


def extract_answer(text: str) -> Optional[str]:
  """The number the final answer of a GSM8K-style text is, canonicalised, or None.

  The final answer is everything after the last "####" (all of the text if it
  has none), and it must be one number (see `parse_number`).
  """
  return parse_number(final_answer(text))


def _equal_numbers(a: str, b: str) -> bool:
  return decimal.Decimal(a) == decimal.Decimal(b)


def _scored(targets: Sequence[str], predictions: Sequence[str], hit) -> float:
  pairs = list(zip(targets, predictions, strict=True))
  if not pairs:
    return 0.0
  # A prediction without "####" has no final answer when its target has one
  # (as in the GSM8K reference evaluation).
  hits = sum(hit(final_answer(t), final_answer(p)) for t, p in pairs
             if MARKER in p or MARKER not in t)
  return 100.0 * hits / len(pairs)


def accuracy(targets: Sequence[str], predictions: Sequence[str]
             ) -> dict[str, float]:
  """Percent of predictions whose whole final answer is the target's number.

  GSM8K's accuracy: both final answers (after the last "####") are parsed as
  one number each (`parse_number`) and compared as numbers, so "#### 14, 15"
  is not the answer 14. A target whose final answer is not one number (a list,
  a word) is matched by `exact_match`'s text comparison instead.
  """
  def hit(target: str, prediction: str) -> bool:
    t = parse_number(target)
    if t is None:
      return target == prediction
    p = parse_number(prediction)
    return p is not None and _equal_numbers(p, t)
  return {"accuracy": _scored(targets, predictions, hit)}


def exact_match(targets: Sequence[str], predictions: Sequence[str]
                ) -> dict[str, float]:
  """Percent of predictions whose final answer text equals the target's.

  The final answer is the text after the last "####" (the whole text when the
  target has no "####"), runs of whitespace collapsed; nothing else is
  normalised ("7.0" is not "7", "$5" is not "5").
  """
  return {"exact_match": _scored(targets, predictions, lambda t, p: t == p)}


def rouge(targets: Sequence[str], predictions: Sequence[str]
          ) -> dict[str, float]:
  """Mean ROUGE-1/2/L F-measure x100 (Porter stemming, as for XSum)."""
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  kinds = ("rouge1", "rouge2", "rougeL")
  scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
  totals = dict.fromkeys(kinds, 0.0)
  for t, p in zip(targets, predictions, strict=True):
    scores = scorer.score(t, p)
    for k in kinds:
      totals[k] += scores[k].fmeasure
  n = max(len(targets), 1)
  return {k: 100.0 * v / n for k, v in totals.items()}


def bleu(targets: Sequence[str], predictions: Sequence[str]
         ) -> dict[str, float]:
  """sacreBLEU corpus BLEU (13a tokenisation, exp smoothing)."""
  import sacrebleu  # pylint: disable=g-import-not-at-top
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} "
                     "predictions")
  if not targets:
    return {"bleu": 0.0}
  return {"bleu": sacrebleu.corpus_bleu(list(predictions), [list(targets)]).score}


def strip(text: str, example=None, is_target: bool = False) -> str:
  """The default postprocessor: surrounding whitespace removed."""
  del example, is_target
  return text.strip()
