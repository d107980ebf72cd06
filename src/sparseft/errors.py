"""The one exception users see: a clear, single-line message saying what is wrong and how to fix it."""


class SparseftError(Exception):
    """Bad input or a failed precondition. The CLI prints the message alone, without a traceback."""
