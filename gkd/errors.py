"""The one exception type for user mistakes.

A `UserError` means the input (a flag, a value, a file, a checkpoint) is wrong,
not the code. It is raised before anything is written; `gkd.main` turns it into
one line on stderr and exit code 2. Its message names the problem and the fix.
It subclasses `ValueError` so library callers can catch the usual type.
"""


class UserError(ValueError):
  """A mistake in the user's input; the message says what and how to fix it."""


class RunStopped(Exception):
  """A run ended early on purpose (preemption, non-finite loss); not a bug.

  `gkd.main` prints the message as one line and exits with `exit_code`.
  """

  def __init__(self, message: str, exit_code: int = 1):
    super().__init__(message)
    self.exit_code = exit_code



_DISK_FULL_ERRNOS = (28, 122)  # ENOSPC, EDQUOT
_DISK_FULL_TEXT = ("No space left on device", "RESOURCE_EXHAUSTED: Error writing")


def disk_full_path(error: BaseException) -> "str | None":
  """The file a write failed on if `error` (or one it was raised from) means a full disk.

  Orbax reports a full disk from TensorStore as a ValueError whose text names
  the file; Python writes raise OSError(ENOSPC). Returns None for other errors,
  "?" for a full disk whose file is unknown.
  """
  found, seen = None, set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    text = str(error)
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
      if error.filename:
        return str(error.filename)
      found = "?"
    elif any(t in text for t in _DISK_FULL_TEXT):
      start = text.find('file "')
      if start >= 0:
        return text[start + 6:text.find('"', start + 6)]
      found = "?"
    error = error.__cause__ or error.__context__
  return found


def exit_on_disk_full(error: BaseException) -> None:
  """Exits with one line on stderr and status 4 if `error` means a full disk; else returns."""
  path = disk_full_path(error)
  if path is None:
    return
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  print(f"gkd: error: no space left on device writing {path}; free space on that disk or "
        "choose another --gin.MODEL_DIR, then rerun: the run resumes from its last complete "
        "checkpoint", file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  # Skip the atexit handlers: they flush TensorBoard files and Orbax's abandoned
  # writes to the full disk and would print tracebacks after this line.
  os._exit(4)  # pylint: disable=protected-access
