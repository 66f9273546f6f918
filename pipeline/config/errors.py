"""The configuration error every stage raises for bad input, and the one-line form of an exception."""
from __future__ import annotations

from pipeline.io.redact import redact_text



class ConfigError(ValueError):
    """The configuration is invalid; the message says which key and why. ``key`` names the config
    key a message refers to by name, so the command line can add the flag that sets it."""

    def __init__(self, message: str = "", key: str = "") -> None:
        super().__init__(message)
        self.key = key


def first_line(err: BaseException) -> str:
    """An exception's first line of text (or its type's name), for one-line messages; without
    credentials in URLs."""
    lines = redact_text(str(err)).strip().splitlines()
    return lines[0] if lines else type(err).__name__
