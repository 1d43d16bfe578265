"""The one exception type for mistakes a user or an operator can fix.

Library code raises `UserError` with a one-line, actionable message naming the bad value (a path,
a config key, a checkpoint); `launch.py` prints it as one line on stderr and exits non-zero,
without a traceback. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A bad input (flag, config value, path, file) described in one actionable line."""
