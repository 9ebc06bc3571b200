"""The one exception type that the CLI turns into a clear message and an exit code."""

from __future__ import annotations


class RnnlmError(Exception):
    """A user-facing error: bad input, missing data, a refused operation.

    The CLI prints ``message`` on one line (no traceback) and exits with ``code``.
    Code 2 is bad input or usage, following the shell convention.
    """

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
