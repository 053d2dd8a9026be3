"""Errors a user can cause: one sentence that says what is wrong and what to do."""


class UserError(Exception):
    """A problem with the user's input; the CLI prints the message and exits with status 2."""


class DataError(UserError):
    """A problem with the user's data (folders, files, npz archives)."""
