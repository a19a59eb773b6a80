r"""python -m gkd.main: train / evaluate a GKD experiment from Gin files (t5x-style flags).

    python -m gkd.main \
      --gin_file=experiments/demo/distill.gin --gin_file=methods/gkd_jsd_0_9.gin \
      --gin_file=experiments/demo/half_bare/distill.gin \
      --gin.TEACHER_DIR=/tmp/gkd_demo/teacher/export \
      --gin.STUDENT_INIT=/tmp/gkd_demo/student_sft/export \
      --gin.MODEL_DIR=/tmp/gkd/run1 --gin.LMBDA=0.5 --mode=train_and_eval

Flags: --gin_file (repeatable; relative names are looked up in --gin_search_paths,
the current directory and the package's configs/), --gin.NAME=VALUE (a binding
or macro; a bare string value is quoted for you), --gin_bindings, --mode, and
multi-host initialisation (--coordinator_address, --num_processes,
--process_id; on TPU VMs it is automatic), and --pin_cpus (run on these CPUs
only: runs pinned to one CPU give the same numbers whatever the machine's core
count).

At the end it prints the final evaluation (which split, how many examples)
and the path of results.json. TensorFlow's native start-up lines are dropped
(gkd/startup.py).

Exit codes: 0 done; 2 bad input (one line on stderr: the problem and its fix,
nothing written); 3 non-finite loss; 4 disk full (the last complete checkpoint
is kept); 143 preempted (SIGTERM, checkpoint saved).
"""

import ast
import functools
import os
import re
import sys
import tokenize

from absl import flags, logging

from gkd import startup

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin config files, applied in order.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, applied after the files.")
flags.DEFINE_list("gin_search_paths", [], "Directories to look for --gin_file in.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "train_and_eval"], "What to run.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.DEFINE_list("pin_cpus", None, "Run on these CPU ids only (Linux). XLA:CPU sizes its "
                  "thread pool, and so how it splits reductions, by the CPUs a process may use: "
                  "runs pinned to the same number of CPUs give the same numbers on any machine "
                  "with the same instruction set (docs/reliability.md).")

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs")
_LITERAL_START = ("@", "%", "(", "[", "{", "'", '"')


def _as_gin_value(value: str) -> str:
  """Quotes a bare string (`/tmp/run`), keeps Gin syntax and Python literals."""
  if value.startswith(_LITERAL_START):
    return value
  try:
    ast.literal_eval(value)
    return value
  except (ValueError, SyntaxError):
    return repr(value)


def split_gin_flags(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates t5x-style `--gin.NAME=VALUE` arguments into Gin bindings."""
  rest, bindings = [], []
  for arg in argv:
    if arg.startswith("--gin."):
      name, sep, value = arg[len("--gin."):].partition("=")
      if not sep or not name:  # exit 2 like every bad input
        print(f"gkd: error: {arg!r} must look like --gin.NAME=VALUE", file=sys.stderr)
        raise SystemExit(2)
      bindings.append(f"{name} = {_as_gin_value(value)}")
    else:
      rest.append(arg)
  return rest, bindings


def _find(path: str, search_paths: list[str]) -> str:
  if os.path.isfile(path):
    return path
  for root in search_paths if not os.path.isabs(path) else ():
    candidate = os.path.join(root, path)
    if os.path.isfile(candidate):
      return candidate
  from gkd.errors import UserError  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):
    raise UserError(f"gin file {path!r} is a directory; pass a .gin file")
  if os.path.isabs(path):
    raise UserError(f"gin file {path!r} does not exist; check the path")
  raise UserError(f"gin file {path!r} not found (searched ., {', '.join(search_paths)}); "
                  "check the path or add its directory with --gin_search_paths")


def parse_gin(files: list[str], bindings: list[str], search_paths: list[str]) -> None:
  """Parses Gin files and bindings; any mistake becomes a UserError."""
  import gin  # pylint: disable=g-import-not-at-top
  from gkd.errors import UserError  # pylint: disable=g-import-not-at-top
  paths = list(search_paths) + [CONFIGS_DIR, os.getcwd()]
  for path in paths:
    gin.add_config_file_search_path(path)
  files = [_find(f, paths) for f in files]
  if not files:
    raise UserError("no --gin_file given; pass an experiment, e.g. "
                    "--gin_file=experiments/demo/teacher.gin")
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.FATAL)  # gin logs an ERROR for every include it resolves
  source = None
  try:  # what gin.parse_config_files_and_bindings does, knowing which source fails
    for source in files:
      gin.parse_config_file(source)
    source = None
    gin.parse_config(bindings)
  except (ValueError, IOError, SyntaxError, KeyError, tokenize.TokenError) as e:
    raise UserError(f"bad Gin config {_gin_error_location(e, source)}: {_gin_error_text(e)}; "
                    "fix the binding or file (names are e.g. gkd.train.Method.lmbda)") from None
  finally:
    logging.set_verbosity(verbosity)


def _gin_error_text(e: Exception) -> str:
  if isinstance(e, tokenize.TokenError):
    return str(e.args[0])
  if isinstance(e, SyntaxError) and e.msg:
    return e.msg
  return str(e).splitlines()[0].rstrip(".") if str(e) else type(e).__name__


def _gin_error_location(e: Exception, source: "str | None") -> str:
  """'in FILE, line N' (the innermost file Gin names), 'in the binding ...', or the source."""
  text = str(e)
  found = re.search(r'In file "([^"]+)", line (\d+)', text)
  if found:
    return f"in {found.group(1)}, line {found.group(2)}"
  found = re.search(r"In bindings string line \d+\n\s*(.*)", text)
  if found:
    return f"in the binding {found.group(1).strip()!r}"
  line = None
  if isinstance(e, tokenize.TokenError) and len(e.args) > 1:
    line = e.args[1][0]
  elif isinstance(e, SyntaxError):
    line = e.lineno
  where = f"in {source}" if source else "in the --gin bindings"
  if source and os.path.isfile(source):
    with open(source, errors="replace") as f:
      if re.search(r"^\s*include\s", f.read(), re.M):
        where += " (or a file it includes)"
  return where + (f", line {line}" if line else "")


def _format_metrics(metrics: dict) -> str:
  return ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())


def report(results: dict) -> str:
  """What a finished run prints: its final evaluation and where results.json is."""
  lines = []
  train = results.get("train")
  if train:
    rate = train.get("tokens_per_sec")
    lines.append(f"trained {train['steps']} steps" + (
        f" (on-policy fraction {train['on_policy_fraction']:.2f}, {rate:.0f} target tokens/s)"
        if rate else ""))
  tags = ["eval", "teacher_eval"] + sorted(k for k in results if k.startswith("teacher_eval_"))
  for tag in tags:
    if tag in results:
      seen = results.get("eval_examples", {})
      count = seen.get("count")
      if seen.get("whole_split"):
        which = f"all {count} examples of {seen.get('split')!r}"
      else:
        cap = results["config"]["eval"]["max_examples"]
        which = (f"the first {count} examples of {seen.get('split')!r} (capped by "
                 f"gkd.train.EvalConfig.max_examples = {cap})")
      who = {"eval": "student", "teacher_eval": "teacher"}.get(
          tag, f"teacher {tag[len('teacher_eval_'):]}")
      lines.append(f"{who} at step {results.get('step')} on {which}: "
                   f"{_format_metrics(results[tag])}")
  lines.append(f"results: {os.path.join(results['model_dir'], 'results.json')}")
  return "\n".join(lines)


def _pin(cpus: list[str]) -> None:
  """Restricts this process to `cpus` (before JAX starts its thread pool); exit 2 if it can't."""
  try:
    wanted = {int(c) for c in cpus}
    os.sched_setaffinity(0, wanted)
  except (ValueError, OSError, AttributeError) as e:
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "none"
    print(f"gkd: error: --pin_cpus={','.join(cpus)} cannot be applied ({e}); give CPU ids this "
          f"process may use ({usable})", file=sys.stderr)
    sys.exit(2)


def run(argv: list[str], gin_flags: tuple[str, ...] = ()) -> None:
  """Runs the configured experiment; `gin_flags` are the `--gin.NAME=VALUE` bindings."""
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  if FLAGS.pin_cpus:
    _pin(FLAGS.pin_cpus)
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID"):
    jax.distributed.initialize()  # a TPU VM pod: everything comes from the environment
  import gin  # pylint: disable=g-import-not-at-top
  import gkd.losses, gkd.models, gkd.partitioning, gkd.sampling, gkd.tasks  # pylint: disable=g-import-not-at-top,unused-import,multiple-imports
  from gkd import train  # pylint: disable=g-import-not-at-top
  from gkd.errors import RunStopped, UserError, exit_on_disk_full  # pylint: disable=g-import-not-at-top
  try:
    parse_gin(FLAGS.gin_file, FLAGS.gin_bindings + list(gin_flags), FLAGS.gin_search_paths)
    try:
      results = train.train(mode=FLAGS.mode)
    except RuntimeError as e:
      if "Required bindings" in str(e) or "REQUIRED" in str(e):
        raise UserError(f"missing Gin binding: {str(e).splitlines()[0]}; set it in a "
                        "--gin_file or with --gin.NAME=VALUE") from None
      raise
  except UserError as e:
    print(f"gkd: error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
  except RunStopped as e:
    print(f"gkd: stopped: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(e.exit_code)
  except Exception as e:  # pylint: disable=broad-except
    exit_on_disk_full(e)  # one line and exit 4; any other error is a bug: traceback
    raise
  if jax.process_index() == 0:
    sys.stderr.flush()  # the progress bar ends before the report
    print(report(results), flush=True)


def main() -> None:
  startup.quiet()  # before anything imports TensorFlow
  startup.xla_defaults()  # before JAX starts its backend
  argv, bindings = split_gin_flags(sys.argv)
  startup.run_app(functools.partial(run, gin_flags=tuple(bindings)), argv)


if __name__ == "__main__":
  main()
