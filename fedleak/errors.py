"""Errors that the command line turns into one-line messages instead of tracebacks."""


class FedleakError(Exception):
    """Base class: a problem the user can fix (bad config, missing file, busy port)."""


class ConfigError(FedleakError):
    """An unknown preset, key, role or an invalid value."""


class DataError(FedleakError):
    """A dataset file is missing or unreadable."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`docker stop`, compose ending a project, a batch scheduler): the command stops as
    on Ctrl-C, so a run folder records that it was stopped and keeps what it wrote."""
