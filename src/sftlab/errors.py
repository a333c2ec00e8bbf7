"""The errors sftlab raises for things a user can fix.

Every message says what was expected, what was found, where, and how to fix it. The CLI prints these
without a traceback; anything else that escapes is a bug in sftlab.
"""


class SftlabError(Exception):
    """Base class: a problem with the user's input, config, model or environment."""


class ConfigError(SftlabError):
    """A config key is unknown, has the wrong type, or an out-of-range / incompatible value."""


class DataError(SftlabError):
    """A data row (named by file:line) cannot be read, validated, rendered or tokenised."""

    def __init__(self, message: str, *, where: str = "", reason: str = "") -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where
        self.reason = reason or "invalid row"
        self.detail = message


class TemplateError(SftlabError):
    """A chat template cannot be used to render or mask conversations exactly."""
