"""validate(): the rules every conversation obeys, checked on Conversation values directly."""

from __future__ import annotations

import dataclasses

import pytest

from sftlab.data.schema import ROLES, Conversation, Message, ToolCall, validate
from sftlab.errors import DataError

WHERE = "rows.jsonl:17"


def conv(*messages: tuple) -> Conversation:
    return Conversation(tuple(Message(*m) for m in messages), WHERE)


CALL = ToolCall("get_weather", {"city": "Paris"}, "call_1")

VALID = {
    "single turn": conv(("user", "Hi"), ("assistant", "Hello")),
    "with system": conv(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")),
    "multi turn": conv(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")),
    "train overrides": conv(("user", "a", True), ("assistant", "b", False), ("user", "c"), ("assistant", "d", True)),
    "whitespace content": conv(("user", " "), ("assistant", "\n")),
    "tool calling": Conversation((
        Message("system", "Use tools."), Message("user", "Weather?"), Message("assistant", "", tool_calls=(CALL, CALL)),
        Message("tool", "22C", tool_call_id="call_1"), Message("tool", "23C"), Message("assistant", "Warm."),
        Message("user", "Thanks"), Message("assistant", "Bye", reasoning="be polite")), WHERE,
        tools=({"type": "function"},)),
    "ends with a tool call": Conversation((Message("user", "a"), Message("assistant", "Let me look.",
                                                                          tool_calls=(CALL,))), WHERE),
    "unicode": conv(("system", "日本語"), ("user", "héllo 🌍"), ("assistant", "<|im_end|> is just text")),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_conversation_is_returned_unchanged(name: str) -> None:
    conversation = VALID[name]
    assert validate(conversation) is conversation


# (conversation, reason, fragments the message must hold)
INVALID = {
    "no messages": (conv(), "no messages", ["the conversation has no messages", "Fix or remove the row"]),
    "unknown role": (conv(("user", "a"), ("assistent", "b")), "unknown role",
                     ["message 2 has role 'assistent'", "expected one of system, user, assistant",
                      "data.role_map.assistent=assistant"]),
    "tool result without a call": (conv(("user", "a"), ("tool", "{}"), ("assistant", "b")),
                                   "tool result without call",
                                   ["message 2 is a tool result, but no tool call precedes it", "message 1 is 'user'"]),
    "tool call without result": (Conversation((Message("user", "a"), Message("assistant", "", tool_calls=(CALL,)),
                                               Message("user", "b"), Message("assistant", "c")), WHERE),
                                 "tool call without result", ["message 2 (assistant) makes tool calls but message 3"]),
    "tool result left unanswered": (Conversation((Message("user", "a"), Message("assistant", "", tool_calls=(CALL,)),
                                                  Message("tool", "22C"), Message("user", "b"),
                                                  Message("assistant", "c")), WHERE),
                                    "tool result not answered", ["message 4 (user) follows a tool result"]),
    "arguments not an object": (Conversation((Message("user", "a"), Message(
        "assistant", "", tool_calls=(ToolCall("get", [1, 2]),)), Message("tool", "r"), Message("assistant", "c")),
        WHERE), "tool arguments not an object", ["message 2 tool_calls[0] (get) arguments are [1, 2]"]),
    "reasoning on a user": (Conversation((Message("user", "a", reasoning="hmm"), Message("assistant", "c")), WHERE),
                            "reasoning not assistant", ["message 1 (user) has reasoning_content"]),
    "empty content without tool calls": (conv(("user", "a"), ("assistant", "")), "empty content",
                                         ["message 2 (assistant) has empty content"]),
    "missing content": (conv(("user", "a"), ("assistant", None)), "missing content",
                        ["message 2 (assistant) content is missing", "expected a non-empty string"]),
    "non-string content": (conv(("user", 7), ("assistant", "b")), "content not a string",
                           ["message 1 (user) content is a int", "Give the message's text as one string"]),
    "dict content": (conv(("system", {"text": "s"}), ("user", "a"), ("assistant", "b")), "content not a string",
                     ["message 1 (system) content is a dict"]),
    "empty content": (conv(("system", "s"), ("user", ""), ("assistant", "b")), "empty content",
                      ["message 2 (user) has empty content", "Fill it in or remove the message"]),
    "train not a bool": (conv(("user", "a"), ("assistant", "b", 1)), "train not a bool",
                         ["message 2 field 'train' is 1", "expected true or false", "data.train_on"]),
    "only system": (conv(("system", "s")), "no assistant message",
                    ["only a system message", "expected user and assistant turns after it"]),
    "no assistant": (conv(("user", "a")), "no assistant message",
                     ["no assistant message", "add the assistant's reply or remove the row"]),
    "system not first": (conv(("user", "a"), ("assistant", "b"), ("system", "s"), ("user", "c"),
                              ("assistant", "d")), "system not first",
                         ["message 3 has role 'system'", "may only come first", "Merge it"]),
    "two systems": (conv(("system", "s"), ("system", "t"), ("user", "a"), ("assistant", "b")), "system not first",
                    ["message 2 has role 'system'"]),
    "starts with assistant": (conv(("assistant", "b"), ("user", "a"), ("assistant", "c")),
                              "does not start with user", ["has role 'assistant'; expected 'user'"]),
    "consecutive users after system": (conv(("system", "s"), ("user", "a"), ("assistant", "b"), ("user", "c"),
                                            ("user", "d"), ("assistant", "e")), "consecutive same roles",
                                       ["messages 4 and 5 both have role 'user'", "Merge the two messages"]),
    "consecutive assistants no system": (conv(("user", "a"), ("assistant", "b"), ("assistant", "c")),
                                         "consecutive same roles", ["messages 2 and 3 both have role 'assistant'"]),
    "trailing user": (conv(("system", "s"), ("user", "a"), ("assistant", "b"), ("user", "c")),
                      "trailing user turn", ["the last message (message 4) has role 'user'",
                                             "drop the trailing user turn"]),
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_conversation_names_where_what_and_fix(name: str) -> None:
    conversation, reason, fragments = INVALID[name]
    with pytest.raises(DataError) as info:
        validate(conversation)
    error = info.value
    assert (error.where, error.reason) == (WHERE, reason)
    assert str(error) == f"{WHERE}: {error.detail}"
    for fragment in fragments:
        assert fragment in error.detail, f"{fragment!r} not in {error.detail!r}"


def test_message_checks_run_before_order_checks() -> None:
    # The bad role in message 3 is reported, not the (also wrong) missing assistant reply.
    with pytest.raises(DataError) as info:
        validate(conv(("user", "a"), ("user", "b"), ("bot", "c")))
    assert info.value.reason == "unknown role"
    assert "message 3" in info.value.detail


def test_error_without_where_has_no_prefix() -> None:
    with pytest.raises(DataError) as info:
        validate(Conversation((Message("user", "a"),)))
    assert str(info.value) == info.value.detail
    assert str(info.value).startswith("the conversation has no assistant message")


def test_messages_and_conversations_are_frozen_values() -> None:
    message = Message("assistant", "hi", train=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.content = "changed"  # type: ignore[misc]
    assert Message("user", "x") == Message("user", "x", None)
    assert Message("user", "x").train is None
    assert ROLES == ("system", "user", "assistant", "tool")
