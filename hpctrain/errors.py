"""User-facing errors: the command prints their message, without a traceback, and exits 2."""


class HpctrainError(Exception):
    """A problem the user can fix; the message names the file, key or value and what was expected."""


class ConfigError(HpctrainError, ValueError):
    """A bad config file, key, value, grid or override."""


class DataError(HpctrainError):
    """A missing, corrupt or mismatched dataset file; the message names the file."""
