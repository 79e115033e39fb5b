"""The exception type for user errors, and the warning type for loud, deliberate warnings.

The CLI prints an IfadError's message on one line and exits 2; an IfadWarning is printed at
once as one `warning:` line (other libraries' warnings are held back until the command ends,
so none is printed before an error line).
"""


class IfadError(Exception):
    """A user error: bad input, missing model, impossible request.

    The message is one line that says what is wrong and what to do about it.
    """


class IfadWarning(UserWarning):
    """Something the user asked for that is likely to give poor results (e.g. --force)."""
