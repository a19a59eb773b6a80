"""The idle-machine guard every bench script runs before it measures anything.

    loadguard.add_flags(parser)      # --allow_load, --max_load
    loadguard.check(args)            # after parsing; prints the machine's load

Figures taken on a loaded machine are not comparable: the baselines' own
thread pools (PyTorch's above all) collapse under load, which inflated our
gkd/TRL ratios from 3.6x to 16.9x. So `check`:

  * prints nproc and the 1-minute load average at the start and (at exit) at
    the end, with the share of the CPUs that *other* processes used during the
    run (all processes' busy time from /proc/stat minus this process's and its
    children's);
  * refuses to run (exit 75, EX_TEMPFAIL, one line on stderr) when the
    1-minute load average is above `--max_load` (default: a quarter of the
    CPUs, at least 0.5);
  * with `--allow_load` on a loaded machine, runs anyway and marks every line
    it prints INVALID (load X): table rows get a last column saying so, other
    lines a prefix. If other processes loaded the machine during a run that
    started idle, the end line says the figures above are INVALID.
"""

import argparse
import atexit
import os
import sys
import time
from typing import Optional, TextIO

EXIT_NOT_IDLE = 75  # EX_TEMPFAIL: try again later


def add_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--allow_load", action="store_true",
                      help="run on a loaded machine; every printed row is then marked INVALID")
  parser.add_argument("--max_load", type=float, default=None,
                      help="the highest 1-minute load average (and CPUs busy with other "
                           "processes during the run) that counts as idle (default: "
                           "max(0.5, nproc / 4))")


def default_max_load(nproc: int) -> float:
  return max(0.5, nproc / 4)


def busy_cpu_seconds() -> Optional[float]:
  """CPU-seconds all processes have spent busy since boot (/proc/stat), or None."""
  try:
    with open("/proc/stat") as f:
      fields = [int(x) for x in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  busy = sum(fields[0:3]) + sum(fields[5:7])  # user nice system, irq softirq (not steal)
  return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
  """CPU-seconds of this process and its waited-for children."""
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


class MarkedStream:
  """A text stream that marks every complete line written through it.

  Markdown table rows (lines starting with "|") get one more column: " validity |"
  on a table's header, "---|" on its separator, " <mark> |" on its rows; other
  non-empty lines get "<mark>: " in front. A table line that follows other
  lines is a header unless it has as many cells as the last header (a table
  whose rows are interleaved with notes).
  """

  def __init__(self, stream: TextIO, mark: str):
    self._stream, self.mark = stream, mark
    self._pending, self._in_table, self._columns = "", False, None

  def _line(self, line: str) -> str:
    text = line.rstrip()
    if not text.startswith("|"):
      self._in_table = False
      return f"{self.mark}: {line}" if text else line
    columns = text.count("|")
    if set(text) <= set("|-: "):
      self._in_table = True
      return text + "---|"
    if not self._in_table and columns != self._columns:
      self._in_table, self._columns = True, columns
      return text + " validity |"
    self._in_table = True
    return text + f" {self.mark} |"

  def write(self, text: str) -> int:
    self._pending += text
    *lines, self._pending = self._pending.split("\n")
    for line in lines:
      self._stream.write(self._line(line) + "\n")
    return len(text)

  def flush(self) -> None:
    self._stream.flush()

  def close_pending(self) -> None:
    if self._pending:
      self._stream.write(self._line(self._pending) + "\n")
      self._pending = ""
    self._stream.flush()

  def __getattr__(self, name):  # isatty, fileno, encoding, ...
    return getattr(self._stream, name)


def _describe(load: float, nproc: int, max_load: float) -> str:
  return f"nproc {nproc}, 1-minute load average {load:.2f} (idle: at most {max_load:.2f})"


def check(args: argparse.Namespace, out: Optional[TextIO] = None) -> None:
  """Prints the machine's load; exits if it is not idle, unless `args.allow_load`.

  With `allow_load` on a loaded machine, `sys.stdout` is replaced by a
  `MarkedStream` for the rest of the process. At exit, prints the end load.
  """
  out = out or sys.stdout
  nproc = os.cpu_count() or 1
  max_load = args.max_load if args.max_load is not None else default_max_load(nproc)
  load = os.getloadavg()[0]
  print(f"machine at start: {_describe(load, nproc, max_load)}", file=out, flush=True)
  if load > max_load and not args.allow_load:
    print(f"bench: the machine is not idle (1-minute load average {load:.2f} on {nproc} CPUs, "
          f"above {max_load:.2f}), so its figures would not be valid; stop the other work and "
          "wait until the load falls, or pass --allow_load to run anyway with every row "
          "marked INVALID", file=sys.stderr)
    sys.exit(EXIT_NOT_IDLE)
  marked = None
  if load > max_load:
    marked = MarkedStream(out, f"INVALID (load {load:.2f})")
    sys.stdout = marked
  started, busy0, own0 = time.monotonic(), busy_cpu_seconds(), own_cpu_seconds()

  def at_end():
    stream = marked._stream if marked else out  # pylint: disable=protected-access
    if marked:
      marked.close_pending()
    wall = time.monotonic() - started
    busy1 = busy_cpu_seconds()
    others = None
    if busy0 is not None and busy1 is not None and wall > 0:
      others = max(0.0, (busy1 - busy0) - (own_cpu_seconds() - own0)) / wall
    end = f"machine at end: {_describe(os.getloadavg()[0], nproc, max_load)}"
    if others is not None:
      end += f"; other processes kept {others:.2f} CPUs busy during the run"
    print(end, file=stream, flush=True)
    if others is not None and others > max_load and not marked:
      print(f"INVALID: other processes kept {others:.2f} CPUs busy during the run (more than "
            f"{max_load:.2f}); the figures above were measured under load; rerun on an idle "
            "machine", file=stream, flush=True)
  atexit.register(at_end)
