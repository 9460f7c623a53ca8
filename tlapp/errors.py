"""Errors a user can act on. The CLI prints their message and exits with status 2."""


class UserInputError(ValueError):
    """Bad usage or bad input: the message says what was received and what to do."""


class DiskFullError(UserInputError):
    """A write ran out of space (or quota); nothing half-written was kept."""
