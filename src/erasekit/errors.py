"""The one exception type users see."""

from __future__ import annotations


class ErasekitError(Exception):
    """A user-facing error: the message says what was wrong and what to do (one line)."""


def one_line(exc: BaseException) -> str:
    """An error as one line (a table cell): the message of an ErasekitError, else its type and message."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, ErasekitError) else f"{type(exc).__name__}: {text}"
