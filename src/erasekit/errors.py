"""The one exception type users see."""

from __future__ import annotations


class ErasekitError(Exception):
    """A user-facing error: the message says what was wrong and what to do (one line)."""


def one_line(exc: BaseException) -> str:
    """An error as one line (a table cell): the message of an ErasekitError, else its type and message."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, ErasekitError) else f"{type(exc).__name__}: {text}"


class SettingError(ErasekitError):
    """A setting out of its range: in Python the message names the keyword argument, on the command line its flag.

    ``text`` says ``{name}`` where the setting is named; ``flag`` defaults to ``--`` + the name with dashes.
    """

    def __init__(self, name: str, text: str, flag: str | None = None) -> None:
        self.setting, self.text = name, text
        self.flag = flag or "--" + name.replace("_", "-")
        super().__init__(text.replace("{name}", name))

    def cli_message(self) -> str:
        """The message as the command line shows it: the setting named by its flag."""
        return self.text.replace("{name}", self.flag)


def cli_message(exc: ErasekitError) -> str:
    """One line for the command line: a setting named by its flag, whitespace collapsed."""
    text = exc.cli_message() if isinstance(exc, SettingError) else str(exc)
    return " ".join(text.split())
