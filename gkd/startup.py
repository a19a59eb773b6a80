"""Process start-up shared by the command lines (gkd.main, gkd.vocab, gkd.demo, gkd.convert).

TensorFlow (only the data pipeline uses it) prints a dozen native lines on
import ("oneDNN custom operations are on", "Could not find cuda drivers", a
CPU feature guard, "failed call to cuInit" on machines without a GPU), before
any of our own output. A command line calls `quiet()` first: TensorFlow's C++
logging then keeps FATAL only, and `import_tensorflow` drops the native lines
written during the import (replaying them if the import fails). Library users
who do not call `quiet()` keep TensorFlow's defaults.

`xla_defaults()` adds the XLA options our command lines run with to
`XLA_FLAGS` (an option the user's `XLA_FLAGS` already names is left as given);
it must run before JAX initialises its backend.

Whoever imports TensorFlow through `import_tensorflow` (gkd.tasks does) also
hides the accelerators from it: tf.data runs on the host, and a TensorFlow
that initialised the GPUs would reserve their memory, which JAX needs.
"""

import contextlib
import os
import sys
import tempfile
from typing import Callable, Sequence

from absl import app

HELP_FLAGS = ("--help", "-help", "-?", "--helpshort", "--helpfull", "--helpxml")
_QUIET = False


def quiet() -> None:
  """Silences native start-up logging; call before anything imports TensorFlow."""
  global _QUIET
  _QUIET = True
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow C++: FATAL only
  os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


# XLA:CPU's copy insertion, by default, copies the donated [V, E] embedding and head
# weights that the train step reads both in a loop (the fused loss's chunk scan) and
# after it (the update); region analysis proves those copies unneeded
# (bench/RESULTS.md: the step's temporaries at V = 152,064 fall 1,884 -> 1,695 MiB).
XLA_DEFAULTS = ("--xla_cpu_copy_insertion_use_region_analysis=true",)


def xla_defaults() -> None:
  """Appends `XLA_DEFAULTS` to XLA_FLAGS, except options XLA_FLAGS already sets."""
  given = os.environ.get("XLA_FLAGS", "")
  names = {f.split("=")[0] for f in given.split()}
  extra = [f for f in XLA_DEFAULTS if f.split("=")[0] not in names]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([given] + extra).strip()


@contextlib.contextmanager
def _native_stderr_dropped():
  """Sends file descriptor 2 to a temporary file; replays it if the body raises."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    failed = False
    try:
      yield
    except BaseException:
      failed = True
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      if failed:
        captured.seek(0)
        sys.stderr.write(captured.read().decode("utf-8", "replace"))
        sys.stderr.flush()


def import_tensorflow():
  """`import tensorflow` (quietly after `quiet()`), with the accelerators hidden from it."""
  if "tensorflow" in sys.modules:
    return sys.modules["tensorflow"]
  with _native_stderr_dropped() if _QUIET else contextlib.nullcontext():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      tf.config.set_visible_devices([], "GPU")
      tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # already initialised, or no such device type
      pass
  return tf


def run_app(main: Callable[[list[str]], None], argv: Sequence[str]) -> None:
  """`absl.app.run(main, argv)`, except that --help (and its variants) exits 0."""
  try:
    app.run(main, argv=list(argv))
  except SystemExit as e:
    if e.code == 1 and any(a in HELP_FLAGS for a in argv[1:]):
      raise SystemExit(0) from None
    raise
