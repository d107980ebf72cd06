"""The one exception users see: a clear, single-line message saying what is wrong and how to fix it."""


class SparseftError(Exception):
    """Bad input or a failed precondition. The CLI prints the message alone, without a traceback."""


class SparseftWarning(UserWarning):
    """Something the user should know that does not stop the run. The CLI prints it as one line."""
