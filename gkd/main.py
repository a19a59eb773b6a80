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
--process_id; on TPU VMs it is automatic).

Exit codes: 0 done; 2 bad input (one line on stderr: the problem and its fix,
nothing written); 3 non-finite loss; 4 disk full (the last complete checkpoint
is kept); 143 preempted (SIGTERM, checkpoint saved).
"""

import ast
import functools
import os
import sys
import tokenize

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin config files, applied in order.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, applied after the files.")
flags.DEFINE_list("gin_search_paths", [], "Directories to look for --gin_file in.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "train_and_eval"], "What to run.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")

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
  if os.path.isabs(path) or os.path.exists(path):
    return path
  for root in search_paths:
    candidate = os.path.join(root, path)
    if os.path.exists(candidate):
      return candidate
  from gkd.errors import UserError  # pylint: disable=g-import-not-at-top
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
  try:
    gin.parse_config_files_and_bindings(files, bindings, finalize_config=False)
  except (ValueError, IOError, SyntaxError, KeyError, tokenize.TokenError) as e:
    raise UserError(f"bad Gin config: {str(e).splitlines()[0]}; fix the binding or file "
                    "(names are e.g. gkd.train.Method.lmbda)") from None
  finally:
    logging.set_verbosity(verbosity)


def run(argv: list[str], gin_flags: tuple[str, ...] = ()) -> None:
  """Runs the configured experiment; `gin_flags` are the `--gin.NAME=VALUE` bindings."""
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
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
      train.train(mode=FLAGS.mode)
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


def main() -> None:
  argv, bindings = split_gin_flags(sys.argv)
  app.run(functools.partial(run, gin_flags=tuple(bindings)), argv=argv)


if __name__ == "__main__":
  main()
