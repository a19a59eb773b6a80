r"""The built-in offline demo: teacher -> SFT student -> SFT / supervised KD / on-policy GKD.

    python -m gkd.demo --out=/tmp/gkd_demo

On the offline arithmetic word problems (no download), on CPU:
  1. train the teacher (~0.9M parameters) by supervised fine-tuning;
  2. train the student (~0.3M) by supervised fine-tuning (the GKD paper's
     starting point for every distillation run);
  3. from that student, for each seed, continue with
       sft            more supervised fine-tuning (same number of steps),
       supervised_kd  forward KL on the dataset's outputs (λ = 0),
       gkd_reverse_kl on-policy GKD with reverse KL (λ = 1),
       gkd_jsd_0_9    on-policy GKD with JSD(β = 0.9) (λ = 1);
  4. print the table (accuracy on held-out problems), write results.md,
     results.csv and demo.png under --out.
Every run is an ordinary `python -m gkd.main` experiment (configs/experiments/
demo/); re-running the demo skips finished runs and resumes interrupted ones.
"""

import json
import os
import statistics
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "/tmp/gkd_demo", "Directory for the runs, table and plot.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the distillation runs.")
flags.DEFINE_integer("teacher_steps", 600, "Teacher training steps.")
flags.DEFINE_integer("student_steps", 300, "Student supervised fine-tuning steps.")
flags.DEFINE_integer("distill_steps", 200, "Steps of each method from the SFT student.")
flags.DEFINE_integer("eval_examples", 500, "Held-out problems per evaluation (500: the whole "
                     "validation split).")

METHODS = ("sft", "supervised_kd", "gkd_reverse_kl", "gkd_jsd_0_9")
LABELS = {"sft": "supervised fine-tuning", "supervised_kd": "supervised KD (λ=0, FKL)",
          "gkd_reverse_kl": "on-policy GKD (λ=1, RKL)", "gkd_jsd_0_9": "on-policy GKD (λ=1, JSD 0.9)"}


def run_experiment(model_dir: str, files: list[str], bindings: list[str]) -> dict:
  """One `gkd.main --mode=train_and_eval` run in this process; skipped if finished."""
  import gin  # pylint: disable=g-import-not-at-top
  from gkd import main, train  # pylint: disable=g-import-not-at-top
  results_path = os.path.join(model_dir, "results.json")
  if os.path.exists(results_path):
    with open(results_path) as f:
      return json.load(f)
  gin.clear_config()
  main.parse_gin(files, [f"MODEL_DIR = {model_dir!r}"] + bindings, [])
  started = time.time()
  results = train.train(mode="train_and_eval")
  logging.warning("%s: %s in %.0f s", os.path.basename(model_dir), results["eval"],
                  time.time() - started)
  return results


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
         distill_steps: int, eval_examples: int) -> dict[str, list[float]]:
  base = [f"gkd.train.EvalConfig.max_examples = {eval_examples}"]
  teacher = run_experiment(os.path.join(out, "teacher"), ["experiments/demo/teacher.gin"],
                           base + [f"NUM_STEPS = {teacher_steps}"])
  run_experiment(os.path.join(out, "student_sft"), ["experiments/demo/student_sft.gin"],
                 base + [f"NUM_STEPS = {student_steps}"])
  rows: dict[str, list[float]] = {m: [] for m in METHODS}
  for seed in seeds:
    for method in METHODS:
      results = run_experiment(
          os.path.join(out, f"{method}_seed{seed}"),
          ["experiments/demo/distill.gin", f"methods/{method}.gin"],
          base + [f"NUM_STEPS = {distill_steps}", f"SEED = {seed}",
                  f"TEACHER_DIR = {os.path.join(out, 'teacher', 'export')!r}",
                  f"STUDENT_INIT = {os.path.join(out, 'student_sft', 'export')!r}"])
      rows[method].append(results["eval"]["accuracy"])
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
  demo(FLAGS.out, [int(s) for s in FLAGS.seeds], FLAGS.teacher_steps, FLAGS.student_steps,
       FLAGS.distill_steps, FLAGS.eval_examples)
  print(f"demo finished in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
  app.run(main)
