"""Errors the user can fix. The CLI prints their message and exits with status 2.

Each message names the file, row or parameter at fault and says how to fix it; anything
else escaping the library is a bug and keeps its traceback.
"""


class MetaloopError(Exception):
    """Base of every error caused by input (params, data, environment), not by a bug."""


class ConfigError(MetaloopError):
    """params.yaml is missing, malformed or holds an impossible value."""


class DataError(MetaloopError):
    """A data source cannot be read as declared (missing, empty, not UTF-8, wrong columns)."""
