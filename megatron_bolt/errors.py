"""Errors that carry a one-line message for the user (file, line, field) instead of a traceback."""


class UserError(Exception):
    """Bad input or configuration. The CLI prints `bolt CMD: error: <message>` and exits 2."""
