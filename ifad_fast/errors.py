"""The one exception type for user errors: the CLI prints its message on one line and exits 2."""


class IfadError(Exception):
    """A user error: bad input, missing model, impossible request.

    The message is one line that says what is wrong and what to do about it.
    """
