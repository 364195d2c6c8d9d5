"""Errors caused by the user's input: the CLI prints them as one clear message (what,
where, how to fix) and exits non-zero, without a traceback."""


class UserError(Exception):
    """Bad input: config, data, paths, or a run that cannot go on (NaN loss)."""

    exit_code = 1
    # Found alike by every rank (the config, the files every rank reads before training):
    # rank 0 says it; see cli.report_error.
    same_on_every_rank = False


class SharedInputError(UserError):
    """A problem of input every rank reads alike (a path in the config): rank 0 says it."""

    same_on_every_rank = True
