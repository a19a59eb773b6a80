"""launch/sweep.py (dry runs, skipping, one real local run) and launch/collect.py (tables, PNGs)."""

import csv
import io
import json
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def launch(script, *args, cwd=ROOT, timeout=60):
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=timeout)


def commands(proc):
  assert proc.returncode == 0, proc.stderr
  return [line for line in proc.stdout.splitlines() if not line.startswith("#")]


BASE = ["--gin_file=experiments/xsum/t5_small.gin", "--gin_file=methods/gkd_jsd_0_5.gin",
        "--grid", "LMBDA=0,1", "--grid", "BETA=0.1,0.9", "--gin.TEACHER_DIR=/ckpt/xl",
        "--python=python3", "--dry_run"]


def expected(root, lmbda, beta, *, launcher_args=(), quote=False):
  name = f"lmbda_{lmbda}-beta_{beta}"
  args = ["--gin_file=experiments/xsum/t5_small.gin", "--gin_file=methods/gkd_jsd_0_5.gin",
          f"--gin.MODEL_DIR={root}/{name}", "--gin.TEACHER_DIR=/ckpt/xl", f"--gin.LMBDA={lmbda}",
          f"--gin.BETA={beta}", "--mode=train_and_eval"]
  return name, args


def test_local_dry_run_prints_every_grid_point(tmp_path):
  root = str(tmp_path)
  got = commands(launch("sweep.py", f"--root={root}", *BASE))
  want = []
  for lmbda in ("0", "1"):
    for beta in ("0.1", "0.9"):
      _, args = expected(root, lmbda, beta)
      want.append(" ".join(["python3", "-m", "gkd.main", *args]))
  assert got == want
  assert not os.listdir(root)  # a dry run writes nothing


def test_rerun_skips_finished_runs(tmp_path):
  root = str(tmp_path)
  os.makedirs(f"{root}/lmbda_1-beta_0.1")
  with open(f"{root}/lmbda_1-beta_0.1/results.json", "w") as f:
    json.dump({}, f)
  os.makedirs(f"{root}/lmbda_0-beta_0.9/checkpoints/4")  # interrupted: resumed, not skipped
  proc = launch("sweep.py", f"--root={root}", *BASE)
  assert "# done: lmbda_1-beta_0.1" in proc.stdout
  got = commands(proc)
  assert len(got) == 3 and not any("lmbda_1-beta_0.1" in c for c in got)
  assert any("MODEL_DIR=" + root + "/lmbda_0-beta_0.9 " in c for c in got)


def test_tpu_vm_dry_run(tmp_path):
  root = str(tmp_path)
  got = commands(launch("sweep.py", f"--root={root}", *BASE, "--launcher=tpu_vm",
                        "--tpu=pod-v4-64", "--zone=us-central2-b", "--project=proj"))
  name, args = expected(root, "0", "0.1")
  remote = (f"cd ~/gkd && (test -f {root}/{name}/results.json || "
            f"python3 -m gkd.main {' '.join(args)})")
  assert got[0] == ("gcloud compute tpus tpu-vm ssh pod-v4-64 --zone=us-central2-b "
                    f"--project=proj --worker=all '--command={remote}'")
  assert len(got) == 4


def test_slurm_dry_run(tmp_path):
  root = str(tmp_path)
  got = commands(launch("sweep.py", f"--root={root}", *BASE, "--launcher=slurm", "--nodes=2",
                        "--sbatch_arg=--partition=gpu"))
  name, args = expected(root, "1", "0.9")
  assert got[-1] == " ".join(["sbatch", f"--job-name={name}", "--nodes=2",
                              f"--output={root}/logs/{name}-%j.out", "--partition=gpu",
                              "launch/slurm.sbatch", *args])
  script = open(os.path.join(ROOT, "launch", "slurm.sbatch")).read()
  for flag in ("--coordinator_address=", "--num_processes=", "--process_id=", "srun"):
    assert flag in script


def test_gin_file_axis_and_quoted_values(tmp_path):
  root = str(tmp_path)
  got = commands(launch(
      "sweep.py", f"--root={root}", "--gin_file=experiments/tiny/gkd.gin", "--python=py",
      "--grid", "gin_file=methods/sft.gin,methods/gkd_reverse_kl.gin",
      "--grid", "gkd.losses.Divergence.params={'beta': 0.1, 'x': 1},{'beta': 0.9}", "--dry_run"))
  assert len(got) == 4
  assert got[0].startswith(f"py -m gkd.main --gin_file=experiments/tiny/gkd.gin "
                           f"--gin_file=methods/sft.gin --gin.MODEL_DIR={root}/sft-divergence."
                           f"params_beta_0.1_x_1 ")
  assert got[0].endswith("'--gin.gkd.losses.Divergence.params={'\"'\"'beta'\"'\"': 0.1, "
                         "'\"'\"'x'\"'\"': 1}' --mode=train_and_eval")


@pytest.mark.parametrize("args,message", [
    (["--grid", "LMBDA="], "NAME=v1,v2"),
    (["--grid", "LMBDA=0", "--grid", "LMBDA=1"], "twice"),
    (["--grid", "x.Y.z=a b,a_b"], "same run name"),
])
def test_bad_grids_fail_with_one_line(tmp_path, args, message):
  proc = launch("sweep.py", f"--root={tmp_path}", "--gin_file=a.gin", *args, "--dry_run")
  assert proc.returncode == 2 and message in proc.stderr


def test_unknown_argument_is_rejected(tmp_path):
  proc = launch("sweep.py", f"--root={tmp_path}", "--gin_file=a.gin", "--lmbda=1")
  assert proc.returncode == 2 and "--lmbda=1" in proc.stderr


@pytest.mark.slow
def test_local_sweep_runs_then_skips(tmp_path):
  root = str(tmp_path)
  args = [f"--root={root}", "--gin_file=experiments/tiny/gkd.gin", "--grid", "LMBDA=1",
          "--gin.NUM_STEPS=2", "--gin.gkd.train.EvalConfig.max_examples=8"]
  proc = launch("sweep.py", *args, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  with open(f"{root}/lmbda_1/results.json") as f:
    results = json.load(f)
  assert results["config"]["method"]["lmbda"] == 1.0 and results["train"]["steps"] == 2
  assert json.load(open(f"{root}/sweep.json"))[0]["bindings"]["LMBDA"] == "1"
  again = launch("sweep.py", *args, "--dry_run")
  assert "# done: lmbda_1" in again.stdout and not commands(again)
  table = launch("collect.py", f"--root={root}")
  assert table.returncode == 0 and "| gkd | jsd(0.5) | 1 | 1 | 1 |" in table.stdout


# ---------------------------------------------------------------- collect.py

def fake_results(root, name, *, objective="gkd", divergence="jsd", params=None, lmbda=1.0,
                 seq_kd=False, temperature=1.0, seed=0, metrics, teacher=None, embed_dim=512):
  config = dict(
      task="xsum", teacher="checkpoint:/ckpt/xl", seed=seed,
      student=dict(architecture="t5", embed_dim=embed_dim, num_decoder_layers=8),
      method=dict(objective=objective, lmbda=lmbda, seq_kd=seq_kd,
                  divergence=dict(name=divergence, params=params or {}),
                  sampler=dict(temperature=temperature)))
  results = dict(mode="train_and_eval", config=config, eval=metrics)
  if teacher:
    results["teacher_eval"] = teacher
  os.makedirs(os.path.join(root, name))
  with open(os.path.join(root, name, "results.json"), "w") as f:
    json.dump(results, f)


@pytest.fixture
def sweep(tmp_path):
  root = str(tmp_path / "sweep")
  teacher = dict(rouge2=22.0, rouge1=45.0)
  for seed, (a, b, c, d) in enumerate([(10.0, 12.0, 14.0, 15.0), (11.0, 13.0, 16.0, 17.0)]):
    fake_results(root, f"sft-{seed}", objective="sft", divergence="forward_kl", lmbda=0.0,
                 seed=seed, metrics=dict(rouge2=a, rouge1=30.0))
    fake_results(root, f"kd-{seed}", divergence="forward_kl", lmbda=0.0, seed=seed,
                 metrics=dict(rouge2=b, rouge1=31.0), teacher=teacher)
    fake_results(root, f"seqkd-{seed}", divergence="forward_kl", lmbda=0.0, seq_kd=True,
                 seed=seed, metrics=dict(rouge2=b - 1, rouge1=31.0))
    for lmbda, bonus in ((0.5, 0.0), (1.0, 1.0)):
      fake_results(root, f"jsd-{lmbda}-{seed}", params={"beta": 0.9}, lmbda=lmbda, seed=seed,
                   metrics=dict(rouge2=c + bonus, rouge1=33.0))
      fake_results(root, f"rkl-{lmbda}-{seed}", divergence="reverse_kl", lmbda=lmbda,
                   seed=seed, metrics=dict(rouge2=d + bonus, rouge1=34.0))
    for t in (0.5, 2.0):
      fake_results(root, f"rkl-t{t}-{seed}", divergence="reverse_kl", temperature=t, seed=seed,
                   metrics=dict(rouge2=d - t, rouge1=34.0))
  os.makedirs(os.path.join(root, "unfinished"))  # no results.json: ignored
  return root


def test_collect_markdown_table(sweep):
  proc = launch("collect.py", f"--root={sweep}")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0] == ("| task | student | method | divergence | λ | temperature | seeds | "
                      "rouge2 | rouge1 |")
  sd = lambda *v: f"{statistics.stdev(v):.2f}"
  assert "| xsum | teacher | teacher |  |  |  |  | 22.00 | 45.00 |" in lines
  assert f"| xsum | t5-d512-L8 | sft |  | 0 | 1 | 2 | 10.50 ± {sd(10, 11)} | 30.00 ± 0.00 |" in lines
  assert (f"| xsum | t5-d512-L8 | supervised_kd | forward_kl | 0 | 1 | 2 | 12.50 ± {sd(12, 13)} |"
          " 31.00 ± 0.00 |") in lines
  assert "| xsum | t5-d512-L8 | seqkd | forward_kl | 0 | 1 | 2 | 11.50 ± 0.71 | 31.00 ± 0.00 |" in lines
  assert "| xsum | t5-d512-L8 | gkd | jsd(0.9) | 1 | 1 | 2 | 16.00 ± 1.41 | 33.00 ± 0.00 |" in lines
  assert "| xsum | t5-d512-L8 | gkd | reverse_kl | 1 | 2 | 2 | 14.00 ± 1.41 | 34.00 ± 0.00 |" in lines
  assert len(lines) == 2 + 1 + 3 + 2 + 2 + 2  # header, teacher, sft/kd/seqkd, jsd, rkl λ, rkl T


def test_collect_csv_and_plots(sweep, tmp_path):
  out = str(tmp_path / "out")
  proc = launch("collect.py", f"--root={sweep}", "--format=csv", f"--out={out}")
  assert proc.returncode == 0, proc.stderr
  rows = list(csv.DictReader(io.StringIO(proc.stdout)))
  assert open(os.path.join(out, "results.csv")).read() == proc.stdout
  rkl = [r for r in rows if r["divergence"] == "reverse_kl" and r["lmbda"] == "0.5"]
  assert len(rkl) == 1 and rkl[0]["seeds"] == "0 1"
  assert float(rkl[0]["rouge2_mean"]) == 16.0
  assert float(rkl[0]["rouge2_std"]) == pytest.approx(statistics.stdev([15.0, 17.0]), rel=1e-5)
  for name in ("metric_vs_lambda.png", "quality_vs_temperature.png"):
    path = os.path.join(out, name)
    with open(path, "rb") as f:
      assert f.read(8) == PNG_MAGIC
    import matplotlib.image  # pylint: disable=g-import-not-at-top
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0.01


def test_collect_errors(sweep, tmp_path):
  proc = launch("collect.py", f"--root={sweep}", "--metric=bleu")
  assert proc.returncode == 2 and "rouge2" in proc.stderr
  proc = launch("collect.py", f"--root={tmp_path / 'empty'}")
  assert proc.returncode == 2 and "no results.json" in proc.stderr
