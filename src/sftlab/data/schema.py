"""Message and Conversation, and the rules every conversation obeys before it is rendered.

A valid conversation: an optional system message first, then user and assistant messages alternating,
ending with an assistant message; every content a non-empty string. Tool calling adds: an assistant
message may carry `tool_calls` (its content may then be empty), and `tool` messages (the results) follow
an assistant message with tool calls, in place of the user's turn. An assistant message may carry its
`reasoning` (the trace the model writes before its answer).
"""

from __future__ import annotations

import difflib
import json
import marshal
import re
from dataclasses import dataclass
from typing import Any

from sftlab.errors import DataError, shown

ROLES = ("system", "user", "assistant", "tool")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_ROLE_NAME = re.compile(r"[\w-]{1,40}")


@dataclass(frozen=True)
class ToolCall:
    """One function call an assistant message makes (OpenAI's shape, flattened)."""
    name: str
    arguments: Any
    """A JSON object (dict); a JSON string of one is parsed by validate()'s caller, the readers."""
    id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The OpenAI shape templates read: `{"type": "function", "id"?, "function": {name, arguments}}`."""
        call: dict[str, Any] = {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if self.id is not None:
            call["id"] = self.id
        return call


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    train: bool | None = None
    """Per-message override of `data.train_on`: True trains this message, False never does."""
    tool_calls: tuple[ToolCall, ...] = ()
    """Calls an assistant message makes; its content may then be empty."""
    reasoning: str | None = None
    """An assistant's reasoning trace (`reasoning_content`), rendered where the template puts it."""
    tool_call_id: str | None = None
    """A tool result's id of the call it answers."""
    name: str | None = None
    """A tool result's function name."""


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    where: str = ""
    """`file:line` of the row it came from, carried into every later error."""
    tools: tuple[Any, ...] | None = None
    """The row's tool (function) definitions, JSON schemas passed to the template as `tools=`."""

    @property
    def rich(self) -> bool:
        """Whether it uses tool calling or reasoning, which the template renders beyond the contents."""
        return self.tools is not None or any(m.tool_calls or m.reasoning is not None or m.role == "tool"
                                             for m in self.messages)


TOOL_POOL_ITEMS = 4096
TOOL_POOL_BYTES = 16_000_000
"""Most tool schemas, and their bytes (marshalled), `ToolPool` holds (then it starts again)."""


class ToolPool:
    """One object for every equal tool schema the rows bring: a dataset's rows mostly draw their `tools` from a
    few schemas, each parsed anew from every row. Handing out the first-seen copy of each lets what is keyed by
    identity hit across rows: a template's `tojson` of each tool (`templates._JsonMemo`) and the size a render
    is capped by. Equal means equal `marshal` bytes (format 2, which has no back-references): the same types
    (1, 1.0 and true differ), values and key order, so a template cannot tell the copies apart; marshal is a
    fifth of `json.dumps`'s time. The pooled objects are never changed in place (nothing changes a row;
    templates run in an immutable sandbox). Bounded by constants; a schema marshal cannot write (not plain
    JSON values) is not pooled."""

    def __init__(self) -> None:
        self._by_bytes: dict[bytes, Any] = {}
        self._sizes: dict[int, tuple[Any, int]] = {}
        self._bytes = 0

    def pooled(self, tool: Any) -> Any:
        """The pool's copy of `tool` (it becomes that copy if it is the first)."""
        try:
            key = marshal.dumps(tool, 2)
        except ValueError:  # an object marshal cannot write: not pooled
            return tool
        found = self._by_bytes.get(key)
        if found is not None:
            return found
        try:
            size = len(json.dumps(tool, ensure_ascii=False))
        except (TypeError, ValueError, RecursionError):
            return tool
        if len(self._by_bytes) >= TOOL_POOL_ITEMS or self._bytes + len(key) > TOOL_POOL_BYTES:
            self._by_bytes.clear()
            self._sizes.clear()
            self._bytes = 0
        self._by_bytes[key] = tool
        self._sizes[id(tool)] = (tool, size)
        self._bytes += len(key)
        return tool

    def json_size(self, tool: Any) -> int | None:
        """len(json.dumps(tool, ensure_ascii=False)) of a pooled tool, None for one not in the pool."""
        found = self._sizes.get(id(tool))
        return found[1] if found is not None and found[0] is tool else None


TOOL_POOL = ToolPool()
"""The process's pool: rows are read on one thread per process."""


def message_record(message: Message) -> dict[str, Any]:
    """A message as a messages-format row holds it (OpenAI's field names), every set field kept: what
    rejects.jsonl writes so a rejected row can be fixed and fed back with nothing lost."""
    record: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        record["tool_calls"] = [call.as_dict() for call in message.tool_calls]
    if message.reasoning is not None:
        record["reasoning_content"] = message.reasoning
    for key in ("tool_call_id", "name", "train"):
        if getattr(message, key) is not None:
            record[key] = getattr(message, key)
    return record


def validate(conversation: Conversation) -> Conversation:
    """Return the conversation unchanged if it is valid, else raise DataError naming where and why. A
    conversation found valid is marked so, and not checked again (the reader validates each row, and the
    template validates what it renders, since a hand-built conversation may hold anything): its fields
    are frozen."""
    if conversation.__dict__.get("_valid"):
        return conversation
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
    _check_tool_order(messages, where)
    turns = [m for m in messages if m.role not in ("system", "tool")]
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
    _check_alternation(messages, where)
    if messages[-1].role != "assistant":
        raise DataError(f"the last message (message {len(messages)}) has role {messages[-1].role!r}; expected "
                        "the conversation to end with an assistant reply. Add the reply or drop the "
                        "trailing user turn.", where=where, reason="trailing user turn")
    object.__setattr__(conversation, "_valid", True)
    return conversation


_TOOLISH = ("function", "observation", "ipython", "tool", "result", "response", "output")
_MODELISH = {"bot", "model", "gpt", "ai", "chatbot", "agent", "llm", "answer", "reply"}


def _suggested_role(name: str) -> str:
    """The role a hint proposes for an unknown one: never assistant unless the name is a near-spelling of
    it, since mapping anything else to assistant trains the model on text it does not write."""
    lowered = name.lower()
    if any(part in lowered for part in _TOOLISH):
        return "tool"
    if lowered in _MODELISH:
        return "assistant"
    close = difflib.get_close_matches(lowered, ROLES, n=1, cutoff=0.75)
    return close[0] if close else "user"


def _check_tool_order(messages: tuple[Message, ...], where: str) -> None:
    """A tool result answers a call: the message before it is an assistant's with tool calls, or another
    result of the same calls."""
    for number, message in enumerate(messages, start=1):
        if message.role != "tool":
            continue
        before = messages[number - 2] if number > 1 else None
        if before is None or not (before.role == "tool" or (before.role == "assistant" and before.tool_calls)):
            raise DataError(f"message {number} is a tool result, but no tool call precedes it (message "
                            f"{number - 1} is {'none' if before is None else repr(before.role)}); expected the "
                            "assistant message whose tool_calls it answers just before it. Add the assistant's "
                            "tool call or remove the result.", where=where, reason="tool result without call")


def _check_alternation(messages: tuple[Message, ...], where: str) -> None:
    """User and assistant alternate; an assistant's tool calls are followed by their results (tool
    messages), and the results by the assistant's next message."""
    for number in range(2, len(messages) + 1):
        before, message = messages[number - 2], messages[number - 1]
        if before.role == "system" or message.role == "tool":
            continue  # placement of system and tool messages is checked elsewhere
        if before.role == "assistant" and before.tool_calls:
            if message.role != "tool":
                raise DataError(f"message {number - 1} (assistant) makes tool calls but message {number} is "
                                f"{message.role!r}, not their result; expected tool messages with the results "
                                "next. Add the results (role tool) or remove the tool calls.",
                                where=where, reason="tool call without result")
            continue
        if before.role == "tool":
            if message.role != "assistant":
                raise DataError(f"message {number} ({message.role}) follows a tool result; expected the "
                                "assistant's message that reads the results next. Add it.",
                                where=where, reason="tool result not answered")
            continue
        if message.role == before.role:
            raise DataError(f"messages {number - 1} and {number} both have role {message.role!r}; expected "
                            "user and assistant to alternate. Merge the two messages into one.",
                            where=where, reason="consecutive same roles")


def _check_message(message: Message, number: int, where: str) -> None:
    if not isinstance(message.role, str) or message.role not in ROLES:
        role = message.role
        found = shown(role) if isinstance(role, str) else f"{shown(role)} (a {type(role).__name__})"
        example = role if isinstance(role, str) and _ROLE_NAME.fullmatch(role) else "ROLE"  # fit for a dotted key
        raise DataError(f"message {number} has role {found}; expected one of {', '.join(ROLES)}. Fix the row "
                        f"or map the role with data.role_map (e.g. data.role_map.{example}="
                        f"{_suggested_role(example)}; only the model's own replies map to assistant, tool "
                        "and function results to tool).", where=where, reason="unknown role")
    if not isinstance(message.content, str):
        found = "missing" if message.content is None else f"a {type(message.content).__name__}"
        raise DataError(f"message {number} ({message.role}) content is {found}; expected a non-empty "
                        "string. Give the message's text as one string.", where=where,
                        reason="missing content" if message.content is None else "content not a string")
    if message.content == "" and not message.tool_calls:
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
    _check_tool_fields(message, number, where)


def _check_tool_fields(message: Message, number: int, where: str) -> None:
    if message.tool_calls and message.role != "assistant":
        raise DataError(f"message {number} ({message.role}) has tool_calls; only assistant messages make tool "
                        "calls. Fix the message's role.", where=where, reason="tool calls not assistant")
    if message.reasoning is not None and message.role != "assistant":
        raise DataError(f"message {number} ({message.role}) has reasoning_content; only assistant messages "
                        "reason. Remove the field or fix the role.", where=where, reason="reasoning not assistant")
    if message.reasoning is not None and (not isinstance(message.reasoning, str) or not message.reasoning.strip()):
        raise DataError(f"message {number} reasoning_content is {shown(message.reasoning)}; expected non-empty "
                        "text (or leave the field out).", where=where, reason="reasoning not a string")
    for index, call in enumerate(message.tool_calls):
        field = f"message {number} tool_calls[{index}]"
        if not isinstance(call.name, str) or not call.name:
            raise DataError(f"{field} function name is {shown(call.name)}; expected the called function's name "
                            "as a non-empty string.", where=where, reason="tool call without name")
        if not isinstance(call.arguments, dict):
            raise DataError(f"{field} ({call.name}) arguments are {shown(call.arguments)}; expected a JSON "
                            "object of argument names and values (or a string holding one).",
                            where=where, reason="tool arguments not an object")
