"""The one error type the CLI turns into ``bench: error: ...`` and exit status 2."""


class UsageError(Exception):
    """Bad input from the command line: one line naming it and the accepted values."""
