"""Metrics on decoded text: seqio-style `fn(targets, predictions) -> dict`.

ROUGE-1/2/L F-measure x100 (rouge-score, stemming, averaged over examples),
sacreBLEU corpus BLEU, and GSM8K accuracy x100 on the final number.
"""

import re
from typing import Optional, Sequence

# A number: optional sign or "$" (a "-" right after a word or ")" is a minus
# sign of an expression, not a negative number), digits with optional
# thousands commas, optional decimals.
_SIGN = r"(?:(?<![\w)])-\$?|\$\s?-?)?"
_BODY = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_NUMBER = re.compile(f"{_SIGN}(?:{_BODY})")


def _canonical(number: str) -> str:
  text = number.replace(",", "").replace("$", "").replace(" ", "")
  if text.startswith("-."):
    text = "-0" + text[1:]
  elif text.startswith("."):
    text = "0" + text
  if "." in text:
    text = text.rstrip("0").rstrip(".")
  return "0" if text in ("-0", "") else text


def extract_answer(text: str) -> Optional[str]:
  """The final numeric answer of a GSM8K-style text, canonicalised, or None.

  Uses the first number after the last "####" when there is one, else the
  last number in the text. "1,234.50" -> "1234.5", "$-3" / "-$3" -> "-3".
  """
  marker = text.rfind("####")
  if marker >= 0:
    found = _NUMBER.search(text[marker + 4:])
    if found:
      return _canonical(found.group())
  numbers = _NUMBER.findall(text)
  return _canonical(numbers[-1]) if numbers else None


def accuracy(targets: Sequence[str], predictions: Sequence[str]
             ) -> dict[str, float]:
  """Percent of predictions whose final number equals the target's."""
  if not targets:
    return {"accuracy": 0.0}
  hits = sum(extract_answer(p) is not None and
             extract_answer(p) == extract_answer(t)
             for t, p in zip(targets, predictions, strict=True))
  return {"accuracy": 100.0 * hits / len(targets)}


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
