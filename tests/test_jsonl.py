"""Tests for gkd.tasks.jsonl: parsing, error messages, a property test over
arbitrary bytes, and a JSONL task through to model batches."""

import json

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest

from gkd import tasks
from gkd.errors import UserError
from gkd.tasks import jsonl


def _write(path, lines):
  path.write_bytes(b"\n".join(
      line if isinstance(line, bytes) else line.encode() for line in lines))
  return str(path)


def test_reads_records_and_skips_blank_lines(tmp_path):
  path = _write(tmp_path / "train.jsonl", [
      json.dumps({"input": "a b", "target": "c", "extra": 1}), "",
      "  ", json.dumps({"input": "ü", "target": ""})])
  assert jsonl.read_jsonl(path) == (("a b", "c"), ("ü", ""))


@pytest.mark.parametrize("line,message", [
    (b'{"input": "a", "target": ', "line 2: bad JSON"),
    (b'["a", "b"]', "line 2: expected a JSON object"),
    (b'{"input": "a"}', "line 2: missing field 'target'"),
    (b'{"input": 3, "target": "b"}', "line 2: field 'input' is a int"),
    (b'{"input": null, "target": "b"}', "field 'input' is a NoneType"),
    (b'{"input": "\\ud800", "target": "b"}', "unpaired surrogate"),
    (b'\xff\xfe{}', "line 2: not UTF-8"),
])
def test_malformed_line_names_file_line_and_problem(tmp_path, line, message):
  path = _write(tmp_path / "validation.jsonl",
                [b'{"input": "x", "target": "y"}', line])
  with pytest.raises(UserError, match=message) as info:
    jsonl.read_jsonl(path)
  assert "validation.jsonl" in str(info.value)


def test_missing_and_empty_files(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    jsonl.read_jsonl(str(tmp_path / "nope.jsonl"))
  with pytest.raises(UserError, match="no records"):
    jsonl.read_jsonl(_write(tmp_path / "empty.jsonl", ["", ""]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=40),
    st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(
        st.sampled_from(["input", "target", "x"]),
        st.one_of(st.text(max_size=8), st.integers(), st.none()))),
    st.sampled_from([b"[" * 5000, b'{"input": "\\udfff", "target": ""}'])),
    max_size=6))
def test_any_bytes_parse_or_raise_user_error(lines):
  try:
    records = jsonl.read_lines("f.jsonl", lines)
  except UserError as e:
    assert "f.jsonl, line " in str(e)
    return
  for record in records:
    assert len(record) == 2 and all(isinstance(v, str) for v in record)
    for v in record:
      v.encode("utf-8")


def test_jsonl_task_to_batches_and_metrics(tmp_path):
  rows = [{"input": f"Tom has {i} apples.", "target": f"#### {i}"}
          for i in range(6)]
  train = _write(tmp_path / "train.jsonl", [json.dumps(r) for r in rows])
  val = _write(tmp_path / "validation.jsonl", [json.dumps(r) for r in rows[:3]])
  vocab = tasks.get_vocabulary("word")
  task = tasks.get_task("jsonl", vocab, train_path=train, validation_path=val,
                        metric_names=("accuracy", "exact_match"))
  batch = next(tasks.batch_iterator(task, "train", input_length=12,
                                    target_length=6, batch_size=6, seed=0))
  inputs = tasks.decode(vocab, batch["input_tokens"], batch["input_mask"])
  assert sorted(inputs) == sorted(r["input"] for r in rows)
  np.testing.assert_array_equal(batch["target_mask"].sum(1), 3)  # ####, i, EOS
  evals = list(tasks.eval_examples(task, "validation", input_length=12,
                                   target_length=6, batch_size=4))
  assert evals[0].targets[:3] == ["#### 0", "#### 1", "#### 2"]
  assert tasks.compute_metrics(task, ["#### 1", "#### 2"], ["#### 1.0", "#### 3"]) == {
      "accuracy": 50.0, "exact_match": 0.0}  # 1.0 is the number 1, not the text
  with pytest.raises(UserError, match="at least one file"):
    tasks.get_task("jsonl", vocab)
  bad = _write(tmp_path / "bad.jsonl", ['{"input": "a", "target": "b"}', "{"])
  with pytest.raises(UserError, match="bad.jsonl, line 2: bad JSON"):
    tasks.get_task("jsonl", vocab, train_path=bad)


def test_moved_files_keep_the_iterator_state(tmp_path):
  line = json.dumps({"input": "Tom has 3 apples.", "target": "#### 3"})
  first = _write(tmp_path / "a.jsonl", [line, line.replace("3", "4")])
  moved = _write(tmp_path / "b.jsonl", [line, line.replace("3", "4")])
  vocab = tasks.get_vocabulary("word")
  kwargs = dict(input_length=12, target_length=6, batch_size=1, seed=0)
  it = tasks.batch_iterator(tasks.get_task("jsonl", vocab, train_path=first),
                            "train", **kwargs)
  next(it)
  task = tasks.get_task("jsonl", vocab, train_path=moved)
  resumed = tasks.batch_iterator(task, "train", **kwargs)
  resumed.restore(it.state())
  np.testing.assert_array_equal(next(resumed)["target_tokens"],
                                next(it)["target_tokens"])
  changed = _write(tmp_path / "c.jsonl", [line])
  other = tasks.batch_iterator(tasks.get_task("jsonl", vocab,
                                              train_path=changed),
                               "train", **kwargs)
  with pytest.raises(UserError, match="data"):
    other.restore(it.state())
