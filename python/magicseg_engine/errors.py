"""Errors the command line turns into one clear line instead of a traceback."""


class UsageError(Exception):
    """Bad input from the user: a wrong flag value, an unreadable file, a malformed line.

    The CLI prints the message on one line and exits with code 2. Messages name the
    problem and what to do about it.
    """

    exit_code = 2
