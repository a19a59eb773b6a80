"""Tests for gkd.tasks.offline: determinism, held-out splits, and each
generator checked against an independent reading of its rules."""

import random
import re

import numpy as np
import pytest

from gkd.tasks import offline
from gkd.tasks import vocabularies

VOCAB = vocabularies.WordVocabulary(offline.WORDS)


def _solve(problem: str) -> int:
  """An independent interpreter of the arithmetic word problems."""
  value = None
  for sentence in problem.split(". "):
    words = sentence.rstrip(".?").split()
    numbers = [int(w) for w in words if w.isdigit()]
    if "has" in words:
      value = numbers[0]
    elif "more" in words:
      value += numbers[0]
    elif "doubles" in words or "triples" in words:
      value *= 2 if "doubles" in words else 3
    elif numbers:
      value -= numbers[0]
  return value


@pytest.mark.parametrize("kind", sorted(offline.GENERATORS))
def test_texts_are_canonical_for_the_word_vocabulary(kind):
  for inputs, targets in offline.generate(kind, "validation", num_eval=300):
    for text in (inputs, targets):
      ids = VOCAB.encode(text)
      assert VOCAB.unk_id not in ids, text
      assert VOCAB.decode(ids) == text


@pytest.mark.parametrize("kind", sorted(offline.GENERATORS))
def test_deterministic_and_seeded(kind):
  a = offline.generate(kind, "train", seed=3, num_train=200)
  b = offline._generate.__wrapped__(kind, 3, 200, 500, ())["train"]
  c = offline.generate(kind, "train", seed=4, num_train=200)
  assert list(a) == list(b)
  assert list(a) != list(c)


@pytest.mark.parametrize("kind", sorted(offline.GENERATORS))
def test_held_out_inputs_never_in_train(kind):
  train = {x for x, _ in offline.generate(kind, "train", num_train=3000)}
  val = {x for x, _ in offline.generate(kind, "validation", num_train=3000)}
  test = {x for x, _ in offline.generate(kind, "test", num_train=3000)}
  assert len(val) == 500 and len(test) == 500
  assert not train & val and not train & test and not val & test


@pytest.mark.parametrize("multiply", [False, True])
def test_arithmetic_answers_and_chain_of_thought(multiply):
  rng = random.Random(0)
  for _ in range(500):
    problem, answer = offline.arithmetic_example(
        rng, min_steps=2, max_steps=4, multiply=multiply, max_value=99)
    steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", answer)
    assert 2 <= len(steps) <= 4
    for a, op, b, c in steps:
      assert eval(f"{a}{op}{b}") == int(c) and 0 <= int(c) <= 99  # pylint: disable=eval-used
    assert answer.endswith(f"#### {_solve(problem)}")


def test_arithmetic_difficulty_knob_changes_lengths():
  easy = offline.generate("arithmetic", "test", min_steps=1, max_steps=1)
  hard = offline.generate("arithmetic", "test", min_steps=4, max_steps=4)
  assert all(t.count("=") == 1 for _, t in easy)
  assert all(t.count("=") == 4 for _, t in hard)


def _operations(problem: str) -> list[tuple[str, int]]:
  """The (op, operand) of each of the problem's steps, in the problem's order."""
  ops = []
  for sentence in problem.split(". ")[1:]:
    words = sentence.rstrip(".?").split()
    numbers = [int(w) for w in words if w.isdigit()]
    if "doubles" in words or "triples" in words:
      ops.append(("*", 2 if "doubles" in words else 3))
    elif numbers:
      ops.append(("+" if "more" in words else "-", numbers[0]))
  return ops


def test_any_step_order_solves_each_step_once_in_a_valid_order():
  rng = random.Random(0)
  reordered = 0
  for _ in range(500):
    problem, answer = offline.arithmetic_example(rng, min_steps=2, max_steps=3,
                                                 max_value=20, step_order="any")
    steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", answer)
    for (_, _, _, c), (a, _, _, _) in zip(steps, steps[1:]):  # a chain of running values
      assert c == a
    for a, op, b, c in steps:
      assert eval(f"{a}{op}{b}") == int(c) and 0 <= int(c) <= 20  # pylint: disable=eval-used
    given = _operations(problem)
    done = [(op, int(b)) for _, op, b, _ in steps]
    assert sorted(done) == sorted(given) and answer.endswith(f"#### {_solve(problem)}")
    reordered += done != given
  assert 0.2 < reordered / 500 < 0.8  # several solutions for many problems, not for all


def test_given_step_order_is_the_default_and_multiplication_keeps_it():
  assert offline.generate("arithmetic", "test") == offline.generate(
      "arithmetic", "test", step_order="given")
  rng = random.Random(0)
  for _ in range(200):
    problem, answer = offline.arithmetic_example(rng, min_steps=2, max_steps=3, multiply=True,
                                                 step_order="any")
    if any(op == "*" for op, _ in _operations(problem)):
      done = [(op, int(b)) for op, b in re.findall(r"\d+ ([-+*]) (\d+) = ", answer)]
      assert done == _operations(problem)


def test_unknown_step_order_is_a_user_error():
  from gkd.errors import UserError  # pylint: disable=g-import-not-at-top
  from gkd.tasks import registry  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match="step_order='sorted'; choose one of given, any"):
    registry.offline_arithmetic(step_order="sorted")


def test_label_noise_slips_one_step_of_a_fraction_of_the_training_targets():
  kw = dict(num_train=4000, max_steps=3, max_value=20)
  clean = offline.generate("arithmetic", "train", **kw)
  noisy = offline.generate("arithmetic", "train", label_noise=0.3, **kw)
  for split in ("validation", "test"):  # held-out answers stay correct
    assert offline.generate("arithmetic", split, label_noise=0.3, **kw) == \
        offline.generate("arithmetic", split, **kw)
  changed = [(x, y, z) for (x, y), (x2, z) in zip(clean, noisy) if y != z]
  assert all(x == x2 for (x, _), (x2, _) in zip(clean, noisy))
  assert 0.25 < len(changed) / len(clean) < 0.32  # a few slips are impossible (value < 0)
  for problem, right, slipped in changed:
    steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", slipped)
    wrong = [int(c) - eval(f"{a}{op}{b}") for a, op, b, c in steps]  # pylint: disable=eval-used
    assert sum(d != 0 for d in wrong) == 1 and all(abs(d) <= 3 for d in wrong)
    for (_, _, _, c), (a, _, _, _) in zip(steps, steps[1:]):  # carried on from the slip
      assert c == a
    assert slipped.endswith(f"#### {steps[-1][3]}") and right.endswith(f"#### {_solve(problem)}")
    assert not slipped.endswith(f"#### {_solve(problem)}")


def test_answer_only_label_noise_drops_the_chain_of_thought():
  kw = dict(num_train=2000, max_value=20)
  clean = offline.generate("arithmetic", "train", **kw)
  noisy = offline.generate("arithmetic", "train", label_noise=0.6,
                           label_noise_kind="answer_only", **kw)
  bare = [(y, z) for (_, y), (_, z) in zip(clean, noisy) if y != z]
  assert 0.55 < len(bare) / len(clean) < 0.65
  assert all(z == y[y.index("####"):] for y, z in bare)


def test_translation_follows_its_grammar():
  nouns = {sg: stem for sg, _, stem in offline.NOUNS}
  nouns.update({pl: stem for _, pl, stem in offline.NOUNS})
  verbs = {f: stem for *forms, stem in offline.VERBS for f in forms}
  rng = random.Random(1)
  for _ in range(300):
    source, target = offline.translation_example(rng)
    for src, tgt in zip(source[:-1].split(" and "), target[:-1].split(" kaj ")):
      src_nouns = [nouns[w] for w in src.split() if w in nouns]
      tgt_words = tgt.split()
      # SOV: subject then object nouns in source order, the verb last.
      verb = [verbs[w] for w in src.split() if w in verbs]
      assert len(verb) == 1 and tgt_words[-1].startswith(verb[0])
      target_nouns = [w for w in tgt_words if w.rstrip("jn").endswith("o")]
      assert [w.rstrip("jn")[:-1] for w in target_nouns] == src_nouns
      # The object (second noun) is accusative, the subject is not.
      assert not target_nouns[0].endswith("n") and target_nouns[1].endswith("n")


def test_summary_states_exactly_the_topic_facts():
  rng = random.Random(2)
  for _ in range(300):
    document, summary = offline.summarization_example(rng)
    sentences = document[:-1].split(". ")
    topic = sentences[0].split()[-1]
    facts = [s[len(topic) + 1:] for s in sentences[1:] if s.startswith(topic)]
    expected = (", ".join(facts[:-1]) + " and " + facts[-1]
                if len(facts) > 1 else facts[0])
    assert summary == f"{topic} {expected}."


@pytest.mark.parametrize("kind,params,max_in,max_out", [
    ("arithmetic", {}, 32, 24),
    ("arithmetic", dict(max_steps=3, max_value=99), 64, 32),
    ("translation", {}, 24, 24),
    ("summarization", {}, 48, 24)])
def test_default_sizes_fit_the_configured_lengths(kind, params, max_in,
                                                  max_out):
  pairs = offline.generate(kind, "validation", **params)
  in_len = np.array([len(VOCAB.encode(x)) + 1 for x, _ in pairs])  # + BOS
  out_len = np.array([len(VOCAB.encode(y)) + 1 for _, y in pairs])  # + EOS
  assert in_len.max() <= max_in and out_len.max() <= max_out
  assert in_len.mean() >= 8 and out_len.mean() >= 6
