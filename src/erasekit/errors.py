"""The one exception type users see."""

from __future__ import annotations


class ErasekitError(Exception):
    """A user-facing error: the message says what was wrong and what to do (one line)."""
