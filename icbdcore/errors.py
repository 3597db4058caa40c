"""Errors a user of the command line can meet: one line, no traceback."""


class CliError(Exception):
    """A failure to report as `icbd: <message>` with a non-zero exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
