"""Errors the CLI prints as one clear line (no traceback), with a non-zero exit."""


class QlaunchError(Exception):
    """A problem the user can fix: bad input, a missing tool, a refused submission."""

    exit_code = 2


class ConfigError(QlaunchError):
    """The experiment file is invalid. The message names the file, key path and line."""


class BackendError(QlaunchError):
    """The scheduler or cluster refused or could not be reached."""

    exit_code = 3
