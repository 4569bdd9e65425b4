"""The one exception type the toolkit raises for problems a user can fix.

The CLI turns a :class:`ToolkitError` into a one-line ``error: ...`` message and a non-zero exit
instead of a traceback, so its message must say what is wrong and what to do about it.
"""


class ToolkitError(RuntimeError):
    """A user-facing error: bad input, missing files, missing weights. The message is one line."""
