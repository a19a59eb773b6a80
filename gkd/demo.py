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
  4. print the table (accuracy on held-out problems: teacher, the student after
     SFT, then each method), ready to paste into a Markdown file, and write
     results.md, results.csv and demo.png under --out.

While runs go, it prints which are running, their step / total and ETA (from
each run's progress in its log, `<out>/<run>.log`) every --progress_every
seconds. Each run is pinned to a CPU of its own (--pin): XLA:CPU splits its
reductions by the number of CPUs a process may use, so pinned runs give the
same numbers, bit for bit, on any machine with the same instruction set,
however many cores it has and however loaded it is (docs/reliability.md).

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
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
from typing import NamedTuple, Optional

from absl import flags, logging

from gkd import startup

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
flags.DEFINE_bool("pin", True, "Pin each run to a CPU of its own (Linux; needs --workers CPUs): "
                  "the figures then do not depend on the machine's core count.")
flags.DEFINE_integer("progress_every", 30, "Seconds between progress lines (0: none).")

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
TEACHER, START = "teacher", "student after SFT (the starting point)"
# The last progress bar in a run's log: "  340/1000 [01:02<02:01".
_PROGRESS = re.compile(r"(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")


def _minutes(seconds: float) -> str:
  return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


class Progress:
  """Which runs are going, and their step / total and ETA, read from their logs."""

  def __init__(self):
    self._lock = threading.Lock()
    self._running: dict[str, tuple[str, float]] = {}  # name -> (log path, start time)
    self.done: list[str] = []

  def start(self, name: str, log: str) -> None:
    with self._lock:
      self._running[name] = (log, time.time())
    print(f"started {name}: log {log}", flush=True)

  def finish(self, name: str) -> None:
    with self._lock:
      _, began = self._running.pop(name)
      self.done.append(name)
    print(f"finished {name} in {_minutes(time.time() - began)}", flush=True)

  @staticmethod
  def _state(log: str) -> str:
    try:
      with open(log, "rb") as f:
        f.seek(max(0, os.path.getsize(log) - 4096))
        tail = f.read().decode("utf-8", "replace")
    except OSError:
      return "starting"
    found = _PROGRESS.findall(tail)
    if not found:
      return "starting"
    step, total, _, eta = found[-1]
    if step == total:
      return f"{step}/{total}, evaluating"
    return f"step {step}/{total}" + ("" if "?" in eta else f", ETA {eta}")

  def line(self, elapsed: float) -> str:
    with self._lock:
      running = dict(self._running)
    parts = [f"{name} {self._state(log)}" for name, (log, _) in running.items()]
    return f"[{_minutes(elapsed)}] running: {'; '.join(parts) or 'none'}; {len(self.done)} done"


def run_experiment(model_dir: str, files: list[str], bindings: list[str],
                   progress: Optional[Progress] = None,
                   cpus: "Optional[queue.Queue]" = None) -> dict:
  """One `python -m gkd.main --mode=train_and_eval` run, in a subprocess that logs to
  `<model_dir>.log` (pinned to a CPU taken from `cpus`); skipped if finished.
  Raises RuntimeError (with the log's end) if the run fails."""
  results_path = os.path.join(model_dir, "results.json")
  name = os.path.basename(model_dir)
  if not os.path.exists(results_path):
    args = [sys.executable, "-m", "gkd.main", "--mode=train_and_eval"]
    args += [f"--gin_file={f}" for f in files]
    args += [f"--gin_bindings={b}" for b in [f"MODEL_DIR = {model_dir!r}"] + bindings]
    os.makedirs(os.path.dirname(model_dir), exist_ok=True)
    cpu = cpus.get() if cpus is not None else None
    try:
      if cpu is not None:
        args.append(f"--pin_cpus={cpu}")
      if progress:
        progress.start(name, model_dir + ".log")
      with open(model_dir + ".log", "w") as log:
        code = subprocess.call(args, stdout=log, stderr=subprocess.STDOUT)
    finally:
      if cpu is not None:
        cpus.put(cpu)
    if code != 0:
      with open(model_dir + ".log") as log:
        tail = log.read()[-2000:]
      raise RuntimeError(f"{model_dir} failed (exit {code}); its log ends:\n{tail}")
    if progress:
      progress.finish(name)
  with open(results_path) as f:
    return json.load(f)


def _cell(values: list[float]) -> str:
  if len(values) < 2:
    return ""
  return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(rows: dict[str, list[float]], teacher: float, start: float,
          seeds: list[int]) -> str:
  """The Markdown table: one column per seed, and mean ± sd over seeds when there are several."""
  many = len(seeds) > 1
  head = ["method"] + [f"seed {s}" for s in seeds] + (["mean ± sd"] if many else [])
  blank = [""] * (len(seeds) - 1 + many)
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
           "| " + " | ".join([TEACHER, f"{teacher:.1f}"] + blank) + " |",
           "| " + " | ".join([START, f"{start:.1f}"] + blank) + " |"]
  for method, values in rows.items():
    cells = [f"+ {LABELS[method]}"] + [f"{v:.1f}" for v in values] + ([_cell(values)] if many else [])
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(rows: dict[str, list[float]], teacher: float, start: float, path: str) -> None:
  """Bars of the methods' mean accuracy (values on them, seeds as dots), the teacher and the
  SFT student they start from as lines."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7.5, 4))
  names = list(rows)
  means = [statistics.mean(rows[m]) for m in names]
  bars = ax.bar(range(len(names)), means, color=["#999", "#69c", "#d73", "#e95"][:len(names)])
  for bar, mean in zip(bars, means):  # inside the bar, or above it when it is too short
    inside = mean > 12
    ax.text(bar.get_x() + bar.get_width() / 2, mean / 2 if inside else mean + 1, f"{mean:.1f}",
            ha="center", va="center" if inside else "bottom", fontsize=11, fontweight="bold",
            color="white" if inside else "black")
  for i, m in enumerate(names):
    if len(rows[m]) > 1:
      ax.scatter([i] * len(rows[m]), rows[m], color="k", s=12, zorder=3)
  ax.axhline(teacher, color="k", linestyle="--", label=f"teacher {teacher:.1f}%")
  ax.axhline(start, color="#555", linestyle=":", label=f"student after SFT (start) {start:.1f}%")
  ax.set_xticks(range(len(names)), [LABELS[m].replace(" (", "\n(") for m in names], fontsize=8)
  ax.set_ylim(0, 118)
  ax.set_ylabel("held-out accuracy (%)")
  ax.set_title("Distilling the offline arithmetic task (teacher ~0.9M, student ~0.3M params)",
               fontsize=10)
  ax.legend(loc="upper left", fontsize=8, framealpha=1)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _cpu_pool(workers: int, pin: bool) -> "Optional[queue.Queue]":
  """One CPU per worker to pin runs to, or None (not asked, not Linux, too few CPUs)."""
  if not pin or not hasattr(os, "sched_getaffinity"):
    return None
  usable = sorted(os.sched_getaffinity(0))
  if len(usable) < workers:
    print(f"not pinning: {workers} workers but {len(usable)} usable CPUs", flush=True)
    return None
  pool = queue.Queue()
  for cpu in usable[:workers]:
    pool.put(cpu)
  return pool


def demo(out: str, seeds: list[int], teacher_steps: int, student_steps: int,
         distill_steps: Optional[int], eval_examples: int, setting: str = "half_bare",
         workers: int = 2, pin: bool = True, progress_every: float = 30
         ) -> dict[str, list[float]]:
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
  progress, cpus, began = Progress(), _cpu_pool(workers, pin), time.time()
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    submit = lambda run: pool.submit(run_experiment, *run, progress=progress, cpus=cpus)
    pending = {submit(run): key for key, run in first.items()}
    last_line = time.time()
    while pending:
      done, _ = concurrent.futures.wait(pending, timeout=1,
                                        return_when=concurrent.futures.FIRST_COMPLETED)
      for future in done:
        results[pending.pop(future)] = future.result()  # a failed run raises here
      for key in [k for k, needs in requires.items() if needs <= results.keys()]:
        del requires[key]
        pending[submit(distill_runs[key])] = key
      if pending and progress_every and time.time() - last_line >= progress_every:
        print(progress.line(time.time() - began), flush=True)
        last_line = time.time()
  by_run = {k: results[k]["eval"]["accuracy"] for k in distill_runs}
  rows = {m: [by_run[seed, m] for seed in seeds] for m in METHODS}
  teacher = results["teacher"]["eval"]["accuracy"]
  start = results["student_sft"]["eval"]["accuracy"]
  text = table(rows, teacher, start, seeds)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(out, "results.csv"), "w") as f:
    f.write("method,seed,accuracy\n")
    f.write(f"teacher,,{teacher}\nstudent_sft,,{start}\n")
    for method, values in rows.items():
      for seed, value in zip(seeds, values):
        f.write(f"{method},{seed},{value}\n")
  plot(rows, teacher, start, os.path.join(out, "demo.png"))
  examples = results["teacher"].get("eval_examples", {}).get("count", eval_examples)
  print(f"\nSetting {setting}: accuracy (%) on {examples} held-out problems, greedy decoding; "
        f"{workers} run{'s' if workers > 1 else ''} at a time"
        f"{', each pinned to one CPU' if cpus else ''}; "
        f"seeds {', '.join(map(str, seeds))}:\n")
  print(text)
  print(f"\ntable: {out}/results.md  plot: {out}/demo.png", flush=True)
  return rows


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  started = time.time()
  seeds = (SETTINGS[FLAGS.setting].seeds if FLAGS.seeds is None
           else [int(s) for s in FLAGS.seeds])
  try:
    demo(FLAGS.out, seeds, FLAGS.teacher_steps, FLAGS.student_steps, FLAGS.distill_steps,
         FLAGS.eval_examples, FLAGS.setting, FLAGS.workers, FLAGS.pin, FLAGS.progress_every)
  except RuntimeError as e:
    sys.exit(f"demo: {e}")
  print(f"demo finished in {(time.time() - started) / 60:.1f} min "
        f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end)")


if __name__ == "__main__":
  startup.run_app(main, sys.argv)
