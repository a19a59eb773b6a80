"""Property tests (hypothesis): the JSONL reader and the command line's Gin-binding parser
accept any input with a result or our clear error (UserError / exit 2), never another exception.

tests/test_jsonl.py already throws arbitrary byte *lines* at `read_lines`; here whole files go
through `read_jsonl`, valid files round-trip exactly, and the `--gin.NAME=VALUE` path
(`split_gin_flags` -> `_as_gin_value` -> `parse_gin`) is checked against Gin itself.
"""

import ast
import itertools
import json

import gin
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import pytest

import gkd.losses  # pylint: disable=unused-import  (registers the configurables)
import gkd.models  # pylint: disable=unused-import
import gkd.sampling  # pylint: disable=unused-import
import gkd.tasks  # pylint: disable=unused-import
import gkd.train  # pylint: disable=unused-import
from gkd import main
from gkd.errors import UserError
from gkd.tasks import jsonl

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
_files = itertools.count()


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _new_file(tmp_path, data: bytes) -> str:
  path = tmp_path / f"{next(_files)}.jsonl"  # a new name each time: no stale cache entry
  path.write_bytes(data)
  return str(path)


# ------------------------------------------------------------------ JSONL

_JSONISH = st.sampled_from([b"{", b"}", b'"input"', b'"target"', b":", b",", b'"x"', b"1",
                            b"null", b"[", b"]", b"\\u0000", b"\\ud800", b"\xef\xbb\xbf",
                            b"\r", b"\n", b"\r\n", b" ", b"\x00", b"\xff", b"\xc3"])


@SETTINGS
@given(data=st.one_of(st.binary(max_size=200),
                      st.lists(_JSONISH, max_size=40).map(b"".join)))
def test_any_file_reads_to_records_or_a_user_error(tmp_path, data):
  path = _new_file(tmp_path, data)
  try:
    records = jsonl.read_jsonl(path)
  except UserError as e:
    assert str(e).startswith(path), str(e)  # names the file (and the line, where one is bad)
    return
  assert 0 < len(records) <= len(data.splitlines())
  for record in records:
    assert len(record) == 2 and all(isinstance(v, str) for v in record)
    for v in record:
      v.encode("utf-8")  # no lone surrogates reach the tokenizer


_TEXT = st.text(max_size=30)  # any Unicode scalar values, including control characters


@SETTINGS
@given(pairs=st.lists(st.tuples(_TEXT, _TEXT), min_size=1, max_size=8),
       ensure_ascii=st.booleans(), newline=st.sampled_from([b"\n", b"\r\n", b"\r"]),
       blanks=st.lists(st.sampled_from([b"", b"  ", b"\t"]), max_size=3),
       extra=st.dictionaries(st.text(max_size=5).filter(lambda k: k not in ("input", "target")),
                             st.integers(), max_size=2))
def test_valid_files_round_trip_exactly(tmp_path, pairs, ensure_ascii, newline, blanks, extra):
  lines = [json.dumps({"input": i, "target": t, **extra}, ensure_ascii=ensure_ascii).encode()
           for i, t in pairs]
  lines[1:1] = blanks  # blank and whitespace-only lines are skipped
  path = _new_file(tmp_path, newline.join(lines) + newline)
  assert jsonl.read_jsonl(path) == tuple(pairs)


def test_a_bom_or_a_bare_value_is_named_by_line(tmp_path):
  good = b'{"input": "a", "target": "b"}'
  for bad, problem in [(b"\xef\xbb\xbf" + good, "line 1: bad JSON"),
                       (good + b"\n" + b'"just a string"', "line 2: expected a JSON object"),
                       (good + b"\n" + b"1e999999", "line 2: expected a JSON object")]:
    with pytest.raises(UserError, match=problem):
      jsonl.read_jsonl(_new_file(tmp_path, bad))


# ------------------------------------------------------------------ --gin.NAME=VALUE


@SETTINGS
@given(argv=st.lists(st.one_of(
    st.text(max_size=20),
    st.builds(lambda name, sep, value: f"--gin.{name}{sep}{value}",
              st.text(max_size=12), st.sampled_from(["=", "", "=="]), st.text(max_size=12))),
    max_size=6))
def test_split_gin_flags_partitions_argv_or_exits_2(argv, capsys):
  try:
    rest, bindings = main.split_gin_flags(argv)
  except SystemExit as e:
    assert e.code == 2
    first_bad = next(a for a in argv if a.startswith("--gin.") and
                     not all(a[len("--gin."):].partition("=")[:2]))  # no NAME or no "="
    err = capsys.readouterr().err
    assert err == f"gkd: error: {first_bad!r} must look like --gin.NAME=VALUE\n"
    return
  gin_args = [a for a in argv if a.startswith("--gin.")]
  assert rest == [a for a in argv if not a.startswith("--gin.")]
  assert len(bindings) == len(gin_args)
  for arg, binding in zip(gin_args, bindings):
    name, _, value = arg[len("--gin."):].partition("=")
    assert binding == f"{name} = {main._as_gin_value(value)}"  # pylint: disable=protected-access


@gin.configurable(module="gkd_property_test")
def probe(value=None):
  return value


def _is_literal(text: str) -> bool:
  try:
    ast.literal_eval(text)
    return True
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return False


@SETTINGS
@given(value=st.one_of(st.text(max_size=30), st.from_regex(r"[/.\w-]{1,20}", fullmatch=True)))
def test_bare_strings_reach_gin_unchanged(value):
  """What a shell passes as VALUE is bound as that string, unless it is Gin or a literal."""
  gin_value = main._as_gin_value(value)  # pylint: disable=protected-access
  if value.startswith(main._LITERAL_START) or _is_literal(value):  # pylint: disable=protected-access
    assert gin_value == value
    return
  gin.parse_config(f"gkd_property_test.probe.value = {gin_value}")
  assert probe() == value


@SETTINGS
@given(value=st.one_of(
    st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none(),
    st.lists(st.integers(), max_size=3), st.text(max_size=10).map(repr)))
def test_python_literals_keep_their_type(value):
  text = value if isinstance(value, str) else repr(value)
  gin.parse_config(f"gkd_property_test.probe.value = {main._as_gin_value(text)}")  # pylint: disable=protected-access
  assert probe() == ast.literal_eval(text)


_NAMES = st.one_of(
    st.sampled_from(["NUM_STEPS", "MODEL_DIR", "gkd.train.Method.lmbda", "gkd.train.train.seed",
                     "student/gkd.train.ModelSource.config", "tasks.data_config.name",
                     "gkd.losses.Divergence.name", "gkd.train.Method.no_such", "no.such.thing",
                     "teacher/", "a b", "%X", "@x", "gin.REQUIRED"]),
    st.text(max_size=15))
_VALUES = st.one_of(
    st.text(max_size=15),
    st.lists(st.sampled_from(["@", "%", "(", ")", "[", "]", "{", "}", "'", '"', ",", ":", "1",
                              "gin.REQUIRED", "gkd.train.Method", "teacher/", "()", "\\", "#",
                              "\n", " ", "import os", "=", "True"]), max_size=8).map("".join))


@settings(max_examples=150, deadline=None)
@given(args=st.lists(st.tuples(_NAMES, _VALUES), max_size=4))
def test_parse_gin_binds_or_raises_a_user_error(args):
  argv = [f"--gin.{name}={value}" for name, value in args]
  try:
    _, bindings = main.split_gin_flags(argv)
  except SystemExit as e:
    assert e.code == 2
    return
  gin.clear_config()
  try:
    main.parse_gin(["experiments/tiny/gkd.gin"], bindings, [])
  except UserError as e:
    assert str(e).startswith(("bad Gin config ", "gin file ")), str(e)
