"""The errors a user can fix, as one family: the command line (`bn_jax.cli`) reports a
`UserError` as one line, `error: <message>`, exit status 2; any other exception is a bug and
shows its full traceback.

Each message names the problem and the fix. The kinds also derive from the builtin error
they refine, so `except ValueError` / `except OSError` in a caller's code still catch them.
"""


class UserError(Exception):
  """Bad settings, bad data or an unusable workdir; the message names the fix."""


class ConfigError(UserError, ValueError):
  """A setting that cannot run; the message names the setting and the fix (one line)."""


class DataError(UserError, ValueError):
  """A data file or spec that cannot be read as a dataset."""


class DataNotFound(UserError, FileNotFoundError):
  """Data that is not where the spec says (or cannot be downloaded)."""


class WorkdirError(UserError, OSError):
  """A workdir that cannot be used as it is: a file, unwritable, full, of another experiment."""
