"""Errors caused by the user's input: the CLI prints them as one clear message (what,
where, how to fix) and exits non-zero, without a traceback."""


class UserError(Exception):
    """Bad input: config, data, paths, or a run that cannot go on (NaN loss)."""

    exit_code = 1
