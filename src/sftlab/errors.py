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


SHOWN_CHARS = 200
"""At most this many characters of a user's value appear in a message (plus a note of what was cut)."""


def shown(value: object) -> str:
    """A user's value as a message quotes it: a repr bounded in length and nesting, with a count of what
    was cut. A value can be huge (a YAML alias bomb expands to millions of items; an integer of 5,000
    digits has no repr at all), and an error message must never be the thing that exhausts memory.

    >>> shown("x" * 1000)[-42:]
    "xxxx' (shortened: 1,000 characters in all)"
    >>> shown(10 ** 5000)
    '(an integer of about 5,001 digits)'
    """
    import reprlib

    short = reprlib.Repr()
    short.maxstring = short.maxother = short.maxlong = SHOWN_CHARS // 2
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict, short.maxset = 3, 8, 8, 8, 8
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 10_000:
        return f"(an integer of about {int(value.bit_length() * 0.30103) + 1:,} digits)"
    try:
        text = short.repr(value)
    except (ValueError, RecursionError):  # an integer too long to print, nested inside the value
        return f"(a {type(value).__name__} too large to show)"
    size = len(value) if isinstance(value, (str, bytes, list, tuple, dict, set)) else 0
    unit = "characters" if isinstance(value, (str, bytes)) else "items"
    cut = size > (short.maxstring if unit == "characters" else short.maxlist) or len(text) > SHOWN_CHARS
    if len(text) > SHOWN_CHARS:
        text = text[:SHOWN_CHARS] + "…"
    if cut:
        return f"{text} (shortened: {size:,} {unit} in all)" if size else f"{text} (shortened)"
    return text
