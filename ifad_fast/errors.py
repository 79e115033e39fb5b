"""The exception type for user errors, the warning type for loud, deliberate warnings, and what
counts as running out of memory.

The CLI prints an IfadError's message on one line and exits 2; an IfadWarning is printed at
once as one `warning:` line (other libraries' warnings are held back until the command ends,
so none is printed before an error line).
"""
import sys


class IfadError(Exception):
    """A user error: bad input, missing model, impossible request.

    The message is one line that says what is wrong and what to do about it.
    """


class IfadWarning(UserWarning):
    """Something the user asked for that is likely to give poor results (e.g. --force)."""


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` reports memory running out: MemoryError, torch's CPU allocator failing (a
    RuntimeError) or a GPU's torch.OutOfMemoryError. Other RuntimeErrors are bugs, not this."""
    if isinstance(exc, MemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    gpu = getattr(sys.modules.get("torch"), "OutOfMemoryError", ())     # torch not imported: not torch's
    return isinstance(exc, gpu) or "DefaultCPUAllocator: can't allocate memory" in str(exc)
