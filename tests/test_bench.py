"""The benchmark scripts run end to end at the tiniest sizes and print their tables."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--shape", "tiny", "--vocab", "256", "--batch", "2", "--prompt_len", "4",
        "--new_tokens", "4", "--reps", "1"]


def _run(script, *flags):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as run
  out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *flags],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return [l for l in out.stdout.splitlines() if l.startswith("|")]


def _cells(line):
  return [c.strip() for c in line.strip("|").split("|")]


@pytest.mark.slow
def test_gkd_vs_trl_table():
  rows = _run("gkd_vs_trl.py", *TINY, "--no_memory")
  assert _cells(rows[0])[:2] == ["λ", "side"]
  body = [_cells(r) for r in rows[2:]]
  assert [(r[0], r[1]) for r in body] == [("1", "gkd"), ("1", "trl"), ("0", "gkd"), ("0", "trl")]
  # Same weights and the same dataset targets at λ=0: the two step-0 losses agree.
  loss = {r[1]: float(r[7]) for r in body if r[0] == "0"}
  assert loss["gkd"] == pytest.approx(loss["trl"], rel=1e-3)
  assert all(float(r[3]) > 0 for r in body)


@pytest.mark.slow
def test_roofline_table():
  rows = _run("roofline.py", *TINY, "--matmul", "128")
  body = [_cells(r) for r in rows[2:]]
  assert [r[0] for r in body] == ["0", "1"]
  counted, xla = float(body[0][1]), float(body[0][2])
  assert counted > 0 and xla > 0


@pytest.mark.slow
def test_scaling_table():
  rows = _run("scaling.py", *TINY, "--lengths", "", "--vocabs", "1024,4096", "--batches", "",
              "--new_tokens", "16", "--chunk", "2", "--chunk_elements", "8192")
  body = [_cells(r) for r in rows[2:]]
  assert [(r[3], r[4]) for r in body] == [(v, p) for v in ("1024", "4096")
                                          for p in ("plain", "chunked", "budget")]
  jsd = {(r[3], r[4]): float(r[7]) for r in body}
  for v in ("1024", "4096"):
    assert jsd[v, "chunked"] < jsd[v, "plain"] and jsd[v, "budget"] < jsd[v, "plain"]
  # 32 tokens. Four times the vocabulary: the 2-token chunk's memory grows; the
  # budget's chunk shrinks from 8 tokens to 2 and its memory does not.
  assert jsd["4096", "chunked"] > 2 * jsd["1024", "chunked"]
  assert jsd["4096", "budget"] < 1.3 * jsd["1024", "budget"]


@pytest.mark.slow
def test_cross_tokenizer_table():
  rows = _run("cross_tokenizer.py", "--batch", "2", "--input_len", "8", "--target_len", "16",
              "--repeats", "1", "--vocab", "64", "--pairs", "bpe-bpe_big,sp-bpe,byte-bpe")
  assert _cells(rows[0])[:2] == ["student", "teacher"]
  body = [_cells(r) for r in rows[2:]]
  assert [(r[0], r[1]) for r in body] == [("bpe", "bpe_big"), ("sp", "bpe"), ("byte", "bpe")]
  assert all(float(c) > 0 for r in body for c in r[4:])
