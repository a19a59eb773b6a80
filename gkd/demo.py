r"""The built-in offline demo: teacher -> SFT student -> SFT / supervised KD / on-policy GKD.

    python -m gkd.demo --out=/tmp/gkd_demo

On the offline arithmetic word problems (no download), on CPU:
  1. train the teacher (~0.9M parameters) by supervised fine-tuning on worked
     solutions ("8 + 8 = 16. 16 - 9 = 7. 7 + 7 = 14. #### 14");
  2. train the student (~0.3M) by supervised fine-tuning on the distillation
     set (the GKD paper's starting point for every distillation run);
  3. from that student, for each seed, continue with
       sft            more supervised fine-tuning (same number of steps),
       supervised_kd  forward KL on the dataset's outputs (λ = 0),
       gkd_reverse_kl on-policy GKD with reverse KL (λ = 1),
       gkd_jsd_0_9    on-policy GKD with JSD(β = 0.9) (λ = 1);
  4. print the table (accuracy on held-out problems), write results.md,
     results.csv and demo.png under --out.

--setting picks the data (configs/experiments/demo/): `half_bare` (the default)
has problems of 2-3 steps and a distillation set whose targets are bare final
answers ("#### 14") for half of the problems, as in many real sets, while the
teacher learnt from worked solutions throughout; distillation runs 1000 steps
at lr 1e-3. `worked` has 1-2 step problems and worked solutions everywhere (200
steps at 3e-4, 3 seeds). Every run is an ordinary `python -m gkd.main`
experiment in a subprocess (--workers at once); re-running the demo skips
finished runs and resumes interrupted ones.
"""

import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
from typing import NamedTuple, Optional

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "/tmp/gkd_demo", "Directory for the runs, table and plot.")
flags.DEFINE_enum("setting", "half_bare", ["half_bare", "worked"],
                  "half_bare: 2-3 step problems, half of the student's training targets bare "
                  "answers (the teacher's all worked); worked: 1-2 step problems, every "
                  "target a worked solution.")
flags.DEFINE_list("seeds", None, "Seeds of the distillation runs (default: the setting's).")
flags.DEFINE_integer("teacher_steps", 600, "Teacher training steps.")
flags.DEFINE_integer("student_steps", 300, "Student supervised fine-tuning steps.")
flags.DEFINE_integer("distill_steps", None, "Steps of each method from the SFT student "
                     "(default: the setting's NUM_STEPS, 200 or 1000).")
flags.DEFINE_integer("workers", 2, "Runs at once (each a `gkd.main` subprocess).")
flags.DEFINE_integer("eval_examples", 500, "Held-out problems per evaluation (500: the whole "
                     "validation split).")

class Setting(NamedTuple):
  """Extra Gin files of each step (after the step's own), and the default seeds."""
  teacher: list[str]
  student: list[str]
  distill: list[str]
  seeds: list[int]


SETTINGS = {
    "worked": Setting([], [], [], [0, 1, 2]),
    "half_bare": Setting(["experiments/demo/half_bare/task.gin"],
                         ["experiments/demo/half_bare/student_data.gin"],
                         ["experiments/demo/half_bare/distill.gin"], [0]),
}
METHODS = ("sft", "supervised_kd", "gkd_reverse_kl", "gkd_jsd_0_9")
LABELS = {"sft": "supervised fine-tuning", "supervised_kd": "supervised KD (λ=0, FKL)",
          "gkd_reverse_kl": "on-policy GKD (λ=1, RKL)", "gkd_jsd_0_9": "on-policy GKD (λ=1, JSD 0.9)"}


def run_experiment(model_dir: str, files: list[str], bindings: list[str]) -> dict:
  """One `python -m gkd.main --mode=train_and_eval` run, in a subprocess that logs to
  `<model_dir>.log`; skipped if finished. Raises RuntimeError (with the log's end)
  if the run fails."""
  results_path = os.path.join(model_dir, "results.json")
  if not os.path.exists(results_path):
    args = [sys.executable, "-m", "gkd.main", "--mode=train_and_eval"]
    args += [f"--gin_file={f}" for f in files]
    args += [f"--gin_bindings={b}" for b in [f"MODEL_DIR = {model_dir!r}"] + bindings]
    os.makedirs(os.path.dirname(model_dir), exist_ok=True)
    started = time.time()
    with open(model_dir + ".log", "w") as log:
      code = subprocess.call(args, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
      with open(model_dir + ".log") as log:
        tail = log.read()[-2000:]
      raise RuntimeError(f"{model_dir} failed (exit {code}); its log ends:\n{tail}")
    print(f"{os.path.basename(model_dir)} done in {time.time() - started:.0f} s", flush=True)
  with open(results_path) as f:
    return json.load(f)


def table(rows: dict[str, list[float]], teacher: float) -> str:
  lines = ["| method | accuracy (%) | runs |", "|---|---|---|",
           f"| teacher | {teacher:.1f} | 1 |"]
  for method, values in rows.items():
    spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    lines.append(f"| {LABELS[method]} | {statistics.mean(values):.1f}{spread} | {len(values)} |")
  return "\n".join(lines)


def plot(rows: dict[str, list[float]], teacher: float, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 3.5))
  names = list(rows)
  means = [statistics.mean(rows[m]) for m in names]
  ax.bar(range(len(names)), means, color=["#999", "#69c", "#d73", "#e95"][:len(names)])
  for i, m in enumerate(names):
    ax.scatter([i] * len(rows[m]), rows[m], color="k", s=12, zorder=3)
  ax.axhline(teacher, color="k", linestyle="--", label=f"teacher {teacher:.1f}%")
  ax.set_xticks(range(len(names)), [LABELS[m].replace(" (", "\n(") for m in names], fontsize=8)
  ax.set_ylabel("held-out accuracy (%)")
  ax.set_title("Distilling the offline arithmetic task (teacher ~0.9M, student ~0.3M params)")
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def demo(out: str, seeds: list[int], teacher_steps: int, student_steps: int,
         distill_steps: Optional[int], eval_examples: int, setting: str = "half_bare",
         workers: int = 2) -> dict[str, list[float]]:
  """Runs every step (`distill_steps=None`: the setting's NUM_STEPS); returns the
  accuracies per method, in `seeds` order."""
  files = SETTINGS[setting]
  os.makedirs(out, exist_ok=True)
  marker = os.path.join(out, "setting.txt")  # finished runs are reused: never mix settings
  if os.path.exists(marker):
    with open(marker) as f:
      previous = f.read().strip()
    if previous != setting:
      raise RuntimeError(f"{out} holds the runs of --setting={previous}; pass that setting to "
                         f"resume them, or another --out for --setting={setting}")
  else:
    with open(marker, "w") as f:
      f.write(setting + "\n")
  base = [f"gkd.train.EvalConfig.max_examples = {eval_examples}"]
  steps = [] if distill_steps is None else [f"NUM_STEPS = {distill_steps}"]
  teacher_export = os.path.join(out, "teacher", "export")
  student_export = os.path.join(out, "student_sft", "export")
  distill_runs = {
      (seed, method): (os.path.join(out, f"{method}_seed{seed}"),
                       ["experiments/demo/distill.gin", f"methods/{method}.gin"] + files.distill,
                       base + steps + [f"SEED = {seed}", f"TEACHER_DIR = {teacher_export!r}",
                                       f"STUDENT_INIT = {student_export!r}"])
      for seed in seeds for method in METHODS}
  # Each run starts once what it reads exists and a worker is free (the student's
  # SFT, and continued SFT, need no teacher); the slow on-policy runs go first.
  requires = {k: {"student_sft"} | ({"teacher"} if k[1] != "sft" else set())
              for k in sorted(distill_runs, key=lambda k: "gkd" not in k[1])}
  first = {"teacher": (os.path.join(out, "teacher"),
                       ["experiments/demo/teacher.gin"] + files.teacher,
                       base + [f"NUM_STEPS = {teacher_steps}"]),
           "student_sft": (os.path.join(out, "student_sft"),
                           ["experiments/demo/student_sft.gin"] + files.student,
                           base + [f"NUM_STEPS = {student_steps}"])}
  results = {}
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    pending = {pool.submit(run_experiment, *run): key for key, run in first.items()}
    while pending:
      done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
      for future in done:
        results[pending.pop(future)] = future.result()  # a failed run raises here
      for key in [k for k, needs in requires.items() if needs <= results.keys()]:
        del requires[key]
        pending[pool.submit(run_experiment, *distill_runs[key])] = key
  teacher = results["teacher"]
  by_run = {k: results[k]["eval"]["accuracy"] for k in distill_runs}
  rows = {m: [by_run[seed, m] for seed in seeds] for m in METHODS}
  teacher_accuracy = teacher["eval"]["accuracy"]
  text = table(rows, teacher_accuracy)
  print(text)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(out, "results.csv"), "w") as f:
    f.write("method,seed,accuracy\n")
    f.write(f"teacher,,{teacher_accuracy}\n")
    for method, values in rows.items():
      for seed, value in zip(seeds, values):
        f.write(f"{method},{seed},{value}\n")
  plot(rows, teacher_accuracy, os.path.join(out, "demo.png"))
  print(f"table: {out}/results.md  plot: {out}/demo.png")
  return rows


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  started = time.time()
  seeds = (SETTINGS[FLAGS.setting].seeds if FLAGS.seeds is None
           else [int(s) for s in FLAGS.seeds])
  try:
    demo(FLAGS.out, seeds, FLAGS.teacher_steps, FLAGS.student_steps, FLAGS.distill_steps,
         FLAGS.eval_examples, FLAGS.setting, FLAGS.workers)
  except RuntimeError as e:
    sys.exit(f"demo: {e}")
  print(f"demo finished in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
  app.run(main)
