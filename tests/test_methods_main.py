"""The method configs through python -m gkd.main: OPD, top-k with audits, routed teachers,
a cross-tokenizer teacher; their bad inputs are one line, exit 2, nothing written."""

import json
import os
import subprocess
import sys

import pytest

from test_main import ROOT, env_with_devices

TINY = "--gin_file=experiments/tiny/gkd.gin"
ROUTED = "--gin_file=experiments/tiny/routed_teachers.gin"
CROSS = "--gin_file=experiments/tiny/cross_tokenizer.gin"
QUICK = ["--gin.NUM_STEPS=2", "--gin.gkd.train.EvalConfig.max_examples=8",
         "--gin.tasks.offline_arithmetic.num_train=64"]


def _main(model_dir, *args, mode="train"):
  return subprocess.run([sys.executable, "-m", "gkd.main", *args, f"--gin.MODEL_DIR={model_dir}",
                         f"--mode={mode}"], cwd=ROOT, env=env_with_devices(1),
                        capture_output=True, text=True, timeout=600)


def _rows(model_dir):
  with open(os.path.join(model_dir, "train", "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


RUNS = {
    "opd": [TINY, "--gin_file=methods/opd.gin", "--gin.gkd.train.Method.audit_every=1"],
    "top_k": [TINY, "--gin_file=methods/gkd_reverse_kl_top_k.gin", "--gin.TOP_K=2",
              "--gin.gkd.train.Method.audit_every=2",
              "--gin.gkd.train.Method.audit_min_kept_mass=0.99"],
    "routed": [ROUTED, "--gin.gkd.train.EvalConfig.evaluate_teacher=True"],
    "cross_tokenizer": [CROSS],
    "cross_tokenizer_opd": ["--gin_file=experiments/tiny/cross_tokenizer_opd.gin"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_method_configs_run_end_to_end(tmp_path, name):
  model_dir = str(tmp_path / name)
  proc = _main(model_dir, *RUNS[name], *QUICK, mode="train_and_eval")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(model_dir, "results.json")) as f:
    results = json.load(f)
  rows = _rows(model_dir)
  assert [r["step"] for r in rows] == [1, 2] and results["train"]["steps"] == 2
  assert all(r["finite"] == 1.0 for r in rows)
  if name == "opd":
    assert results["config"]["method"]["objective"] == "opd"
    assert all(r["audit_exact_divergence"] > 0 for r in rows)
  if name == "top_k":  # audits on step 0 only (audit_every 2), with a kept-mass warning
    assert "audit_kept_mass" in rows[0] and "audit_kept_mass" not in rows[1]
    assert rows[0]["audit_exact_divergence"] >= rows[0]["distill_loss"] - 1e-6
    assert "top-2 keeps" in proc.stderr
  if name == "routed":
    assert set(results["config"]["teacher"]) == {"1_steps", "2_steps"}
    assert {"teacher_eval_1_steps", "teacher_eval_2_steps"} <= set(results)
  if name.startswith("cross_tokenizer"):
    assert "teacher_agreement" not in rows[0]
  if name == "cross_tokenizer_opd":  # one action per span; no full-vocabulary audit exists
    assert results["config"]["method"]["objective"] == "opd"
    assert "audit_exact_divergence" not in rows[0]


BAD = [
    ([ROUTED, "--gin.gkd.train.Teachers.sources={'1_steps': @one/gkd.train.ModelSource(), "
      "'3_steps': @two/gkd.train.ModelSource()}"], "route '2_steps', which names no configured"),
    ([ROUTED, "--gin.tiny_teacher/models.DecoderConfig.vocab_size=300"],
     "teacher '1_steps' and student vocabularies differ"),
    ([TINY, "--gin.teacher/models.DecoderConfig.vocab_size=300",
      "--gin.teacher/gkd.train.ModelSource.config=@teacher/models.DecoderConfig()"],
     "or set Method.cross_tokenizer"),
    ([CROSS, "--gin.teacher/gkd.train.ModelSource.vocabulary=None"], "set both or neither"),
    ([TINY, "--gin_file=methods/opd.gin", "--gin.gkd.train.Method.lmbda=0.5"],
     "set Method.lmbda = 1.0"),
    ([CROSS, "--gin_file=methods/opd.gin"], "set CrossTokenizerLoss.name = 'reverse_kl'"),
]


@pytest.mark.parametrize("args, message", BAD, ids=["route", "vocab", "vocab1", "cross", "opd", "cross_opd"])
def test_bad_method_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, message):
  model_dir = tmp_path / "run"
  proc = _main(str(model_dir), *args)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("gkd: error:") and message in lines[0], lines
  assert not model_dir.exists()
