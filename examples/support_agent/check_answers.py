"""The held-out accuracy check: does an answer state the right fact?

An answer passes when, after `normalise`, it states every expected value (heldout.jsonl's `expect`) and
contradicts none. Strict on the value, lenient on its spelling:

- the value must appear as whole words: "45 days" passes, "145 days" and "4 days" do not;
- spellings of the same value are equal: "45-day", "forty-five days", "8 a.m. to 6 p.m.", "8am–6pm",
  "Monday through Saturday", "10 percent", "65 dollars" (see `normalise`);
- a hedge is no statement: "30 to 45 days", "45 or 60 days", "2-4 business days" fail;
- a contradiction fails: for a value that is a number with a unit ("45 days", "$65", "10%"), the answer
  fails if it also gives another number with that unit ("45 days, or 60 days for members"), unless that
  one is expected too.

Stdlib only; the demo imports `score` and `accuracy` (and `signed_off` for the brand voice).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_UNITS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
          "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
          "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19}
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
         "ninety": 90}
_NUMBER_WORDS = {**_UNITS, **_TENS}
_DASHES = str.maketrans({c: "-" for c in "\u2010\u2011\u2012\u2013\u2014\u2015\u2212"})
_WEEKDAYS = "monday|tuesday|wednesday|thursday|friday|saturday|sunday"
_ENDPOINT = rf"(?:\$?\d+(?:[ap]m|%)?|{_WEEKDAYS})"
"""What can stand on either side of a range: 4, $65, 8am, 10%, monday."""
_NUMERIC = re.compile(r"(\$?)(\d+)(%?)((?: [a-z]+)*)")
"""A value that is a number with a unit: ($)(45)(%)( business day)."""


def normalise(text: str) -> str:
    """Lower case, numbers as digits, one spelling per time / range / amount, singular units, and every
    other punctuation mark a space.

    >>> normalise("Returns: Forty-five days (a 45-day window)!")
    'returns 45 day a 45 day window'
    >>> normalise("8 a.m.–6:00 PM, Monday through Saturday")
    '8am to 6pm monday to saturday'
    >>> normalise("over 65 dollars, or 10 percent off")
    'over $65 or 10% off'
    """
    text = text.lower().translate(_DASHES)
    tens, units = "|".join(_TENS), "|".join(u for u in _UNITS if _UNITS[u] < 10 and u != "zero")
    text = re.sub(rf"\b({tens})[\s-]+({units})\b", lambda m: str(_TENS[m[1]] + _UNITS[m[2]]), text)
    text = re.sub(rf"\b({'|'.join(_NUMBER_WORDS)})\b", lambda m: str(_NUMBER_WORDS[m[1]]), text)
    text = re.sub(r"\b(\d{1,2})(?::00)?\s*([ap])\.?\s?m\b\.?", r"\1\2m", text)        # 8 a.m., 6:00 pm -> 8am, 6pm
    text = re.sub(r"(\d+)\s*(?:%|percent\b|per cent\b)", r"\1%", text)
    text = re.sub(r"\$\s*(\d+)", r"$\1", text)
    text = re.sub(r"\b(\d+) dollars?\b", r"$\1", text)
    text = re.sub(rf"({_ENDPOINT})\s*(?:-|\bthrough\b|\bthru\b|\buntil\b|\btill\b)\s*(?={_ENDPOINT}(?![a-z0-9]))",
                  r"\1 to ", text)                                                   # 8am-6pm -> 8am to 6pm
    text = re.sub(r"\b(second|minute|hour|day|week|month|year)s\b", r"\1", text)
    return " ".join(re.sub(r"[^a-z0-9$%@]+", " ", text).split())


def score(answer: str, expect: Sequence[str]) -> bool:
    """True when `answer` states every value in `expect` and contradicts none of them.

    >>> score("You can return it within 45 days. Glad to help!", ["45 days"])
    True
    >>> [score(a, ["45 days"]) for a in ("within 30 days", "30 to 45 days", "45 days, or 60 days on sale")]
    [False, False, False]
    """
    if not expect:
        raise ValueError("expect is empty; a held-out row must name at least one value to check")
    text = normalise(answer)
    needles = [normalise(value) for value in expect]
    return all(_states(text, needle) and not _contradicts(text, needle, needles) for needle in needles)


def accuracy(answers: Sequence[str], expects: Sequence[Sequence[str]]) -> float:
    """The share of answers that pass `score` against their own expected values."""
    if len(answers) != len(expects):
        raise ValueError(f"{len(answers)} answers but {len(expects)} expected-value lists; expected one per answer")
    if not answers:
        raise ValueError("no answers to score; expected at least one held-out row")
    return sum(score(answer, expect) for answer, expect in zip(answers, expects)) / len(answers)


def signed_off(answer: str, sign_off: str) -> bool:
    """True when the answer ends with the brand's sign-off (spelling normalised as in `score`)."""
    return f" {normalise(answer)}".endswith(f" {normalise(sign_off)}")


def _states(text: str, needle: str) -> bool:
    """`needle` occurs as whole words, at least once outside a range or an either-or (30 to 45 days)."""
    for match in re.finditer(rf"(?<![a-z0-9$%@]){re.escape(needle)}(?![a-z0-9%@])", text):
        before, after = text[:match.start()], text[match.end():]
        hedged = (re.search(rf"{_ENDPOINT} (?:to|or) $", before) is not None
                  or re.match(rf" (?:to|or) {_ENDPOINT}(?![a-z0-9])", after) is not None)
        if not hedged:
            return True
    return False


def _contradicts(text: str, needle: str, needles: Sequence[str]) -> bool:
    """For a number-with-unit needle, another number with the same unit that is not itself expected."""
    parts = _NUMERIC.fullmatch(needle)
    if parts is None or not (parts[1] or parts[3] or parts[4]):
        return False  # not a number with a unit: nothing to contradict it by
    prefix, number, percent, unit = parts.groups()
    same_unit = rf"(?<![a-z0-9$]){re.escape(prefix)}(\d+){re.escape(percent)}{re.escape(unit)}(?![a-z0-9%])"
    return any(m[1] != number and m[0] not in needles for m in re.finditer(same_unit, text))
