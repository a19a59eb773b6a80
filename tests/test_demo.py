"""The built-in demo (README's first command), shortened, end to end."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_shortened_demo_writes_the_table_and_the_plot(tmp_path):
  out = tmp_path / "demo"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  args = [sys.executable, "-m", "gkd.demo", f"--out={out}", "--seeds=0", "--teacher_steps=3",
          "--student_steps=3", "--distill_steps=2", "--eval_examples=8", "--progress_every=1"]
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = (out / "results.md").read_text().splitlines()
  assert table[:2] == ["| method | seed 0 |", "|---|---|"]
  rows = [line.split("|")[1].strip() for line in table[2:]]
  assert rows == ["teacher", "student after SFT (the starting point)",
                  "+ supervised fine-tuning", "+ supervised KD (λ=0, FKL)",
                  "+ on-policy GKD (λ=1, RKL)", "+ on-policy GKD (λ=1, JSD 0.9)"]
  # The table as printed is the file's, line for line (ready to paste).
  printed = proc.stdout.splitlines()
  at = printed.index(table[0])
  assert printed[at:at + len(table)] == table
  results = lambda run: json.loads((out / run / "results.json").read_text())["eval"]["accuracy"]
  assert table[2] == f"| teacher | {results('teacher'):.1f} |"
  assert table[3].startswith(f"| student after SFT (the starting point) | "
                             f"{results('student_sft'):.1f} |")
  # Live progress: which run started (and its log), progress lines, which finished.
  assert f"started teacher: log {out}/teacher.log" in proc.stdout
  assert re.search(r"^\[\d+:\d\d\] running: ", proc.stdout, re.M)
  assert "finished gkd_jsd_0_9_seed0 in " in proc.stdout
  csv = (out / "results.csv").read_text().splitlines()
  assert csv[:3] == ["method,seed,accuracy", f"teacher,,{results('teacher')}",
                     f"student_sft,,{results('student_sft')}"] and len(csv) == 3 + 4
  assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  for method in ("sft", "supervised_kd", "gkd_reverse_kl", "gkd_jsd_0_9"):
    assert (out / f"{method}_seed0" / "results.json").exists()
  # Re-running skips the finished runs and prints the same table.
  again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and (out / "results.md").read_text().splitlines() == table
  # The other setting's runs would differ: refused, nothing touched.
  other = subprocess.run(args + ["--setting=worked"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
  assert other.returncode != 0 and "--setting=half_bare" in other.stderr
  assert (out / "results.md").read_text().splitlines() == table


def test_table_with_several_seeds_is_markdown_with_mean_and_spread():
  from gkd import demo  # pylint: disable=g-import-not-at-top
  rows = {"sft": [50.0, 60.0], "supervised_kd": [80.0, 81.0], "gkd_reverse_kl": [90.0, 94.0],
          "gkd_jsd_0_9": [95.0, 95.0]}
  lines = demo.table(rows, 98.64, 10.8, [0, 1]).splitlines()
  assert lines[:4] == ["| method | seed 0 | seed 1 | mean ± sd |", "|---|---|---|---|",
                       "| teacher | 98.6 |  |  |",
                       "| student after SFT (the starting point) | 10.8 |  |  |"]
  # mean and sample standard deviation: (50, 60) -> 55.0 ± 7.1
  assert lines[4] == "| + supervised fine-tuning | 50.0 | 60.0 | 55.0 ± 7.1 |"
  assert lines[7] == "| + on-policy GKD (λ=1, JSD 0.9) | 95.0 | 95.0 | 95.0 ± 0.0 |"
  assert all(line.count("|") == 5 for line in lines)


def _training_data(files: list[str]) -> tuple[dict, list[str]]:
  """The arithmetic task's config and training targets as `files` configure them."""
  import gin  # pylint: disable=g-import-not-at-top
  from gkd import main  # pylint: disable=g-import-not-at-top
  from gkd.tasks import offline, registry  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  main.parse_gin(files, ["MODEL_DIR = '/nonexistent/run'", "TEACHER_DIR = '/t'",
                         "STUDENT_INIT = '/s'"], [])
  config = dict(registry.offline_arithmetic().config)
  targets = [y for _, y in offline.generate(split="train", **config)]
  return config, targets


@pytest.mark.parametrize("setting", ["worked", "half_bare"])
def test_settings_give_the_teacher_worked_solutions_and_the_student_its_data(setting):
  import gin  # pylint: disable=g-import-not-at-top
  from gkd import demo  # pylint: disable=g-import-not-at-top
  files = demo.SETTINGS[setting]
  teacher, teacher_targets = _training_data(["experiments/demo/teacher.gin"] + files.teacher)
  student, student_targets = _training_data(["experiments/demo/student_sft.gin"] + files.student)
  distill, distill_targets = _training_data(
      ["experiments/demo/distill.gin", "methods/gkd_jsd_0_9.gin"] + files.distill)
  learning_rate = gin.query_parameter("%LEARNING_RATE")
  distill_steps = gin.query_parameter("%NUM_STEPS")
  gin.clear_config()
  bare = lambda targets: sum(t.startswith("####") for t in targets) / len(targets)
  assert bare(teacher_targets) == 0.0  # the teacher always learns from worked solutions
  assert distill == student and distill_targets == student_targets
  same_problems = {k: v for k, v in student.items() if not k.startswith("label_noise")}
  assert same_problems == {k: v for k, v in teacher.items() if not k.startswith("label_noise")}
  if setting == "worked":
    assert bare(student_targets) == 0.0 and learning_rate == 3e-4 and distill_steps == 200
  else:
    assert 0.45 < bare(student_targets) < 0.55 and learning_rate == 1e-3
    assert distill_steps == 1000
    assert (student["min_steps"], student["max_steps"]) == (2, 3)
