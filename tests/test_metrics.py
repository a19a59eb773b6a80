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
    ("the loss is -$3", "-3"),
    ("#### 7.0", "7"),
    ("#### 0.50 dollars", "0.5"),
    ("#### .5", "0.5"),
    ("#### 12. Then some more text 99", "12"),
    ("#### 4 #### 8", "8"),
    ("The answer is 42.", "42"),
    ("so 10-2 = 8", "8"),
    ("15-3", "3"),  # a minus inside an expression is not a sign
    ("no number here", None),
    ("####", None),
    ("#### -0", "0"),
])
def test_extract_answer_tricky_cases(text, expected):
  assert metrics.extract_answer(text) == expected


def test_accuracy_compares_final_numbers():
  targets = ["1 + 1 = 2. #### 2", "#### 1,000", "#### -3", "#### 4"]
  predictions = ["#### 2.0", "so 1000", "#### 3", "nothing"]
  assert metrics.accuracy(targets, predictions) == {"accuracy": 50.0}
  assert metrics.accuracy([], []) == {"accuracy": 0.0}
  with pytest.raises(ValueError):
    metrics.accuracy(["#### 1"], [])
