"""Readers and `check` for tool-calling and reasoning rows (issue 15): every field either used or
reported, and nothing of a tool result, schema or prompt trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import shared_real_tokenizer
from sftlab.config import DataConfig
from sftlab.data import quality
from sftlab.data.encode import Encoder
from sftlab.data.formats import field_report, read_conversations
from sftlab.data.schema import Message, ToolCall
from sftlab.data.templates import load_template

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


def read(tmp_path: Path, *rows: dict, **kwargs) -> list:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return list(read_conversations(path, **kwargs))


def test_openai_tool_calling_row_is_read_whole(tmp_path: Path) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    [conversation] = read(tmp_path, {"tools": tools, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "reasoning": "think",
         "tool_calls": [{"type": "function", "id": "c1", "function": {"name": "f", "arguments": "{\"x\": [1]}"}}]},
        {"role": "tool", "content": "r", "tool_call_id": "c1", "name": "f"},
        {"role": "assistant", "content": "done", "thinking": "t2"}]})
    user, call, result, answer = conversation.messages
    assert user == Message("user", "a b")
    assert call == Message("assistant", "", tool_calls=(ToolCall("f", {"x": [1]}, "c1"),), reasoning="think")
    assert result == Message("tool", "r", tool_call_id="c1", name="f")
    assert answer.reasoning == "t2"
    assert conversation.tools == tuple(tools)


def test_sharegpt_system_function_call_and_observation(tmp_path: Path) -> None:
    [conversation] = read(tmp_path, {"system": "Be brief.", "tools": json.dumps([{"name": "f"}]), "conversations": [
        {"from": "human", "value": "q"}, {"from": "function_call", "value": "{\"name\": \"f\", \"arguments\": {}}"},
        {"from": "observation", "value": "42"}, {"from": "gpt", "value": "It is 42."}]})
    assert [m.role for m in conversation.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert conversation.messages[0].content == "Be brief."
    assert conversation.messages[2].tool_calls == (ToolCall("f", {}),)
    assert conversation.tools == ({"name": "f"},)


def test_alpaca_history_becomes_earlier_turns(tmp_path: Path) -> None:
    [conversation] = read(tmp_path, {"instruction": "c", "output": "d", "history": [["a", "b"]]})
    assert [(m.role, m.content) for m in conversation.messages] == [
        ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]


def test_field_report_names_used_and_ignored_fields(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    rows = [{"tools": [], "metadata": 1, "messages": [{"role": "user", "content": "a", "weight": 2},
                                                       {"role": "assistant", "content": "b", "weight": 1}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert field_report(path) == {
        "messages": {"rows": 2, "used": True}, "messages[].content": {"rows": 2, "used": True},
        "messages[].role": {"rows": 2, "used": True}, "messages[].weight": {"rows": 1, "used": False},
        "metadata": {"rows": 1, "used": False}, "tools": {"rows": 1, "used": True}}


@pytest.mark.fixtures
def test_check_on_the_tool_example_reports_roles_fields_and_unknown_calls(tmp_path: Path) -> None:
    tokenizer = shared_real_tokenizer("qwen2_5")
    encoder = Encoder(tokenizer, load_template("auto", tokenizer))
    rows = (EXAMPLES / "tools.jsonl").read_text(encoding="utf-8").splitlines()
    bad = json.loads(rows[0])
    bad["messages"][2]["tool_calls"][0]["function"]["name"] = "refund"  # not among the row's tools
    bad["messages"][4]["reasoning_content"] = "Qwen2.5's template has no place for this."
    bad["source"] = "forum"
    path = tmp_path / "tools.jsonl"
    path.write_text("\n".join(rows + [json.dumps(bad)]) + "\n", encoding="utf-8")
    report = quality.analyze(path, DataConfig(train=str(path)), encoder)
    assert (report.rows, report.examples, report.rejected) == (4, 4, {})
    assert report.messages["tool"] == 4
    assert report.roles["tool"].tokens > 0 and report.roles["tool"].trained_tokens == 0
    assert report.roles["tool_call"].trained_tokens == report.roles["tool_call"].tokens > 0
    assert report.fields["tools"] == {"rows": 4, "used": True}
    assert report.fields["source"] == {"rows": 1, "used": False}
    assert report.unknown_tool_calls == 1
    assert report.reasoning_not_rendered == 1
    assert "source on 1 rows: ignored (sftlab does not read it)." in report.warnings
    assert any("tool calls naming a function absent" in w for w in report.warnings)


def test_examples_chat_file_has_no_broken_row() -> None:
    assert len(list(read_conversations(EXAMPLES / "chat.jsonl"))) == 4
    assert len(list(read_conversations(EXAMPLES / "reasoning.jsonl"))) == 2
    assert len(list(read_conversations(EXAMPLES / "tools.jsonl"))) == 3
    assert len(list(read_conversations(EXAMPLES / "broken.jsonl", on_bad_row="skip"))) == 1


@pytest.mark.fixtures
def test_a_preference_pair_may_answer_with_a_tool_call() -> None:
    from sftlab.data.preference import pair_row, to_pair

    tools = [{"type": "function", "function": {"name": "order_status", "parameters": {"type": "object"}}}]
    call = {"type": "function", "id": "c1", "function": {"name": "order_status", "arguments": {"order_id": "A-1"}}}
    row = {"tools": tools, "prompt": [{"role": "user", "content": "Where is A-1?"}],
           "chosen": [{"role": "assistant", "content": None, "tool_calls": [call]}],
           "rejected": [{"role": "assistant", "content": None, "tool_calls": [
               {**call, "function": {**call["function"], "arguments": {"order_id": "B-2"}}}]}]}
    pair = to_pair(row, "pairs.jsonl:3")
    tokenizer = shared_real_tokenizer("qwen2_5")
    template = load_template("auto", tokenizer)
    chosen, rejected = (template.render(c) for c in pair.conversations())
    trained = ["".join(s.text for s in side if s.trainable) for side in (chosen, rejected)]
    assert trained == [f'<tool_call>\n{{"name": "order_status", "arguments": {{"order_id": "{order}"}}}}\n'
                       '</tool_call><|im_end|>' for order in ("A-1", "B-2")]
    assert "order_status" in "".join(s.text for s in chosen if not s.trainable)  # the schema, untrained
    assert json.loads(pair_row(pair))["tools"] == tools  # a rejected pair is written back whole


def test_equal_tool_schemas_across_rows_are_one_object_and_render_as_each_rows_own(tmp_path: Path) -> None:
    """The readers hand out one object for equal schemas (what the template's `tojson` memo and the render cap
    key on), and only for equal ones: 1, 1.0 and true, or another key order, stay apart."""
    from sftlab.data.templates import _tools_chars

    def tool(name: str, default: object, order: bool = True) -> dict:
        schema = {"type": "object", "properties": {"n": {"type": "number", "default": default}}}
        function = {"name": name, "parameters": schema} if order else {"parameters": schema, "name": name}
        return {"type": "function", "function": function}

    variants = [tool("f", 1), tool("f", 1.0), tool("f", True), tool("f", 1, order=False), tool("g", "é\u2028")]
    rows = [{"tools": [v, tool("f", 1)], "messages": [{"role": "user", "content": "q"},
                                                     {"role": "assistant", "content": "a"}]} for v in variants]
    conversations = read(tmp_path, *rows, *rows)
    firsts = [c.tools[0] for c in conversations]
    assert all(a is b for a, b in zip(firsts[:5], firsts[5:]))  # the same schema again: the same object
    assert len({id(t) for t in firsts[:5]}) == 5  # equal under ==, but not the same JSON: never merged
    assert [c.tools[0] for c in conversations[:5]] == variants and conversations[0].tools[1] is firsts[0]
    assert [json.dumps(list(c.tools)) for c in conversations[:5]] == [json.dumps([v, tool("f", 1)]) for v in variants]
    for c in conversations:  # the render cap's size from the pool equals the JSON's
        assert _tools_chars(c.tools) == len(json.dumps(list(c.tools), ensure_ascii=False))


def test_the_tool_pool_is_bounded_and_skips_what_it_cannot_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from sftlab.data import schema

    pool = schema.ToolPool()
    monkeypatch.setattr(schema, "TOOL_POOL_ITEMS", 3)
    made = [{"name": str(i)} for i in range(7)]
    assert [pool.pooled(t) for t in made] == made
    assert len(pool._by_bytes) <= 3 and pool.json_size(made[-1]) == len(json.dumps(made[-1]))
    assert pool.json_size({"name": "6"}) is None  # not the pooled object itself
    odd = {"name": "f", "default": object()}  # not plain JSON: handed back as it is, never pooled
    assert pool.pooled(odd) is odd and pool.json_size(odd) is None
