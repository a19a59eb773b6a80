"""Your own data: JSONL files with one {"input": ..., "target": ...} per line.

Gin binds the paths (tasks.jsonl_task.train_path = '/data/train.jsonl', ...);
any vocabulary works. Files are read and checked when the task is built, so
a malformed line stops the run before anything is written, with a UserError
naming the file, the line and the problem. Blank lines are skipped.
"""

import functools
import hashlib
import json
import os
from typing import Optional, Sequence

import gin

from gkd.errors import UserError
from gkd.tasks import metrics as metrics_lib
from gkd.tasks import registry

METRICS = {"accuracy": metrics_lib.accuracy, "exact_match": metrics_lib.exact_match,
           "bleu": metrics_lib.bleu, "rouge": metrics_lib.rouge}


def _record(path: str, lineno: int, raw: bytes, fields: Sequence[str]):
  where = f"{path}, line {lineno}"
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"{where}: not UTF-8 text ({e.reason} at byte "
                    f"{e.start}); re-encode the file as UTF-8") from None
  if not text.strip():
    return None
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(f"{where}: bad JSON ({e.msg} at column {e.colno}); "
                    "write one JSON object per line") from None
  except RecursionError:
    raise UserError(f"{where}: bad JSON (nested too deeply)") from None
  if not isinstance(record, dict):
    raise UserError(f"{where}: expected a JSON object with fields "
                    f"{list(fields)}, got {type(record).__name__}")
  values = []
  for field in fields:
    if field not in record:
      raise UserError(f"{where}: missing field {field!r} (has "
                      f"{sorted(record)[:8]})")
    value = record[field]
    if not isinstance(value, str):
      raise UserError(f"{where}: field {field!r} is a {type(value).__name__}, "
                      "not a string")
    try:
      value.encode("utf-8")
    except UnicodeEncodeError:
      raise UserError(f"{where}: field {field!r} holds an unpaired surrogate "
                      "escape (\\ud8xx); fix the text") from None
    values.append(value)
  return tuple(values)


def read_lines(path: str, lines: Sequence[bytes], fields: Sequence[str] = (
    "input", "target")) -> list[tuple[str, ...]]:
  """Parses raw lines (bytes) of `path`; UserError on the first bad one."""
  records = []
  for lineno, raw in enumerate(lines, start=1):
    record = _record(path, lineno, raw, fields)
    if record is not None:
      records.append(record)
  return records


@functools.lru_cache(maxsize=16)
def _read_cached(path: str, stamp, fields: tuple[str, ...]):
  del stamp  # only part of the cache key: a rewritten file is read again
  with open(path, "rb") as f:
    records = read_lines(path, f.read().splitlines(), fields)
  if not records:
    raise UserError(f"{path}: no records; each line needs a JSON object "
                    f"with fields {list(fields)}")
  return tuple(records)


def read_jsonl(path: str, fields: Sequence[str] = ("input", "target")
               ) -> tuple[tuple[str, ...], ...]:
  """The (input, target) records of a JSONL file."""
  if os.path.isdir(path):
    raise UserError(f"JSONL file {path!r} is a directory, not a file; give the "
                    ".jsonl file in it")
  if not os.path.isfile(path):
    raise UserError(f"JSONL file {path!r} does not exist; fix the path bound "
                    "to tasks.jsonl_task")
  stat = os.stat(path)
  try:
    return _read_cached(path, (stat.st_mtime_ns, stat.st_size), tuple(fields))
  except OSError as e:
    raise UserError(f"cannot read JSONL file {path!r} ({e.strerror}); fix its "
                    "permissions or the path bound to tasks.jsonl_task") from None


@registry.register_builder("jsonl")
@gin.configurable(module="tasks")
def jsonl_task(train_path: Optional[str] = None,
               validation_path: Optional[str] = None,
               test_path: Optional[str] = None, *, input_field: str = "input",
               target_field: str = "target",
               metric_names: Sequence[str] = ("rouge",),
               keep_input_end: bool = False,
               route_field: Optional[str] = None) -> registry.TaskSpec:
  """A task from JSONL files; metric_names among 'accuracy', 'exact_match', 'bleu', 'rouge'.

  route_field: a string field naming the teacher that scores each example
  when several teachers are routed (e.g. "teacher_id"; gkd/train/teachers.py).
  """
  paths = {"train": train_path, "validation": validation_path,
           "test": test_path}
  paths = {split: p for split, p in paths.items() if p}
  if not paths:
    raise UserError("the jsonl task needs at least one file; bind "
                    "tasks.jsonl_task.train_path / validation_path")
  unknown = set(metric_names) - set(METRICS)
  if unknown:
    raise UserError(f"unknown metrics {sorted(unknown)}; use {sorted(METRICS)}")
  fields = (input_field, target_field) + ((route_field,) if route_field else ())
  splits = {s: functools.partial(read_jsonl, p, fields)
            for s, p in paths.items()}
  # Read (and check) every file now, before anything is written.
  content = {s: hashlib.sha1(repr(read()).encode()).hexdigest()
             for s, read in splits.items()}
  return registry.TaskSpec(
      source=registry.text_source(splits),
      metric_fns=[METRICS[m] for m in metric_names],
      config=dict(content=content, fields=fields), location=paths,
      keep_input_end=keep_input_end)
