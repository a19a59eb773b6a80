"""Tests for gkd.tasks.metrics against hand-computed values."""

import math

import pytest

from gkd.tasks import metrics


def test_rouge_hand_computed():
  got = metrics.rouge(["the cat sat on the mat"], ["the cat sat"])
  # unigrams: 3 of 3 predicted, 3 of 6 reference -> F = 2/3.
  assert got["rouge1"] == pytest.approx(100 * 2 / 3)
  # bigrams: 2 of 2 predicted, 2 of 5 reference -> F = 2*0.4/1.4.
  assert got["rouge2"] == pytest.approx(100 * 0.8 / 1.4)
  assert got["rougeL"] == pytest.approx(100 * 2 / 3)  # LCS = 3 tokens


def test_rouge_averages_examples_and_stems():
  got = metrics.rouge(["cats run", "a b"], ["cat running", "c d"])
  assert got["rouge1"] == pytest.approx(50.0)  # 100 and 0


def test_bleu_hand_computed():
  # All n-gram precisions 1, brevity penalty exp(1 - 6/4).
  assert metrics.bleu(["a b c d e f"], ["a b c d"])["bleu"] == pytest.approx(
      100 * math.exp(-0.5), abs=1e-3)
  # p1 = 4/5, p2 = 2/4, p3 = 0/3 and p4 = 0/2 smoothed to 1/(2*3), 1/(4*2).
  expected = math.exp((math.log(0.8) + math.log(0.5) + math.log(1 / 6)
                       + math.log(1 / 8)) / 4)
  assert metrics.bleu(["a b c d e"], ["a b x d e"])["bleu"] == pytest.approx(
      100 * expected, abs=1e-3)
  assert metrics.bleu(["x y z w"], ["x y z w"])["bleu"] == pytest.approx(100)


@pytest.mark.parametrize("text,expected", [
    ("3 + 4 = 7. 7 - 2 = 5. #### 5", "5"),
    ("#### 1,234", "1234"),
    ("she pays $1,000.50 in total. #### $1,000.50", "1000.5"),
    ("#### -5 apples", "-5"),
    ("#### $-3", "-3"),
    ("the loss is -$3", "-3"),  # no "####": the whole text is the final answer
    ("#### 7.0", "7"),
    ("#### 0.50 dollars.", "0.5"),
    ("#### .5", "0.5"),
    ("#### 4 #### 8", "8"),  # the last "####"
    ("The answer is 42.", "42"),
    ("#### -0", "0"),
    # The whole final answer must be one number: a list, an expression or
    # trailing text with another number is not an answer.
    ("#### 14, 15", None),
    ("#### 14,15", None),
    ("#### 14 and 15", None),
    ("#### 12. Then some more text 99", None),
    ("so 10-2 = 8", None),
    ("#### 3 + 4", None),
    ("15-3", None),
    ("no number here", None),
    ("####", None),
])
def test_extract_answer_tricky_cases(text, expected):
  assert metrics.extract_answer(text) == expected


def test_accuracy_compares_whole_final_answers_as_numbers():
  targets = ["1 + 1 = 2. #### 2", "#### 1,000", "#### -3", "#### 4", "#### 5", "#### 6"]
  predictions = ["#### 2.0", "x #### $1000 dollars", "#### 3", "nothing", "so 5", "#### 06"]
  # 2.0 = 2, $1000 = 1,000, 06 = 6; "so 5" has no "####" although its target does.
  assert metrics.accuracy(targets, predictions) == {"accuracy": 50.0}
  assert metrics.accuracy([], []) == {"accuracy": 0.0}
  with pytest.raises(ValueError):
    metrics.accuracy(["#### 1"], [])


def test_a_wrong_list_answer_that_starts_with_the_right_number_is_wrong():
  # The counterexample: the old accuracy took the first number after
  # "####" and scored the wrong list as correct.
  targets = ["#### 14, 15", "#### 14"]
  predictions = ["#### 14, 16", "#### 14, 15"]
  assert metrics.accuracy(targets, predictions) == {"accuracy": 0.0}
  assert metrics.exact_match(targets, predictions) == {"exact_match": 0.0}
  assert metrics.accuracy(targets, ["#### 14,  15", "#### 14."]) == {"accuracy": 100.0}


def test_exact_match_compares_final_answer_text():
  targets = ["a b #### 14, 15", "#### 7", "#### 7", "#### $5", "red green"]
  predictions = ["c #### 14,   15", "#### 7.0", "#### 7", "#### 5", "red  green"]
  # whitespace collapsed; "7.0" is not "7" and "5" is not "$5" as text
  assert metrics.exact_match(targets, predictions) == {"exact_match": 60.0}
  assert metrics.exact_match(["#### 7"], ["7"]) == {"exact_match": 0.0}  # no "####"


def test_accuracy_agrees_with_the_gsm8k_reference_on_its_format():
  # The reference GSM8K evaluation (openai/grade-school-math) reads the number
  # after "#### ", drops commas and compares strings; on single-number answers
  # in the dataset's format the two agree.
  import re  # pylint: disable=g-import-not-at-top
  reference = lambda t: (m.group(1).strip().replace(",", "") if (
      m := re.search(r"#### (\-?[0-9\.\,]+)", t)) else "[invalid]")
  pairs = [("x #### 1,234", "y #### 1234"), ("#### 72", "#### 72"), ("#### 72", "#### 27"),
           ("#### -4", "#### -4"), ("#### 10", "#### 100"), ("#### 3", "no marker 3")]
  for target, prediction in pairs:
    got = metrics.accuracy([target], [prediction])["accuracy"] == 100.0
    assert got == (reference(prediction) == reference(target)), (target, prediction)
