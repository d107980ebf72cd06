"""The one exception users see: a clear, single-line message saying what is wrong and how to fix it."""


class SparseftError(Exception):
    """Bad input or a failed precondition. The CLI prints the message alone, without a traceback."""


class SparseftWarning(UserWarning):
    """Something the user should know that does not stop the run. The CLI prints it as one line."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for a one-line error that
    quotes what a library said."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
