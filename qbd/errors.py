"""User-facing errors, torch-free so the CLI can catch them before torch is imported.

Each is a user mistake or a missing resource: the CLI prints its message on one line and exits
with status 2, never a traceback.
"""

from __future__ import annotations


class QbdUserError(Exception):
    """Base of the errors that are the user's to fix."""


class ConfigError(QbdUserError, ValueError):
    """A setting is out of range or malformed."""


class DataUnavailableError(QbdUserError, RuntimeError):
    """A data set's files are missing or malformed; the message says where to put them."""
