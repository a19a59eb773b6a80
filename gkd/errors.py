"""The one exception type for user mistakes.

A `UserError` means the input (a flag, a value, a file, a checkpoint) is wrong,
not the code. It is raised before anything is written; `gkd.main` turns it into
one line on stderr and exit code 2. Its message names the problem and the fix.
It subclasses `ValueError` so library callers can catch the usual type.
"""


class UserError(ValueError):
  """A mistake in the user's input; the message says what and how to fix it."""
