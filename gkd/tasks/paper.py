"""The paper's tasks over TFDS: XSum, WMT14 en->de, GSM8K (0- and few-shot).

TFDS never touches the network here: the builder reads a local `data_dir`
(Gin `data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets) with
try_gcs=False and no download; a dataset missing there is a UserError
saying how to prepare it (`tfds build <name> --data_dir <dir>` elsewhere).
"""

import os
import re
from typing import Mapping, Optional

import gin
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from gkd.errors import UserError
from gkd.tasks import metrics as metrics_lib
from gkd.tasks import registry


def _data_dir(data_dir: Optional[str]) -> str:
  return os.path.expanduser(data_dir or os.environ.get(
      "TFDS_DATA_DIR", "~/tensorflow_datasets"))


def tfds_source(name: str, data_dir: Optional[str],
                splits: Mapping[str, str]) -> seqio.DataSource:
  """A seqio source reading TFDS `name` from a local directory only.

  splits maps our split names to TFDS split strings ("train[:1000]" works).
  """
  data_dir = _data_dir(data_dir)

  def builder():
    return tfds.builder(name, data_dir=data_dir, try_gcs=False)

  def dataset_fn(split: str, shuffle_files: bool, seed=None):
    del seed
    try:
      return builder().as_dataset(split=splits[split],
                                  shuffle_files=shuffle_files)
    except (AssertionError, FileNotFoundError, tfds.core.registered
            .DatasetNotFoundError) as e:
      raise UserError(
          f"TFDS dataset {name!r} is not prepared in {data_dir} ({e}); run "
          f"`tfds build {name} --data_dir {data_dir}` on a machine with "
          "internet and copy the directory here, or set the task's "
          "data_dir") from None

  sizes = {}
  try:
    info_splits = builder().info.splits
    for ours, theirs in splits.items():
      sizes[ours] = info_splits[theirs].num_examples
  except Exception:  # pylint: disable=broad-except
    sizes = None  # unknown sizes: the iterator then reads splits in memory
  return seqio.FunctionDataSource(dataset_fn, splits=tuple(splits),
                                  num_input_examples=sizes or None)


def _rename(prefix: str, input_key: str, target_key: str):
  """A preprocessor mapping TFDS features to "inputs"/"targets" strings."""

  @seqio.map_over_dataset
  def fn(ex):
    return {"inputs": tf.strings.join([prefix, ex[input_key]]),
            "targets": ex[target_key]}

  return fn


@registry.register_builder("xsum")
@gin.configurable(module="tasks")
def xsum(data_dir: Optional[str] = None, prefix: str = "summarize: ",
         splits: Mapping[str, str] = (("train", "train"),
                                      ("validation", "validation"),
                                      ("test", "test"))) -> registry.TaskSpec:
  """XSum document -> one-sentence summary; ROUGE-1/2/L."""
  splits = dict(splits)
  return registry.TaskSpec(
      source=tfds_source("xsum", data_dir, splits),
      preprocessors=[_rename(prefix, "document", "summary")],
      metric_fns=[metrics_lib.rouge],
      config=dict(tfds="xsum", prefix=prefix, splits=splits),
      location=dict(data_dir=_data_dir(data_dir)))


@registry.register_builder("wmt14_en_de")
@gin.configurable(module="tasks")
def wmt14_en_de(data_dir: Optional[str] = None,
                prefix: str = "translate English to German: ",
                splits: Mapping[str, str] = (("train", "train"),
                                             ("validation", "validation"),
                                             ("test", "test"))
                ) -> registry.TaskSpec:
  """WMT14 English -> German (newstest2013 validation, 2014 test); BLEU."""
  splits = dict(splits)
  return registry.TaskSpec(
      source=tfds_source("wmt14_translate/de-en", data_dir, splits),
      preprocessors=[_rename(prefix, "en", "de")],
      metric_fns=[metrics_lib.bleu],
      config=dict(tfds="wmt14_translate/de-en", prefix=prefix, splits=splits),
      location=dict(data_dir=_data_dir(data_dir)))


# Few-shot exemplars in the GSM8K answer format (written for this project).
GSM8K_SHOTS = (
    ("A baker makes 24 rolls and sells 15 of them. How many rolls are left?",
     "The baker has 24 - 15 = 9 rolls left.\n#### 9"),
    ("Ana buys 3 packs of pencils with 6 pencils in each pack. She gives 4 "
     "pencils to her brother. How many pencils does she have now?",
     "Ana buys 3 * 6 = 18 pencils.\nAfter giving 4 away she has 18 - 4 = 14 "
     "pencils.\n#### 14"),
    ("A train ticket costs $12 and a bus ticket costs $5 less. How much do "
     "one train ticket and two bus tickets cost together?",
     "A bus ticket costs 12 - 5 = $7.\nTwo bus tickets cost 2 * 7 = $14.\n"
     "Together they cost 12 + 14 = $26.\n#### 26"),
    ("Leo reads 20 pages a day for 5 days, then half as many pages a day for "
     "2 more days. How many pages does he read in total?",
     "In 5 days he reads 20 * 5 = 100 pages.\nHalf as many is 20 / 2 = 10 "
     "pages a day, so 10 * 2 = 20 pages.\nIn total 100 + 20 = 120 pages.\n"
     "#### 120"),
)
_CALCULATOR = r"<<[^>]*>>"  # GSM8K's calculator annotations "<<48/2=24>>"


def gsm8k_postprocess(text: str, example=None, is_target: bool = False) -> str:
  """Cuts a continuation at the next few-shot question ("\\nQ:")."""
  del example, is_target
  return re.split(r"\n\s*Q:", text, maxsplit=1)[0].strip()


@registry.register_builder("gsm8k")
@gin.configurable(module="tasks")
def gsm8k(data_dir: Optional[str] = None, num_shots: int = 0,
          question_prefix: str = "Q: ", answer_prefix: str = "\nA:",
          target_prefix: str = " ", strip_calculator: bool = True,
          splits: Mapping[str, str] = (("train", "train"), ("test", "test"))
          ) -> registry.TaskSpec:
  """GSM8K question -> chain of thought ending "#### n"; accuracy, exact match.

  num_shots > 0 prepends that many worked examples (GSM8K_SHOTS) in the
  same template; prompts keep their end when truncated. GSM8K has no
  validation split: evaluate on "test".
  """
  if not 0 <= num_shots <= len(GSM8K_SHOTS):
    raise UserError(f"gsm8k num_shots={num_shots}; use 0..{len(GSM8K_SHOTS)}")
  splits = dict(splits)
  shots = "".join(f"{question_prefix}{q}{answer_prefix}{target_prefix}{a}\n\n"
                  for q, a in GSM8K_SHOTS[:num_shots])

  @seqio.map_over_dataset
  def prompt(ex):
    answer = ex["answer"]
    if strip_calculator:
      answer = tf.strings.regex_replace(answer, _CALCULATOR, "")
    return {"inputs": tf.strings.join(
                [shots, question_prefix, ex["question"], answer_prefix]),
            "targets": tf.strings.join([target_prefix, answer])}

  return registry.TaskSpec(
      source=tfds_source("gsm8k", data_dir, splits),
      preprocessors=[prompt], metric_fns=[metrics_lib.accuracy, metrics_lib.exact_match],
      postprocess_fn=gsm8k_postprocess, keep_input_end=True,
      location=dict(data_dir=_data_dir(data_dir)),
      config=dict(tfds="gsm8k", num_shots=num_shots, question_prefix=question_prefix,
                  answer_prefix=answer_prefix, target_prefix=target_prefix,
                  strip_calculator=strip_calculator, splits=splits))


@registry.register_builder("gsm8k_fewshot")
def gsm8k_fewshot(**kwargs) -> registry.TaskSpec:
  """GSM8K with a 4-shot prompt (the other gsm8k settings still apply)."""
  return gsm8k(**{"num_shots": len(GSM8K_SHOTS), **kwargs})
