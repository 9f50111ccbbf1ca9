"""The error a user causes (bad config, data, path, missing backend), reported without traceback."""

import contextlib
import sys


class UserError(ValueError):
  """A mistake in the user's inputs; the message names the file, row or config key to fix."""


@contextlib.contextmanager
def exit_on_user_error(program: str, verbose: bool):
  """Turns a UserError into one line `program: message` on stderr and exit status 1.

  With verbose the error propagates with its traceback.
  """
  try:
    yield
  except UserError as error:
    if verbose:
      raise
    sys.exit(f"{program}: {error}")
