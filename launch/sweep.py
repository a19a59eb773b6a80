r"""Expands a grid of Gin settings into `python -m gkd.main` runs; runs, submits or prints them.

    python launch/sweep.py --root=/runs/xsum_small \
      --gin_file=experiments/xsum/t5_small.gin --gin_file=methods/gkd_jsd_0_5.gin \
      --grid "LMBDA=0,0.5,1" --grid "BETA=0.1,0.5,0.9" --grid "SEED=0,1,2" \
      --gin.STUDENT_INIT=/ckpt/small_sft --gin.TEACHER_DIR=/ckpt/xl_sft \
      [--launcher=local|tpu_vm|slurm] [--parallel=4] [--dry_run]

A grid axis is `NAME=v1,v2,...`: NAME is a Gin macro (LMBDA, BETA, SEED, ...) or
any binding (gkd.losses.Divergence.name, gkd.train.EvalConfig.temperature); the
special NAME `gin_file` adds one more Gin file per value (e.g. a method axis:
`--grid gin_file=methods/sft.gin,methods/gkd_reverse_kl.gin`). Commas inside
brackets or quotes do not split. Every point of the product is one run, in
`<root>/<name>` with a name made of the grid values (`lmbda_0.5-beta_0.1-seed_0`).
`--gin.NAME=VALUE` arguments apply to every run.

Launchers:
  local   runs here, one after another, or `--parallel` N at once (logs in
          <root>/logs/<name>.log);
  tpu_vm  one run at a time on every worker of a TPU VM pod:
          gcloud compute tpus tpu-vm ssh NAME --zone Z --worker=all --command=...
          (<root> must be a directory every worker sees, e.g. a gcsfuse mount);
  slurm   one `sbatch launch/slurm.sbatch` job per run (multi-node GPU; srun
          passes --coordinator_address/--num_processes/--process_id).
`--dry_run` prints the exact commands instead. Re-running the same sweep skips
runs whose results.json exists and resumes interrupted ones from their last
checkpoint (gkd.main does that for a model directory it finds).
"""

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_FILE = "gin_file"


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  model_dir: str
  gin_files: tuple[str, ...]
  bindings: tuple[tuple[str, str], ...]  # (NAME, VALUE) as given; gkd.main quotes strings

  def gkd_args(self, mode: str) -> list[str]:
    """gkd.main's arguments for this run (after `python -m gkd.main`)."""
    return ([f"--gin_file={f}" for f in self.gin_files] +
            [f"--gin.MODEL_DIR={self.model_dir}"] +
            [f"--gin.{k}={v}" for k, v in self.bindings] + [f"--mode={mode}"])

  @property
  def finished(self) -> bool:
    return os.path.exists(os.path.join(self.model_dir, "results.json"))


def split_values(text: str) -> list[str]:
  """Splits at commas that are not inside brackets, braces, parentheses or quotes."""
  values, depth, quote, current = [], 0, None, ""
  for ch in text:
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      values.append(current.strip())
      current = ""
      continue
    current += ch
  values.append(current.strip())
  return values


def parse_axis(spec: str) -> tuple[str, list[str]]:
  """'LMBDA=0,0.5,1' -> ('LMBDA', ['0', '0.5', '1'])."""
  name, sep, rest = spec.partition("=")
  values = split_values(rest) if sep else []
  if not name.strip() or not values or any(not v for v in values):
    raise ValueError(f"--grid {spec!r} must look like NAME=v1,v2,... (no empty values)")
  return name.strip(), values


def _short(name: str, value: str) -> str:
  """The part of a run name for one grid value."""
  clean = lambda s: re.sub(r"[^A-Za-z0-9.+]+", "_", s).strip("_")
  if name == GIN_FILE:
    return clean(os.path.splitext(os.path.basename(value))[0])
  key = ".".join(name.split("/")[-1].split(".")[-2:]).lower()
  return f"{clean(key)}_{clean(value)}"


def expand(root: str, gin_files: Sequence[str], grid: Sequence[tuple[str, list[str]]],
           fixed: Sequence[tuple[str, str]]) -> list[Run]:
  """One Run per point of the grid's product, in order (the last axis varies fastest)."""
  names = [n for n, _ in grid]
  if len(set(names)) != len(names):
    raise ValueError(f"a grid axis is given twice: {names}")
  runs = []
  for point in itertools.product(*(values for _, values in grid)):
    items = list(zip(names, point))
    name = "-".join(_short(k, v) for k, v in items) or "run"
    files = tuple(gin_files) + tuple(v for k, v in items if k == GIN_FILE)
    bindings = tuple(fixed) + tuple((k, v) for k, v in items if k != GIN_FILE)
    runs.append(Run(name, os.path.join(root, name), files, bindings))
  seen = [r.name for r in runs]
  clashes = sorted({n for n in seen if seen.count(n) > 1})
  if clashes:
    raise ValueError(f"grid values give the same run name twice ({clashes}); make them differ")
  return runs


def command(run: Run, args: argparse.Namespace) -> list[str]:
  """The exact command that executes (or submits) `run` with the chosen launcher."""
  python = args.python or (sys.executable if args.launcher == "local" else "python3")
  main = [python, "-m", "gkd.main", *run.gkd_args(args.mode)]
  if args.launcher == "local":
    return main
  if args.launcher == "tpu_vm":
    if not (args.tpu and args.zone):
      raise ValueError("--launcher=tpu_vm needs --tpu=NAME and --zone=ZONE")
    results = shlex.quote(os.path.join(run.model_dir, "results.json"))
    remote = f"cd {args.remote_dir} && (test -f {results} || {shlex.join(main)})"
    project = [f"--project={args.project}"] if args.project else []
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, f"--zone={args.zone}",
            *project, "--worker=all", f"--command={remote}"]
  log = os.path.join(args.root, "logs", f"{run.name}-%j.out")
  return ["sbatch", f"--job-name={run.name}", f"--nodes={args.nodes}", f"--output={log}",
          *args.sbatch_arg, "launch/slurm.sbatch", *run.gkd_args(args.mode)]


def _execute(run: Run, cmd: list[str], log_path: Optional[str]) -> int:
  if log_path is None:
    return subprocess.call(cmd, cwd=REPO)
  with open(log_path, "a") as log:
    return subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def launch(runs: list[Run], args: argparse.Namespace) -> int:
  """Runs / submits the unfinished runs; returns the number that failed."""
  todo = [r for r in runs if not r.finished]
  for r in runs:
    if r.finished:
      print(f"# done: {r.name}", flush=True)
  if args.dry_run:
    for r in todo:
      print(shlex.join(command(r, args)), flush=True)
    return 0
  os.makedirs(os.path.join(args.root, "logs"), exist_ok=True)
  with open(os.path.join(args.root, "sweep.json"), "w") as f:
    json.dump([dict(name=r.name, model_dir=r.model_dir, gin_files=r.gin_files,
                    bindings=dict(r.bindings)) for r in runs], f, indent=2)
  parallel = args.parallel if args.launcher == "local" else 1
  log = lambda r: (os.path.join(args.root, "logs", f"{r.name}.log")
                   if args.launcher == "local" and parallel > 1 else None)
  with concurrent.futures.ThreadPoolExecutor(max(parallel, 1)) as pool:
    codes = dict(zip(todo, pool.map(lambda r: _execute(r, command(r, args), log(r)), todo)))
  failed = 0
  for r, code in codes.items():
    what = {0: "ok", 143: "stopped (preempted): re-run to resume"}.get(code, f"failed ({code})")
    print(f"{r.name}: {what}", flush=True)
    failed += code != 0
  return failed


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                              epilog="Other arguments --gin.NAME=VALUE apply to every run.")
  p.add_argument("--root", required=True, help="directory of the sweep's model directories")
  p.add_argument("--gin_file", action="append", default=[], help="Gin files of every run")
  p.add_argument("--grid", action="append", default=[], help="an axis: NAME=v1,v2,...")
  p.add_argument("--mode", default="train_and_eval", choices=["train", "eval", "train_and_eval"])
  p.add_argument("--launcher", default="local", choices=["local", "tpu_vm", "slurm"])
  p.add_argument("--parallel", type=int, default=1, help="local: runs at once")
  p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  p.add_argument("--python", default=None,
                 help="interpreter (default: this one locally, python3 remotely)")
  p.add_argument("--tpu", help="tpu_vm: the TPU VM (pod) name")
  p.add_argument("--zone", help="tpu_vm: its zone")
  p.add_argument("--project", help="tpu_vm: its project (default: gcloud's)")
  p.add_argument("--remote_dir", default="~/gkd", help="tpu_vm: the repository on the workers")
  p.add_argument("--nodes", type=int, default=1, help="slurm: nodes per run")
  p.add_argument("--sbatch_arg", action="append", default=[],
                 help="slurm: extra sbatch option, e.g. --sbatch_arg=--partition=gpu")
  args, rest = p.parse_known_args(argv)
  bad = [a for a in rest if not (a.startswith("--gin.") and "=" in a)]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)} (bindings look like --gin.NAME=VALUE)")
  args.fixed = [tuple(a[len("--gin."):].split("=", 1)) for a in rest]
  if not args.gin_file and not any(a.startswith(f"{GIN_FILE}=") for a in args.grid):
    p.error("give the experiment with --gin_file (and the method, or a gin_file grid axis)")
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    grid = [parse_axis(a) for a in args.grid]
    runs = expand(os.path.abspath(args.root), args.gin_file, grid, args.fixed)
  except ValueError as e:
    print(f"sweep: error: {e}", file=sys.stderr)
    return 2
  args.root = os.path.abspath(args.root)
  print(f"# {len(runs)} runs in {args.root}", flush=True)
  return 1 if launch(runs, args) else 0


if __name__ == "__main__":
  sys.exit(main())
