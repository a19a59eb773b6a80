"""Built-in synthetic tasks: generated from a seed, no download.

Three generators, each returning (input_text, target_text) pairs whose words
all lie in `WORDS` (so `vocabularies.word_vocabulary()` never emits UNK):

  arithmetic     multi-step word problems -> chain of thought ending "#### n"
  translation    English-like SVO -> an invented SOV language with case and
                 agreement suffixes (nouns/adjectives -o/-oj/-on/-ojn ...)
  summarization  a document of facts about several people -> one sentence
                 with the facts about the person the document is about

Texts are canonical for the word vocabulary: `decode(encode(t)) == t`.
Generation is pure Python and deterministic in (task, seed, split, params).
"""

import functools
import itertools
import random
import re
from typing import Callable, Sequence

Pair = tuple[str, str]

# ------------------------------------------------------------------ lexicons
NAMES = (("Tom", "He", "his"), ("Sam", "He", "his"), ("Ben", "He", "his"),
         ("Max", "He", "his"), ("Leo", "He", "his"), ("Ann", "She", "her"),
         ("Mia", "She", "her"), ("Zoe", "She", "her"), ("Eva", "She", "her"),
         ("Lily", "She", "her"))
ITEMS = ("apples", "pens", "books", "coins", "cards", "eggs", "shells",
         "stamps", "marbles", "cookies")
ADD_VERBS = ("buys", "finds", "gets", "wins")  # "<P> buys 4 more."
SUB_VERBS = ("gives away", "eats", "loses", "sells")  # "<P> eats 2."
MUL_WORDS = {2: "doubles", 3: "triples"}  # "The number of <item> doubles."

# source noun (sg, pl) -> target stem
NOUNS = (("dog", "dogs", "hund"), ("cat", "cats", "kat"),
         ("bird", "birds", "ornit"), ("horse", "horses", "ceval"),
         ("fox", "foxes", "vulp"), ("child", "children", "infan"),
         ("teacher", "teachers", "docent"), ("farmer", "farmers", "kampan"),
         ("king", "kings", "reg"), ("friend", "friends", "amik"),
         ("mouse", "mice", "mus"), ("wolf", "wolves", "lup"))
ADJECTIVES = (("big", "grand"), ("small", "pet"), ("red", "rug"),
              ("old", "vetus"), ("young", "jun"), ("happy", "felic"),
              ("black", "nigr"), ("white", "blank"))
# source verb (3sg present, plural present, past) -> target stem
VERBS = (("sees", "see", "saw", "vid"), ("likes", "like", "liked", "sat"),
         ("follows", "follow", "followed", "sekv"),
         ("helps", "help", "helped", "help"), ("finds", "find", "found", "trov"),
         ("chases", "chase", "chased", "cas"), ("feeds", "feed", "fed", "nutr"),
         ("knows", "know", "knew", "kon"))
NOUN_ENDINGS = ("o", "oj", "on", "ojn")  # (sg, pl) x (nominative, accusative)
ADJ_ENDINGS = ("a", "aj", "an", "ajn")
VERB_ENDINGS = {("present", False): "as", ("present", True): "ant",
                ("past", False): "is", ("past", True): "int"}

CITIES = ("Rome", "Oslo", "Paris", "Lima", "Cairo", "Tokyo", "Delhi", "Berlin")
JOBS = ("doctor", "teacher", "farmer", "pilot", "baker", "nurse", "singer",
        "lawyer")
HOBBIES = ("music", "tea", "chess", "football", "books", "painting", "dogs",
           "rain")
VEHICLES = ("car", "bike", "boat")
RELATIONS = ("lives in", "works as a", "likes", "owns a")

_TEMPLATE_WORDS = (
    "has more How many does have The number of Then "
    "the a and kaj la The report is about "
    "+ - * = . , ? ####").split()


def _words() -> tuple[str, ...]:
  words = set(_TEMPLATE_WORDS) | set("0123456789")
  for name, pronoun, possessive in NAMES:
    words |= {name, pronoun, possessive}
  words |= set(ITEMS) | set(MUL_WORDS.values())
  for verb in ADD_VERBS + SUB_VERBS + RELATIONS:
    words |= set(verb.split())
  for sg, pl, stem in NOUNS:
    words |= {sg, pl} | {stem + e for e in NOUN_ENDINGS}
  for adj, stem in ADJECTIVES:
    words |= {adj} | {stem + e for e in ADJ_ENDINGS}
  for *forms, stem in VERBS:
    words |= set(forms) | {stem + e for e in VERB_ENDINGS.values()}
  words |= set(CITIES) | set(JOBS) | set(HOBBIES) | set(VEHICLES)
  return tuple(sorted(words))


WORDS = _words()


# ---------------------------------------------------------------- arithmetic
STEP_ORDERS = ("given", "any")


def arithmetic_example(rng: random.Random, *, min_steps: int = 1,
                       max_steps: int = 2, max_operand: int = 9,
                       max_value: int = 30, multiply: bool = False,
                       step_order: str = "given") -> Pair:
  """One word problem; every intermediate value lies in [0, max_value].

  step_order: "given" solves the steps in the problem's order; "any" (several
  valid solutions, as in human-written data) applies a run of additions and
  subtractions in a random order whose intermediate values stay in range.
  """
  name, pronoun, _ = rng.choice(NAMES)
  item = rng.choice(ITEMS)
  value = start = rng.randint(1, max_operand * 2)
  sentences = [f"{name} has {value} {item}."]
  steps = []
  for _ in range(rng.randint(min_steps, max_steps)):
    ops = ["+"] * (value + max_operand <= max_value) + ["-"] * (value > 0)
    ops += ["*"] * (multiply and 0 < value <= max_value // 2)
    op = rng.choice(ops)
    if op == "*":
      n = rng.choice([k for k in MUL_WORDS if value * k <= max_value])
      sentences.append(f"The number of {item} {MUL_WORDS[n]}.")
      new = value * n
    elif op == "+":
      n = rng.randint(1, max_operand)
      sentences.append(f"{pronoun} {rng.choice(ADD_VERBS)} {n} more.")
      new = value + n
    else:
      n = rng.randint(1, min(max_operand, value))
      verb = rng.choice(SUB_VERBS).split()
      sentences.append(f"{pronoun} {' '.join([verb[0], str(n)] + verb[1:])}.")
      new = value - n
    steps.append((op, n))
    value = new
  sentences.append(f"How many {item} does {name} have?")
  if step_order == "any" and "*" not in (op for op, _ in steps):
    steps = _any_order(rng, start, steps, max_value)
  lines, value = [], start
  for op, n in steps:
    new = _APPLY[op](value, n)
    lines.append(f"{value} {op} {n} = {new}.")
    value = new
  return " ".join(sentences), " ".join(lines + [f"#### {value}"])


def _any_order(rng: random.Random, start: int, steps: list, max_value: int) -> list:
  """`steps` in a random order whose running values stay in [0, max_value]."""
  orders = [list(p) for p in itertools.permutations(steps)]
  rng.shuffle(orders)
  for order in orders:
    value = start
    for op, n in order:
      value = _APPLY[op](value, n)
      if not 0 <= value <= max_value:
        break
    else:
      return order
  return steps


_STEP = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)\.")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arithmetic_slip(rng: random.Random, target: str) -> str:
  """`target` with one step's result off by 1-3 and the later steps carried on
  from it (a careless but consistent labeler); unchanged if no slip keeps every
  value >= 0."""
  steps = [(int(a), op, int(n)) for a, op, n, _ in _STEP.findall(target)]
  if not steps:
    return target
  at = rng.randrange(len(steps))
  for delta in rng.sample((-3, -2, -1, 1, 2, 3), 6):
    value, lines = None, []
    for i, (a, op, n) in enumerate(steps):
      a = a if value is None else value
      value = _APPLY[op](a, n) + (delta if i == at else 0)
      if value < 0:
        break
      lines.append(f"{a} {op} {n} = {value}.")
    else:
      return " ".join(lines + [f"#### {value}"])
  return target


# --------------------------------------------------------------- translation
def _noun_phrase(rng: random.Random, max_adjectives: int, accusative: bool):
  sg, pl, stem = rng.choice(NOUNS)
  plural = rng.random() < 0.4
  det = rng.choice(("the", "a")) if not plural else rng.choice(("the", ""))
  adjs = rng.sample(ADJECTIVES, rng.randint(0, max_adjectives))
  case = 2 * accusative + plural
  source = [det] + [a for a, _ in adjs] + [pl if plural else sg]
  target = (["la"] if det == "the" else []) + [stem + NOUN_ENDINGS[case]]
  target += [s + ADJ_ENDINGS[case] for _, s in adjs]  # adjectives follow
  return [w for w in source if w], target, plural


def _clause(rng: random.Random, max_adjectives: int):
  subj_src, subj_tgt, plural = _noun_phrase(rng, max_adjectives, False)
  obj_src, obj_tgt, _ = _noun_phrase(rng, max_adjectives, True)
  present_sg, present_pl, past, stem = rng.choice(VERBS)
  tense = rng.choice(("present", "past"))
  verb = past if tense == "past" else (present_pl if plural else present_sg)
  source = subj_src + [verb] + obj_src
  target = subj_tgt + obj_tgt + [stem + VERB_ENDINGS[tense, plural]]  # SOV
  return source, target


def translation_example(rng: random.Random, *, max_clauses: int = 2,
                        max_adjectives: int = 2) -> Pair:
  """One sentence pair; clauses joined by "and" / "kaj"."""
  source, target = [], []
  for i in range(rng.randint(1, max_clauses)):
    s, t = _clause(rng, max_adjectives)
    source += (["and"] if i else []) + s
    target += (["kaj"] if i else []) + t
  return " ".join(source) + ".", " ".join(target) + "."


# ------------------------------------------------------------- summarization
def _fact(rng: random.Random, relation: str) -> str:
  if relation == "lives in":
    return f"lives in {rng.choice(CITIES)}"
  if relation == "works as a":
    return f"works as a {rng.choice(JOBS)}"
  if relation == "likes":
    return f"likes {rng.choice(HOBBIES)}"
  color = rng.choice(("red", "black", "white"))
  return f"owns a {color} {rng.choice(VEHICLES)}"


def summarization_example(rng: random.Random, *, min_facts: int = 2,
                          max_facts: int = 3, num_distractors: int = 3) -> Pair:
  """A report about one person among others -> that person's facts."""
  people = rng.sample([n for n, _, _ in NAMES], 1 + min(num_distractors, 4))
  topic = people[0]
  relations = rng.sample(RELATIONS, rng.randint(min_facts, max_facts))
  sentences = [(topic, _fact(rng, r)) for r in relations]
  sentences += [(rng.choice(people[1:]), _fact(rng, rng.choice(RELATIONS)))
                for _ in range(num_distractors)]
  rng.shuffle(sentences)
  document = [f"The report is about {topic}."]
  document += [f"{who} {fact}." for who, fact in sentences]
  key = [fact for who, fact in sentences if who == topic]
  summary = ", ".join(key[:-1]) + " and " + key[-1] if len(key) > 1 else key[0]
  return " ".join(document), f"{topic} {summary}."


# ------------------------------------------------------------------- splits
GENERATORS: dict[str, Callable[..., Pair]] = {
    "arithmetic": arithmetic_example,
    "translation": translation_example,
    "summarization": summarization_example,
}
SPLITS = ("train", "validation", "test")


def answer_only(rng: random.Random, target: str) -> str:
  """`target` without its chain of thought: just "#### n" (a bare-answer dataset)."""
  del rng
  return target[target.index("####"):]


# (kind, label_noise_kind) -> how one training target is degraded.
DEGRADATIONS: dict[tuple[str, str], Callable[[random.Random, str], str]] = {
    ("arithmetic", "slip"): arithmetic_slip,
    ("arithmetic", "answer_only"): answer_only,
}


@functools.lru_cache(maxsize=16)
def _generate(kind: str, seed: int, num_train: int, num_eval: int,
              params: tuple[tuple[str, object], ...]) -> dict[str, list[Pair]]:
  params = dict(params)
  label_noise = float(params.pop("label_noise", 0.0))
  noise_kind = params.pop("label_noise_kind", "slip")
  generator = functools.partial(GENERATORS[kind], **params)
  splits, seen = {}, set()
  for split in ("test", "validation", "train"):  # held-out splits first
    rng = random.Random(f"{kind}/{seed}/{split}")
    size = num_train if split == "train" else num_eval
    examples = []
    for _ in range(100 * size + 1000):  # bounded: tiny spaces may run out
      if len(examples) == size:
        break
      pair = generator(rng)
      if pair[0] in seen:
        continue
      examples.append(pair)
      if split != "train":
        seen.add(pair[0])
    splits[split] = examples
  if label_noise:  # the training targets only; held-out splits stay correct
    degrade = DEGRADATIONS[kind, noise_kind]
    rng = random.Random(f"{kind}/{seed}/label_noise")
    splits["train"] = [(x, degrade(rng, y) if rng.random() < label_noise else y)
                       for x, y in splits["train"]]
  return splits


def arithmetic_steps(pair: Pair) -> str:
  """The route of an arithmetic example by its number of steps: "2_steps", ...

  Read from the problem (its sentences but the first and the question), so a
  degraded target does not change it.
  """
  return f"{len(re.findall(r'[.?]', pair[0])) - 2}_steps"


# (kind, route_by) -> the route name of an example (tasks' `route_by`).
ROUTES: dict[tuple[str, str], Callable[[Pair], str]] = {
    ("arithmetic", "steps"): arithmetic_steps,
}


def generate(kind: str, split: str, *, seed: int = 0, num_train: int = 20000,
             num_eval: int = 500, **params) -> Sequence[Pair]:
  """The examples of one split; train never repeats a held-out input.

  `label_noise=p` (arithmetic only) degrades a fraction p of the training
  targets, as `label_noise_kind` says: 'slip' (`arithmetic_slip`) or
  'answer_only' (`answer_only`): a dataset worse than the task's true answers.
  """
  return _generate(kind, seed, num_train, num_eval,
                   tuple(sorted(params.items())))[split]
