"""The built-in demo (README's first command), shortened, end to end."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_shortened_demo_writes_the_table_and_the_plot(tmp_path):
  out = tmp_path / "demo"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  args = [sys.executable, "-m", "gkd.demo", f"--out={out}", "--seeds=0", "--teacher_steps=3",
          "--student_steps=3", "--distill_steps=2", "--eval_examples=8"]
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = (out / "results.md").read_text().splitlines()
  assert table[0] == "| method | accuracy (%) | runs |"
  rows = [line.split("|")[1].strip() for line in table[2:]]
  assert rows == ["teacher", "supervised fine-tuning", "supervised KD (λ=0, FKL)",
                  "on-policy GKD (λ=1, RKL)", "on-policy GKD (λ=1, JSD 0.9)"]
  assert "| teacher |" in proc.stdout
  csv = (out / "results.csv").read_text().splitlines()
  assert csv[0] == "method,seed,accuracy" and len(csv) == 2 + 4
  assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  for method in ("sft", "supervised_kd", "gkd_reverse_kl", "gkd_jsd_0_9"):
    assert (out / f"{method}_seed0" / "results.json").exists()
  # Re-running skips the finished runs and prints the same table.
  again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and (out / "results.md").read_text().splitlines() == table
