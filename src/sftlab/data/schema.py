"""Message and Conversation, and the rules every conversation obeys before it is rendered.

A valid conversation: an optional system message first, then user and assistant messages alternating,
ending with an assistant message; every content a non-empty string.
"""

from __future__ import annotations

import re
import reprlib
from dataclasses import dataclass
from typing import Any

from sftlab.errors import DataError

ROLES = ("system", "user", "assistant")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_ROLE_NAME = re.compile(r"[\w-]{1,40}")
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlevel = 3


def shown(value: Any) -> str:
    """A row's value as an error message quotes it: a repr cut to about 60 characters and 3 levels of
    nesting, so a huge or deeply nested value cannot swamp (or crash) the message; non-printable
    characters, lone surrogates included, come out escaped."""
    try:
        return _SHORT.repr(value)
    except ValueError:  # an int of more digits than Python converts to text
        return f"(a {type(value).__name__} too large to show)"


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    train: bool | None = None
    """Per-message override of `data.train_on`: True trains this message, False never does."""


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    where: str = ""
    """`file:line` of the row it came from, carried into every later error."""


def validate(conversation: Conversation) -> Conversation:
    """Return the conversation unchanged if it is valid, else raise DataError naming where and why."""
    where, messages = conversation.where, conversation.messages
    if not messages:
        raise DataError("the conversation has no messages; expected at least a user and an assistant "
                        "message. Fix or remove the row.", where=where, reason="no messages")
    for number, message in enumerate(messages, start=1):
        _check_message(message, number, where)
    for number, message in enumerate(messages[1:], start=2):
        if message.role == "system":
            raise DataError(f"message {number} has role 'system'; a system message may only come first. "
                            "Merge it into the first system message or drop it.",
                            where=where, reason="system not first")
    turns = [m for m in messages if m.role != "system"]
    if not turns:
        raise DataError("the conversation has only a system message; expected user and assistant turns "
                        "after it.", where=where, reason="no assistant message")
    if not any(m.role == "assistant" for m in turns):
        raise DataError("the conversation has no assistant message, so there is nothing to train on; "
                        "add the assistant's reply or remove the row.", where=where, reason="no assistant message")
    if turns[0].role != "user":
        raise DataError(f"the first turn after the system message has role {turns[0].role!r}; expected "
                        "'user'. Add the user's message that the assistant answers.",
                        where=where, reason="does not start with user")
    offset = len(messages) - len(turns)
    for index in range(1, len(turns)):
        if turns[index].role == turns[index - 1].role:
            raise DataError(f"messages {offset + index} and {offset + index + 1} both have role "
                            f"{turns[index].role!r}; expected user and assistant to alternate. Merge the two "
                            "messages into one.", where=where, reason="consecutive same roles")
    if turns[-1].role != "assistant":
        raise DataError(f"the last message (message {len(messages)}) has role {turns[-1].role!r}; expected "
                        "the conversation to end with an assistant reply. Add the reply or drop the "
                        "trailing user turn.", where=where, reason="trailing user turn")
    return conversation


def _check_message(message: Message, number: int, where: str) -> None:
    if message.role not in ROLES:
        role = message.role
        found = shown(role) if isinstance(role, str) else f"{shown(role)} (a {type(role).__name__})"
        example = role if isinstance(role, str) and _ROLE_NAME.fullmatch(role) else "ROLE"  # fit for a dotted key
        raise DataError(f"message {number} has role {found}; expected one of {', '.join(ROLES)}. Fix the row "
                        f"or map the role with data.role_map (e.g. data.role_map.{example}=assistant).",
                        where=where, reason="unknown role")
    if not isinstance(message.content, str):
        found = "missing" if message.content is None else f"a {type(message.content).__name__}"
        raise DataError(f"message {number} ({message.role}) content is {found}; expected a non-empty "
                        "string. Give the message's text as one string.", where=where,
                        reason="missing content" if message.content is None else "content not a string")
    if message.content == "":
        raise DataError(f"message {number} ({message.role}) has empty content; expected a non-empty "
                        "string. Fill it in or remove the message.", where=where, reason="empty content")
    surrogate = _SURROGATE.search(message.content)
    if surrogate is not None:  # only a JSON escape such as "\ud83d" without its other half gives one
        raise DataError(f"message {number} ({message.role}) content holds an unpaired UTF-16 surrogate "
                        f"{surrogate.group()!r} at character {surrogate.start()}; expected valid Unicode text. "
                        "Fix the row's escape (an emoji needs both halves, e.g. \\ud83d\\ude42) or remove it.",
                        where=where, reason="invalid unicode")
    if message.train is not None and not isinstance(message.train, bool):
        raise DataError(f"message {number} field 'train' is {shown(message.train)}; expected true or false "
                        "(or leave it out to follow data.train_on).", where=where, reason="train not a bool")
