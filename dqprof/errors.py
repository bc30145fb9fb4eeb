"""The one exception type the CLI turns into a one-line message and an exit code."""

from __future__ import annotations


class DqprofError(Exception):
    """A user-facing error: bad input, missing hardware, unreadable results.

    ``exit_code`` follows the CLI's convention: 2 for bad or unusable input,
    1 for a check that ran and failed (regressions), 3 for missing hardware.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
