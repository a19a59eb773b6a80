"""The benchmark scripts: the idle-machine guard, and each script end to end at the tiniest
sizes (on this shared machine with --allow_load, so their rows are marked INVALID when loaded)."""

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
TINY = ["--shape", "tiny", "--vocab", "256", "--batch", "2", "--prompt_len", "4",
        "--new_tokens", "4", "--reps", "1"]
SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(BENCH, "*.py"))
                 if not p.endswith("loadguard.py"))


def _env():
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as run


def _with_fake_load(load, code):
  """Runs `code` in a fresh Python whose os.getloadavg() reports `load`, bench/ on the path."""
  prelude = (f"import os, sys; os.getloadavg = lambda: ({load}, {load}, {load}); "
             f"sys.path.insert(0, {BENCH!r}); ")
  return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True,
                        env=_env(), cwd=ROOT, timeout=300)


def _guarded_table(load, *flags, busy=None):
  """loadguard.check under a fake load, then a two-row table and a text line."""
  code = ("import argparse, loadguard; p = argparse.ArgumentParser(); loadguard.add_flags(p); "
          f"args = p.parse_args({list(flags)!r}); ")
  if busy is not None:  # fake /proc/stat: other processes busy `busy` CPU-seconds meanwhile
    code += f"it = iter([0.0, {busy}]); loadguard.busy_cpu_seconds = lambda: next(it); "
  code += ("loadguard.check(args); print('| a | b |'); print('|---|---|'); print('| 1 | 2 |'); "
           "print('| 3 | 4 |'); print('ratio 1.5x')")
  return _with_fake_load(load, code)


def test_guard_refuses_a_loaded_machine_in_one_line():
  nproc = os.cpu_count()
  proc = _guarded_table(nproc * 2.0)
  assert proc.returncode == 75, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, lines
  assert f"load average {nproc * 2.0:.2f} on {nproc} CPUs" in lines[0] and "--allow_load" in lines[0]
  assert "| a |" not in proc.stdout and f"nproc {nproc}" in proc.stdout  # nothing measured


def test_guard_marks_every_row_under_allow_load():
  proc = _guarded_table(7.25, "--allow_load", "--max_load=1")
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout.splitlines()
  assert out[0].startswith("machine at start:") and "load average 7.25" in out[0]
  assert out[1:6] == ["| a | b | validity |", "|---|---|---|", "| 1 | 2 | INVALID (load 7.25) |",
                      "| 3 | 4 | INVALID (load 7.25) |", "INVALID (load 7.25): ratio 1.5x"]
  assert out[6].startswith("machine at end:") and len(out) == 7


def test_guard_passes_an_idle_machine_and_flags_load_that_came_during_the_run():
  # Idle at the start and meanwhile (a fake /proc/stat: the test suite itself keeps CPUs busy).
  proc = _guarded_table(0.2, "--max_load=1", busy=0.0)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout.splitlines()
  assert out[1:6] == ["| a | b |", "|---|---|", "| 1 | 2 |", "| 3 | 4 |", "ratio 1.5x"]
  assert "INVALID" not in proc.stdout
  # Idle at the start, but other processes took 1e6 CPU-seconds while it ran.
  proc = _guarded_table(0.2, "--max_load=1", busy=1e6)
  assert proc.returncode == 0, proc.stderr
  last = proc.stdout.splitlines()[-1]
  assert last.startswith("INVALID: other processes kept") and "figures above" in last


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_bench_script_refuses_a_loaded_machine(script):
  proc = _with_fake_load(100.0, "import runpy; sys.argv = [{0!r}]; runpy.run_path({0!r}, "
                         "run_name='__main__')".format(os.path.join(BENCH, script)))
  assert proc.returncode == 75, (proc.stdout[-2000:], proc.stderr[-2000:])
  assert "the machine is not idle" in proc.stderr.strip().splitlines()[-1]


def _run(script, *flags):
  return _run_out(script, *flags)[0]


def _run_out(script, *flags):
  """Runs a bench script with --allow_load: (its table rows without the validity column, stdout)."""
  out = subprocess.run([sys.executable, os.path.join(BENCH, script), "--allow_load", *flags],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [l for l in out.stdout.splitlines() if l.startswith("|")]
  if "INVALID (load" in out.stdout:  # a loaded machine: every row says so in its last column
    heads = [i for i, r in enumerate(rows) if r.endswith(" validity |")]  # one per table
    assert heads[0] == 0 and all(rows[i + 1].endswith("---|---|") for i in heads)
    body = [r for i, r in enumerate(rows) if i not in heads and i - 1 not in heads]
    assert all(r.endswith(" |") and "INVALID (load" in _cells(r)[-1] for r in body)
    rows = [r[:r[:-1].rindex("|") + 1] for r in rows]  # the tables without that column
  return rows, out.stdout


def _tables(rows):
  """Splits `_run`'s rows into tables: lists of cell lists, header first, separator dropped."""
  tables = []
  for i, r in enumerate(rows):
    if set(r) <= set("|-: "):
      tables.append([_cells(rows[i - 1])])
    elif i + 1 < len(rows) and set(rows[i + 1]) <= set("|-: "):
      continue
    else:
      tables[-1].append(_cells(r))
  return tables


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
  # 512 target tokens: the logits, not the tiny weights, dominate the plain step's memory.
  rows = _run("scaling.py", "--shape", "tiny", "--vocab", "4096", "--batch", "4",
              "--prompt_len", "4", "--new_tokens", "128", "--vocabs", "1024,4096",
              "--lengths", "64", "--microbatches", "2", "--remats", "full", "--reps", "1",
              "--chunk_elements", "65536", "--blockwise", "full")
  body = [_cells(r) for r in rows[2:]]
  assert [(r[0], r[3], r[4]) for r in body] == [
      ("headline", "4096", "fused"), ("headline", "4096", "plain"),
      ("vocab", "1024", "fused"), ("vocab", "1024", "plain"),
      ("vocab", "4096", "fused"), ("vocab", "4096", "plain"),
      ("new_tokens", "4096", "fused"), ("new_tokens", "4096", "plain"),
      ("new_tokens_blockwise_full", "4096", "fused"),
      ("microbatches", "4096", "fused"), ("remat", "4096", "fused")]
  assert [r[7] for r in body] == ["dense"] * 8 + ["blockwise"] + ["dense"] * 2
  temp_ratio = {(r[0], r[3], r[4]): float(r[9]) for r in body}
  assert temp_ratio["headline", "4096", "plain"] == 1.0
  assert temp_ratio["headline", "4096", "fused"] < 0.5  # no [B, N, V] logits (measured 0.36)
  assert float(body[0][11]) > 0 and body[2][11] == "-"  # only the headline is timed


@pytest.mark.slow
def test_cross_tokenizer_table():
  rows = _run("cross_tokenizer.py", "--batch", "2", "--input_len", "8", "--target_len", "16",
              "--repeats", "1", "--vocab", "64", "--pairs", "bpe-bpe_big,sp-bpe,byte-bpe")
  assert _cells(rows[0])[:2] == ["student", "teacher"]
  body = [_cells(r) for r in rows[2:]]
  assert [(r[0], r[1]) for r in body] == [("bpe", "bpe_big"), ("sp", "bpe"), ("byte", "bpe")]
  assert all(float(c) > 0 for r in body for c in r[4:])


@pytest.mark.slow
def test_decode_tables():
  rows, stdout = _run_out("decode.py", "--batches", "2,4", "--prompt_len", "4", "--new_tokens",
                          "8", "--reps", "1", "--vocab", "64", "--hidden", "32", "--layers", "1",
                          "--early_batch", "2", "--devices", "2")
  speed, early = _tables(rows)
  assert speed[0][:4] == ["batch", "new tokens", "gkd s (1 device)", "gkd s (2 devices)"]
  assert speed[0][-2:] == ["ratio (1 device)", "ratio"]
  assert [r[:2] for r in speed[1:]] == [["2", "8"], ["4", "8"]]
  assert all(float(c.rstrip("x")) > 0 for r in speed[1:] for c in r[2:])
  assert early[0][:3] == ["batch", "EOS id", "steps run"] and len(early) == 2
  steps, n = map(int, early[1][2].split(" / "))
  assert n == 8 and 1 <= steps <= 8
  for devices in ("1 device", "2 devices"):
    assert f"greedy tokens identical to HF ({devices}): batch 2 100.0%, batch 4 100.0%" in stdout
  assert "cut at EOS: True" in stdout


@pytest.mark.slow
def test_methods_table():
  rows = _run("methods.py", "--batch", "2", "--input_len", "4", "--target_len", "4",
              "--width", "16", "--layers", "1", "--vocab", "64", "--repeats", "1")
  body = [_cells(r) for r in rows[2:]]
  assert [r[0] for r in body] == ["teachers"] * 4 + ["on-policy"] * 2 + ["cross-tokenizer"] * 2
  assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in body)
  assert "% of the step" in body[-1][4]
