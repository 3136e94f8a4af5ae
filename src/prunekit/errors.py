"""Errors a user can cause. The CLI prints them as one sentence and exits with status 2."""


class PruneError(Exception):
    """A mistake in what the user asked for (bad option, missing file, impossible pattern, ...).

    The message is one sentence that says what to do about it.
    """
