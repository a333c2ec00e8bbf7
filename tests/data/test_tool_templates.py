"""Tool-calling and reasoning conversations are masked exactly on real templates (issue 15, Build 2).

The independent reference: where the template is prefix-stable at assistant turn k, the text the model
generates at that turn is `render(messages[:k+1])[len(render(messages[:k], add_generation_prompt=True)):]`
cut after its end-of-turn marker. Hypothesis generates conversations (1-4 user turns, parallel tool calls,
empty/null content beside tool calls, unicode and JSON-looking arguments, reasoning) and every trained run
must equal that reference, in order, and nothing else may be trained: no tool result, schema, system or
user text. Templates: the real Qwen2.5 and Llama-3.2 tokenizers' own, and TRL's copy of Qwen3's.
"""

from __future__ import annotations

import json
import unicodedata
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import fixture_path, shared_real_tokenizer
from sftlab.data import turns
from sftlab.data.encode import IGNORE_INDEX, Encoder
from sftlab.data.inspect import runs
from sftlab.data.schema import Conversation, Message, ToolCall
from sftlab.data.templates import ChatTemplate, _as_dict, load_template
from sftlab.errors import DataError

EOT = {"qwen2_5": "<|im_end|>", "llama3_2": "<|eot_id|>", "qwen3": "<|im_end|>"}
TOOLS = ({"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "search", "description": "Search the web",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}})
EMPTY_THINK = "<think>\n\n</think>\n\n"

# Printable text without markup characters ('<', '|') or the private-use plane, stripped: special-token
# strings inside content are a separate matter (encode.py), and edge whitespace may merge across a boundary.
words = st.text(st.characters(blacklist_categories=("Cs", "Co", "Cc"), blacklist_characters="<|"),
                min_size=1, max_size=20).map(str.strip).filter(bool)
tricky = st.sampled_from(['{"a": 1}', '[1, 2, {"b": null}]', "日本語 ✓ 🙂", 'say "hi"', "tab\there", "a\nb"])
texts = st.one_of(words, tricky)
values = st.one_of(st.integers(-10**6, 10**6), texts, st.booleans(), st.none(), st.lists(st.integers(0, 9), max_size=3),
                   st.dictionaries(words, st.integers(0, 9), max_size=2))
arguments = st.dictionaries(words, values, max_size=3)


@st.composite
def rounds(draw: st.DrawFn, *, parallel: bool) -> list[Message]:
    """One user turn answered directly, or through tool calls (then their results and a final answer)."""
    reasoning = st.one_of(st.none(), texts)
    messages = [Message("user", draw(texts))]
    if draw(st.booleans()):
        count = draw(st.integers(1, 3 if parallel else 1))
        calls = tuple(ToolCall(draw(st.sampled_from(["get_weather", "search"])), draw(arguments), f"call{i}")
                      for i in range(count))
        content = draw(st.sampled_from(["", "Let me check."])) if parallel else ""
        messages.append(Message("assistant", content, tool_calls=calls, reasoning=draw(reasoning)))
        messages += [Message("tool", draw(texts), tool_call_id=call.id) for call in calls]
    messages.append(Message("assistant", draw(texts), reasoning=draw(reasoning)))
    return messages


@st.composite
def conversations(draw: st.DrawFn, *, parallel: bool = True) -> Conversation:
    messages = [Message("system", draw(texts))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 4))):
        messages += draw(rounds(parallel=parallel))
    return Conversation(tuple(messages), "gen:1", tools=TOOLS if draw(st.booleans()) else None)


def load(name: str):
    tokenizer = shared_real_tokenizer("qwen2_5" if name == "qwen3" else name)
    spec = str(fixture_path("trl_templates", "qwen3.jinja")) if name == "qwen3" else "auto"
    return tokenizer, load_template(spec, tokenizer)


def references(template, conversation: Conversation, eot: str) -> list[str | None]:
    """Per assistant turn: the prefix-render reference, or None where the template is not prefix-stable."""
    dicts = [_as_dict(m) for m in conversation.messages]
    tools = conversation.tools
    full = template.render_text(dicts, tools=tools)
    found: list[str | None] = []
    for k, message in enumerate(conversation.messages):
        if message.role != "assistant":
            continue
        before = template.render_text(dicts[:k], add_generation_prompt=True, tools=tools)
        upto = template.render_text(dicts[:k + 1], tools=tools)
        generated = upto[len(before):]
        cut = generated.find(eot)
        turn = generated[:cut + len(eot)]
        stable = upto.startswith(before) and cut >= 0 and full.startswith(before + turn)
        if stable and message.reasoning is None and turn.startswith(EMPTY_THINK):
            turn = turn[len(EMPTY_THINK):]  # the template's own empty block: template text, never trained
        found.append(turn if stable else None)
    return found


def trained_texts(segments) -> list[str]:
    """Consecutive trained segments joined: one run per trained turn."""
    out, current = [], None
    for segment in segments:
        if segment.trainable:
            current = (current or "") + segment.text
        elif current is not None and segment.text:
            out.append(current)
            current = None
    return out + ([current] if current is not None else [])


def check_exact(name: str, conversation: Conversation) -> None:
    tokenizer, template = load(name)
    segments = template.render(conversation)
    text = "".join(s.text for s in segments)
    assert text == template.render_text([_as_dict(m) for m in conversation.messages], tools=conversation.tools)
    got = trained_texts(segments)
    expected = references(template, conversation, EOT[name])
    assert len(got) == len(expected)
    for run, reference in zip(got, expected):
        if reference is not None:
            assert run == reference
        assert run.endswith(EOT[name])
    trained = "".join(got)
    for message in conversation.messages:  # never trained, located or not
        if message.role in ("tool", "user", "system"):
            assert all(s.role != message.role for s in segments if s.trainable)
    for tool in conversation.tools or ():
        assert json.dumps(tool["function"]["description"]) not in trained
    # The token labels agree with the segments: decoded trained runs give the same text.
    example = Encoder(tokenizer, template).encode(conversation)
    decoded = [tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
               for flag, ids in runs(example.input_ids, example.labels) if flag]
    normalizer = tokenizer.backend_tokenizer.normalizer  # Qwen's normalises to NFC, Llama 3's keeps the text
    assert "".join(decoded) == (unicodedata.normalize("NFC", trained) if normalizer is not None else trained)
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(example.labels, example.input_ids))


@pytest.mark.fixtures
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations())
def test_qwen2_5_tool_calls_train_exactly_the_prefix_reference(conversation: Conversation) -> None:
    check_exact("qwen2_5", conversation)
    with mock.patch.object(turns, "_regions_at_once", return_value=None):  # the one-render-per-turn path too
        check_exact("qwen2_5", conversation)
    assert all(r is not None for r in references(load("qwen2_5")[1], conversation, EOT["qwen2_5"]))


@pytest.mark.fixtures
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations(parallel=False))
def test_llama3_2_tool_calls_train_exactly_the_prefix_reference(conversation: Conversation) -> None:
    check_exact("llama3_2", conversation)
    assert all(r is not None for r in references(load("llama3_2")[1], conversation, EOT["llama3_2"]))


@pytest.mark.fixtures
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations())
def test_qwen3_reasoning_and_tools_match_the_reference_where_prefix_stable(conversation: Conversation) -> None:
    check_exact("qwen3", conversation)
    with mock.patch.object(turns, "_regions_at_once", return_value=None):
        check_exact("qwen3", conversation)


CALL = ToolCall("get_weather", {"city": "Paris"}, "c1")


@pytest.mark.fixtures
@pytest.mark.parametrize("messages, fragment", [
    ((Message("user", "a"), Message("assistant", "", tool_calls=(CALL, CALL)), Message("tool", "r"),
      Message("tool", "s"), Message("assistant", "b")), "only supports single tool-calls"),
    ((Message("user", "a"), Message("assistant", "Let me see.", tool_calls=(CALL,)), Message("tool", "r"),
      Message("assistant", "b")), "message 2 (assistant) cannot be located exactly: the template drops its content"),
])
def test_llama3_2_refuses_what_it_cannot_render_with_the_reason(messages, fragment: str) -> None:
    _, template = load("llama3_2")
    with pytest.raises(DataError) as info:
        template.render(Conversation(messages, "rows.jsonl:4", tools=TOOLS))
    assert info.value.where == "rows.jsonl:4"
    assert fragment in info.value.detail


@pytest.mark.fixtures
def test_a_tool_call_rendered_as_nothing_is_refused() -> None:
    # A template that reads another tool-call shape than the row's (Llama-3.1 and DeepSeek-V3 templates
    # can render a call as nothing) must not have the turn trained as empty or nameless: here Qwen2.5's
    # template with the function name left out.
    path = fixture_path("trl_templates", "qwen2_5.jinja")
    template = ChatTemplate(path.read_text().replace("tool_call.name", "''"), name=str(path),
                            end_of_turn=("<|im_end|>",))
    conversation = Conversation((Message("user", "a"), Message("assistant", "", tool_calls=(CALL,)),
                                 Message("tool", "r"), Message("assistant", "b")), "rows.jsonl:9", tools=TOOLS)
    with pytest.raises(DataError) as info:
        template.render(conversation)
    assert "message 2 (assistant) cannot be located exactly" in info.value.detail
    assert "renders its tool call 'get_weather' as nothing" in info.value.detail


@pytest.mark.fixtures
def test_qwen3_inline_think_is_moved_to_reasoning_and_trained_once() -> None:
    _, template = load("qwen3")
    inline = Conversation((Message("user", "2+2?"), Message("assistant", "<think>\nAdd them.\n</think>\n\n4")), "r:1")
    explicit = Conversation((Message("user", "2+2?"), Message("assistant", "4", reasoning="Add them.")), "r:1")
    assert trained_texts(template.render(inline)) == ["<think>\nAdd them.\n</think>\n\n4<|im_end|>"]
    assert template.render(inline) == template.render(explicit)


def test_a_template_that_ignores_tools_is_refused_for_rows_with_tools() -> None:
    from sftlab.data.templates import load_template as load_builtin

    conversation = Conversation((Message("user", "a"), Message("assistant", "b")), "rows.jsonl:2", tools=TOOLS)
    with pytest.raises(DataError) as info:
        load_builtin("chatml").render(conversation)
    assert (info.value.where, info.value.reason) == ("rows.jsonl:2", "template ignores tools")
    assert "does not render tool definitions" in info.value.detail
