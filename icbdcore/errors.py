"""Errors a user of the command line can meet: one line, no traceback."""

from collections.abc import Iterator
from contextlib import contextmanager


class CliError(Exception):
    """A failure to report as `icbd: <message>` with a non-zero exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@contextmanager
def plain_errors() -> Iterator[None]:
    """Let a lone exception out of the nurseries' groups, so that a CliError
    reaches the command line as one line."""
    try:
        yield
    except BaseExceptionGroup as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if error is group:
            raise
        raise error from None
