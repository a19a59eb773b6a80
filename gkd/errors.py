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
