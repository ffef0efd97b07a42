"""Errors that finechat reports to a user as one clear line (the CLI prints them without a traceback)."""


class FinechatError(Exception):
    """A problem the user can fix: a missing path, bad input, an incompatible adapter. Exit code 2."""

    exit_code = 2


class ConfigError(FinechatError):
    """An invalid config file, flag or key=value override."""


class DataError(FinechatError):
    """A bad data record; the message names file, line and field."""

    exit_code = 3


class ModelLoadError(FinechatError):
    """A model or adapter that cannot be loaded (missing path, not a model, wrong base)."""
