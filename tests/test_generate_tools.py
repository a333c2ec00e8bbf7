"""Tools at inference (issue 15, Build 5): tools rendered through the real template, tool calls parsed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import shared_real_tokenizer
from sftlab.data.templates import load_template
from sftlab.errors import ConfigError
from sftlab.generate import load_tools, parse_tool_calls, prompt_ids, show_reply

TOOLS = [{"type": "function", "function": {"name": "order_status", "description": "Look up an order.",
                                           "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}}]


@pytest.mark.fixtures
@pytest.mark.parametrize("name", ["qwen2_5", "llama3_2"])
def test_prompt_renders_the_tools_as_apply_chat_template_does(name: str) -> None:
    tokenizer = shared_real_tokenizer(name)
    template = load_template("auto", tokenizer)
    messages = [{"role": "user", "content": "Where is A-1?"}]
    ids = prompt_ids(tokenizer, template, messages, TOOLS)
    expected = tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert "Look up an order." in tokenizer.decode(ids)


@pytest.mark.parametrize("text, calls", [
    ('<tool_call>\n{"name": "order_status", "arguments": {"id": "A-1"}}\n</tool_call>',
     [{"name": "order_status", "arguments": {"id": "A-1"}}]),
    ('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": {"x": 1}}\n'
     '</tool_call>', [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]),
    ('{"name": "order_status", "parameters": {"id": "A-1"}}', [{"name": "order_status", "arguments": {"id": "A-1"}}]),
    ('[TOOL_CALLS][{"name": "f", "arguments": {"q": "x"}}]', [{"name": "f", "arguments": {"q": "x"}}]),
    ("It shipped yesterday.", None),
    ('<tool_call>\n{"name": broken json\n</tool_call>', None),
    ('{"answer": 4}', None),
])
def test_parse_tool_calls_knows_the_common_formats_and_nothing_else(text: str, calls) -> None:
    assert parse_tool_calls(text) == calls
    shown = show_reply(text)
    assert shown == (text if calls is None else "\n".join("tool call: " + json.dumps(c) for c in calls))


def test_load_tools_refuses_what_is_not_a_list_of_definitions(tmp_path: Path) -> None:
    good, bad = tmp_path / "tools.json", tmp_path / "bad.json"
    good.write_text(json.dumps(TOOLS), encoding="utf-8")
    bad.write_text('{"name": "f"}', encoding="utf-8")
    assert load_tools(str(good)) == TOOLS and load_tools(None) is None
    with pytest.raises(ConfigError, match="expected a JSON list of function definitions"):
        load_tools(str(bad))
