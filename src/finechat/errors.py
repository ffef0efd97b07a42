"""Errors that finechat reports to a user as one clear line (the CLI prints them without a traceback).

Exit codes: 2 for anything the user fixes in a command, config or file as a whole (:class:`FinechatError`,
including :class:`DataFileError`: a data file that is missing, damaged or truncated, or whose columns fit no
format); 3 for a bad record inside readable data (:class:`DataError`, naming file, line and field), so that a
script can tell "fix or skip this record" (``on_bad_record: skip``) from "fix the input".
"""


class FinechatError(Exception):
    """A problem the user can fix: a missing path, bad input, an incompatible adapter. Exit code 2."""

    exit_code = 2


class ConfigError(FinechatError):
    """An invalid config file, flag or key=value override."""


class DataError(FinechatError):
    """A bad data record; the message names file, line and field. Exit code 3."""

    exit_code = 3


class DataFileError(DataError):
    """A data file or source that cannot be read at all: missing, truncated or damaged (Parquet, Arrow, gzip,
    zstd), an unreadable ``datasets`` folder, columns that fit no data format. Not a bad record: exit code 2.

    A subclass of :class:`DataError` so that code catching data problems still catches it.
    """

    exit_code = 2


class ModelLoadError(FinechatError):
    """A model or adapter that cannot be loaded (missing path, not a model, wrong base)."""
