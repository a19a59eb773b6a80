"""Every configs/tasks/*.gin parses and names a registered task."""

import json
import pathlib

import gin
import pytest

from gkd import tasks

CONFIGS = sorted((pathlib.Path(__file__).parents[1] / "configs" / "tasks")
                 .glob("*.gin"))


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path, tmp_path):
  data = tmp_path / "d.jsonl"
  data.write_text(json.dumps({"input": "Tom has 3 apples.", "target": "3"}))
  gin.parse_config_files_and_bindings(
      [str(path)], [f"tasks.jsonl_task.train_path = '{data}'",
                    f"tasks.jsonl_task.validation_path = '{data}'",
                    "tasks.get_vocabulary.path = '/nonexistent'"])
  if path.name.startswith("vocab_"):
    return
  config = tasks.data_config()
  assert config["name"] in tasks.BUILDERS
  assert config["input_length"] > 0 and config["target_length"] > 0
  if config["name"].startswith(("offline", "jsonl")):
    task = tasks.get_task(config["name"], tasks.get_vocabulary("word"))
    batch = next(tasks.batch_iterator(
        task, config["train_split"], seed=0, batch_size=1,
        input_length=config["input_length"],
        target_length=config["target_length"]))
    assert batch["input_mask"].sum() > 1


def test_gin_selects_vocabulary_and_difficulty():
  gin.parse_config_files_and_bindings([], [
      "tasks.get_vocabulary.kind = 'byte'",
      "tasks.offline_arithmetic.max_steps = 1",
      "tasks.offline_arithmetic.num_train = 50"])
  task = tasks.get_task("offline_arithmetic")
  assert type(tasks.vocabulary_of(task)).__name__ == "ByteVocabulary"
  it = tasks.eval_examples(task, "validation", input_length=128,
                           target_length=32, batch_size=4)
  assert all(t.count("=") == 1 for t in next(it).targets)
