"""User-facing errors.

Every problem caused by user input (a bad file, a bad value, a missing path) raises a subclass of
:class:`DiffauditError` whose message names the offending file or value. The CLI turns these into a one-line
message and exit code 2 instead of a traceback. Internal bugs stay ordinary exceptions.
"""

from __future__ import annotations


class DiffauditError(Exception):
    """Base class for errors a user can fix (bad input, bad configuration)."""


class DataError(DiffauditError):
    """An image source could not be read or failed validation."""


class ConfigError(DiffauditError):
    """A configuration value, preset name or override is invalid."""


class CheckpointError(DiffauditError):
    """A model directory is missing, incomplete, or in a format we refuse to load (e.g. a pickle)."""


class OutputError(DiffauditError):
    """An output path cannot be written: a directory where a file is needed (or the reverse), no permission."""


def one_line(text: object) -> str:
    """``text`` on one line: newlines and other control characters shown escaped (``\\n``), for error messages."""
    return "".join(
        ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii") for ch in str(text)
    )
