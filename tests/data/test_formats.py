"""Readers: every format, every file type, and every kind of bad row (error and skip modes).

Bad rows are placed after blank lines and valid rows, so the `file:line` each error names is checked
against a line number that a reader could only get right by counting every physical line.
"""

from __future__ import annotations

import json
import tracemalloc
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import tiny_tokenizer
from sftlab.config import DataConfig
from sftlab.data.dataset import build_dataset
from sftlab.data.encode import Encoder
from sftlab.data.formats import detect_format, iter_rows, read_conversations
from sftlab.data.rejects import RejectLog
from sftlab.data.schema import Conversation
from sftlab.data.templates import load_template
from sftlab.errors import ConfigError, DataError


def row(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def msgs(*pairs: tuple[str, object]) -> str:
    return row({"messages": [{"role": role, "content": content} for role, content in pairs]})


def good(fmt: str, n: int) -> str:
    """A valid row of `fmt`, numbered so the conversations it reads to can be told apart."""
    rows = {
        "messages": {"messages": [{"role": "user", "content": f"q{n}"}, {"role": "assistant", "content": f"a{n}"}]},
        "sharegpt": {"conversations": [{"from": "human", "value": f"q{n}"}, {"from": "gpt", "value": f"a{n}"}]},
        "alpaca": {"instruction": f"q{n}", "output": f"a{n}"},
        "prompt_completion": {"prompt": f"q{n}", "completion": f"a{n}"},
    }
    return row(rows[fmt])


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode("utf-8")) + b"\n" for x in lines))
    return path


def pairs(conversation: Conversation) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in conversation.messages]


# ---------------------------------------------------------------------------------------------- bad rows

BAD_UTF8 = b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}'
BAD_UTF8_AT = BAD_UTF8.index(b"\xe9")


@dataclass(frozen=True)
class Bad:
    id: str
    fmt: str
    line: str | bytes
    reason: str
    fragments: tuple[str, ...]
    """Pieces the message must hold: what is wrong (field or message number), what was expected, the fix."""
    first_row: bool = False
    """Only reachable as the first row, before the format is detected."""

    @property
    def raw(self) -> str:
        """The row's text as rejects.jsonl records it."""
        return self.line.decode("utf-8", "replace") if isinstance(self.line, bytes) else self.line


BAD_ROWS = [
    # -- the list
    Bad("invalid JSON", "messages", '{"messages": [{"role": "user", "content": "hi"}', "invalid JSON",
        ("invalid JSON at column", "expected one JSON object per line")),
    Bad("invalid UTF-8", "messages", BAD_UTF8, "invalid UTF-8",
        (f"invalid UTF-8 at byte {BAD_UTF8_AT} of the line", "Re-encode the file as UTF-8")),
    Bad("unknown role", "messages", msgs(("user", "hi"), ("assistent", "hello")), "unknown role",
        ("message 2 has role 'assistent'", "expected one of system, user, assistant", "data.role_map",
         "data.role_map.assistent=assistant")),
    Bad("missing content", "messages", row({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}),
        "missing content", ("messages[1] field 'content' is missing", "expected a non-empty string",
                            "Add the message's text or remove the message")),
    Bad("null content", "messages", msgs(("user", "hi"), ("assistant", None)), "missing content",
        ("messages[1] field 'content' is missing or null", "expected a non-empty string")),
    Bad("empty content", "messages", msgs(("user", "hi"), ("assistant", "")), "empty content",
        ("message 2 (assistant) has empty content", "expected a non-empty string", "Fill it in or remove")),
    Bad("non-string content", "messages", msgs(("user", "hi"), ("assistant", 42)), "content not a string",
        ("message 2 (assistant) content is a int", "expected a non-empty string", "as one string")),
    Bad("image content part", "messages", msgs(("user", [{"type": "text", "text": "hi"},
                                                         {"type": "image_url", "image_url": {"url": "x"}}]),
                                               ("assistant", "x")),
        "non-text content part", ("messages[0] content[1] is a part of type 'image_url'", "not supported")),
    Bad("tool arguments not JSON", "messages", row({"messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{oops"}}]},
        {"role": "tool", "content": "r"}, {"role": "assistant", "content": "b"}]}),
        "tool arguments not an object", ("messages[1] tool_calls[0] arguments '{oops' are not valid JSON",)),
    Bad("tool arguments a list", "messages", row({"messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
        {"role": "tool", "content": "r"}, {"role": "assistant", "content": "b"}]}),
        "tool arguments not an object", ("message 2 tool_calls[0] (f) arguments are [1]", "expected a JSON object")),
    Bad("tool result first", "messages", msgs(("user", "a"), ("tool", "r"), ("assistant", "b")),
        "tool result without call", ("message 2 is a tool result, but no tool call precedes it",)),
    Bad("tools not a list", "messages", row({"tools": {"name": "f"}, "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
        "tools not a list", ("field 'tools' is", "expected a list of function definitions")),
    Bad("no assistant message", "messages", msgs(("system", "be nice"), ("user", "hi")), "no assistant message",
        ("no assistant message", "add the assistant's reply or remove the row")),
    Bad("only a system message", "messages", msgs(("system", "be nice")), "no assistant message",
        ("only a system message", "expected user and assistant turns")),
    Bad("no messages", "messages", row({"messages": []}), "no messages",
        ("no messages", "expected at least a user and an assistant message", "Fix or remove the row")),
    Bad("system not first", "messages", msgs(("user", "hi"), ("system", "be nice"), ("assistant", "ok")),
        "system not first", ("message 2 has role 'system'", "may only come first", "Merge it")),
    Bad("consecutive users", "messages", msgs(("system", "s"), ("user", "a"), ("user", "b"), ("assistant", "c")),
        "consecutive same roles", ("messages 2 and 3 both have role 'user'", "expected user and assistant to "
                                   "alternate", "Merge the two messages into one")),
    Bad("consecutive assistants", "messages", msgs(("user", "a"), ("assistant", "b"), ("assistant", "c")),
        "consecutive same roles", ("messages 2 and 3 both have role 'assistant'",)),
    Bad("trailing user turn", "messages", msgs(("user", "a"), ("assistant", "b"), ("user", "c")),
        "trailing user turn", ("the last message (message 3) has role 'user'", "end with an assistant reply",
                               "drop the trailing user turn")),
    Bad("starts with assistant", "messages", msgs(("system", "s"), ("assistant", "b"), ("user", "c"),
                                                  ("assistant", "d")),
        "does not start with user", ("role 'assistant'", "expected 'user'", "Add the user's message")),
    Bad("train not a bool", "messages",
        row({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "train": "yes"}]}),
        "train not a bool", ("message 2 field 'train' is 'yes'", "expected true or false", "data.train_on")),
    # -- messages-format structure
    Bad("messages not a list", "messages", row({"messages": "hi"}), "messages not a list",
        ("field 'messages' is a str", "expected a list of {role, content} objects")),
    Bad("message not an object", "messages", row({"messages": ["hi", "there"]}), "message not an object",
        ("messages[0] is a str", "expected an object with 'role' and 'content'")),
    Bad("missing role", "messages", row({"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}),
        "missing role", ("messages[1] has no 'role' field", "expected one of system, user, assistant")),
    Bad("list role", "messages", row({"messages": [{"role": ["user"], "content": "a"},
                                                   {"role": "assistant", "content": "b"}]}),
        "unknown role", ("message 1 has role ['user']", "data.role_map")),
    Bad("messages key missing", "messages", row({"conversation": []}), "missing messages",
        ("field 'messages' is missing", "expected a list of {role, content} objects")),
    Bad("row not an object", "messages", row([{"role": "user", "content": "a"}]), "not an object",
        ("the row is a JSON list", "expected an object with field 'messages'")),
    # -- sharegpt
    Bad("sharegpt missing from", "sharegpt", row({"conversations": [{"from": "human", "value": "a"},
                                                                    {"value": "b"}]}),
        "missing role", ("conversations[1] has no 'from' field",)),
    Bad("sharegpt missing value", "sharegpt", row({"conversations": [{"from": "human", "value": "a"},
                                                                     {"from": "gpt"}]}),
        "missing content", ("conversations[1] field 'value' is missing", "expected a non-empty string")),
    Bad("sharegpt unknown role", "sharegpt", row({"conversations": [{"from": "human", "value": "a"},
                                                                    {"from": "bot", "value": "b"}]}),
        "unknown role", ("message 2 has role 'bot'", "data.role_map.bot=assistant")),
    Bad("sharegpt not a list", "sharegpt", row({"conversations": {"from": "human", "value": "a"}}),
        "conversations not a list", ("field 'conversations' is a dict", "expected a list of {from, value}")),
    # -- alpaca
    Bad("alpaca missing output", "alpaca", row({"instruction": "a", "input": "b"}), "missing output",
        ("field 'output' is missing", "expected a non-empty string")),
    Bad("alpaca empty instruction", "alpaca", row({"instruction": "", "output": "b"}), "empty content",
        ("field 'instruction' is empty", "expected a non-empty string")),
    Bad("alpaca non-string input", "alpaca", row({"instruction": "a", "input": 5, "output": "b"}),
        "content not a string", ("field 'input' is a int", "expected a string (or leave it out)")),
    Bad("alpaca falsy non-string input", "alpaca", row({"instruction": "a", "input": 0, "output": "b"}),
        "content not a string", ("field 'input' is a int",)),
    Bad("alpaca non-string system", "alpaca", row({"instruction": "a", "output": "b", "system": ["s"]}),
        "content not a string", ("message 1 (system) content is a list",)),
    # -- prompt/completion
    Bad("prompt/completion missing completion", "prompt_completion", row({"prompt": "a"}), "missing completion",
        ("field 'completion' is missing", "expected a string or a list of messages")),
    Bad("prompt/completion missing prompt", "prompt_completion", row({"completion": "a"}), "missing prompt",
        ("field 'prompt' is missing",)),
    Bad("prompt not a string", "prompt_completion", row({"prompt": 3, "completion": "a"}), "content not a string",
        ("field 'prompt' is a int", "expected a non-empty string")),
    Bad("completion empty", "prompt_completion", row({"prompt": "q", "completion": ""}), "empty content",
        ("field 'completion' is empty",)),
    Bad("completion not assistant", "prompt_completion",
        row({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]}),
        "completion not assistant", ("field 'completion' holds a non-assistant message",
                                     "expected only assistant messages")),
    Bad("conversational completion not a list", "prompt_completion",
        row({"prompt": [{"role": "user", "content": "q"}], "completion": "a"}), "completion not a list",
        ("field 'completion' is a str", "expected a list")),
    # -- rows whose format cannot be detected (only possible before the format is known)
    Bad("unknown format", "messages", row({"question": "q", "answer": "a"}), "unknown format",
        ("cannot tell the row's format from its keys ['answer', 'question']", "'messages'",
         "'instruction'+'output' (alpaca)", "Set data.format"), first_row=True),
    Bad("alpaca without output is undetectable", "messages", row({"instruction": "q"}), "unknown format",
        ("keys ['instruction']", "Set data.format"), first_row=True),
    Bad("first row a JSON string", "messages", row("hello"), "unknown format",
        ("the row is a JSON str", "expected an object such as"), first_row=True),
]


def bad_file(tmp_path: Path, case: Bad) -> tuple[Path, int, int]:
    """A file with `case` after valid rows and blank lines; returns (path, its line, good rows before it)."""
    if case.first_row:
        lines: list[str | bytes] = ["", "   ", "", case.line, good(case.fmt, 9)]
        return write_lines(tmp_path / "data.jsonl", lines), 4, 0
    lines = [good(case.fmt, 1), "", good(case.fmt, 2), "", "  \t", case.line, good(case.fmt, 3)]
    return write_lines(tmp_path / "data.jsonl", lines), 6, 2


@pytest.mark.parametrize("case", BAD_ROWS, ids=[c.id for c in BAD_ROWS])
def test_bad_row_error_names_file_line_field_and_fix(tmp_path: Path, case: Bad) -> None:
    path, line, good_before = bad_file(tmp_path, case)
    read: list[Conversation] = []
    with pytest.raises(DataError) as info:
        for conversation in read_conversations(path):
            read.append(conversation)
    error = info.value
    assert len(read) == good_before  # rows before the bad one were streamed out first
    assert error.where == f"{path}:{line}"
    assert str(error).startswith(f"{path}:{line}: ")
    assert error.reason == case.reason
    for fragment in case.fragments:
        assert fragment in str(error), f"{fragment!r} not in {str(error)!r}"


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca", "prompt_completion"])
def test_skip_keeps_good_rows_and_logs_every_bad_one(tmp_path: Path, fmt: str) -> None:
    cases = [c for c in BAD_ROWS if c.fmt == fmt]
    lines: list[str | bytes] = [""]
    good_rows: list[tuple[int, str]] = []
    expected_rejects: list[tuple[int, Bad]] = []
    for case in sorted(cases, key=lambda c: not c.first_row):  # undetectable rows must come first
        if not case.first_row:
            lines.append(good(fmt, len(lines)))
            good_rows.append((len(lines), f"a{len(lines) - 1}"))
            lines.append("")
        lines.append(case.line)
        expected_rejects.append((len(lines), case))
    lines.append(good(fmt, len(lines)))
    good_rows.append((len(lines), f"a{len(lines) - 1}"))
    path = write_lines(tmp_path / "mixed.jsonl", lines)

    with RejectLog(tmp_path / "out" / "rejects.jsonl") as log:
        read = list(read_conversations(path, on_bad_row="skip", rejects=log))

    assert [(c.where, c.messages[-1].content) for c in read] == [(f"{path}:{n}", a) for n, a in good_rows]
    records = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text("utf-8").splitlines()]
    assert [r["where"] for r in records] == [f"{path}:{n}" for n, _ in expected_rejects]
    assert [r["reason"] for r in records] == [c.reason for _, c in expected_rejects]
    assert [r["row"] for r in records] == [c.raw for _, c in expected_rejects]
    for record, (_, case) in zip(records, expected_rejects):
        assert set(record) == {"where", "reason", "message", "row"}
        assert case.fragments[0] in record["message"]
        assert not record["message"].startswith(str(path))  # `where` is its own field
    assert log.counts == Counter(c.reason for _, c in expected_rejects)
    non_blank = sum(1 for x in lines if x.strip())
    assert len(read) + log.total == non_blank  # no row lost


def test_skip_without_a_log_still_counts(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [good("messages", 1), "{oops", msgs(("user", "x"))])
    read = list(read_conversations(path, on_bad_row="skip"))
    assert [pairs(c) for c in read] == [[("user", "q1"), ("assistant", "a1")]]


def test_reject_log_writes_nothing_without_rejects(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [good("messages", 1)])
    with RejectLog(tmp_path / "rejects.jsonl") as log:
        assert len(list(read_conversations(path, on_bad_row="skip", rejects=log))) == 1
    assert log.total == 0
    assert not (tmp_path / "rejects.jsonl").exists()


def test_build_dataset_skip_writes_rejects_and_counts_every_row(tmp_path: Path) -> None:
    cases = [c for c in BAD_ROWS if c.fmt == "messages" and not c.first_row]
    long_row = msgs(("user", "long"), ("assistant", " ".join(["Paris quantum dice"] * 40)))
    lines: list[str | bytes] = []
    for n, case in enumerate(cases):
        lines += [good("messages", n), case.line, ""]
    lines += [long_row, good("messages", 99)]
    path = write_lines(tmp_path / "data.jsonl", lines)
    tokenizer = tiny_tokenizer()
    encoder = Encoder(tokenizer, load_template("chatml", tokenizer), add_special_tokens=True, max_seq_len=64)
    rejects_path = tmp_path / "run" / "rejects.jsonl"

    dataset = build_dataset(path, DataConfig(on_bad_row="skip", cache=False), encoder, rejects_path=rejects_path)

    good_count = len(cases) + 1
    assert len(dataset) == good_count
    assert dataset.stats.rows == len(cases) * 2 + 2 == sum(1 for x in lines if x != "")
    assert dataset.stats.examples == good_count
    expected = Counter(c.reason for c in cases) + Counter({"too long": 1})
    assert dataset.stats.rejected == dict(expected)
    assert [dataset.where(i) for i in range(len(dataset))] == (
        [f"{path}:{3 * n + 1}" for n in range(len(cases))] + [f"{path}:{len(lines)}"])
    records = [json.loads(x) for x in rejects_path.read_text("utf-8").splitlines()]
    assert [(r["where"], r["reason"], r["row"]) for r in records[:-1]] == [
        (f"{path}:{3 * n + 2}", c.reason, c.raw) for n, c in enumerate(cases)]
    too_long = records[-1]
    assert (too_long["where"], too_long["reason"]) == (f"{path}:{len(lines) - 1}", "too long")
    assert "data.max_seq_len=64" in too_long["message"]
    assert json.loads(too_long["row"]) == json.loads(long_row)  # fed back as a messages row
    assert dataset.stats.examples + sum(dataset.stats.rejected.values()) == dataset.stats.rows


def test_error_mode_is_the_default(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [good("messages", 1), "{oops"])
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        list(read_conversations(path))


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"on_bad_row": "ignore"}, "data.on_bad_row must be error or skip; found 'ignore'"),
    ({"format": "chatgpt"}, "data.format must be one of auto, messages, prompt_completion, alpaca, sharegpt"),
])
def test_bad_reader_settings(tmp_path: Path, kwargs: dict, fragment: str) -> None:
    path = write_lines(tmp_path / "d.jsonl", [good("messages", 1)])
    with pytest.raises(ConfigError) as info:
        list(read_conversations(path, **kwargs))
    assert fragment in str(info.value)


@pytest.mark.parametrize(("name", "fragment"), [
    ("missing.jsonl", "does not exist; check data.train / data.eval or the DATA argument"),
    ("data.csv", "unsupported file type '.csv'; expected .jsonl, .json or .parquet"),
])
def test_unreadable_files(tmp_path: Path, name: str, fragment: str) -> None:
    if name.endswith(".csv"):
        (tmp_path / name).write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        iter_rows(tmp_path / name)
    assert fragment in str(info.value)


# ------------------------------------------------------------------------------------------------ formats

@pytest.mark.parametrize(("value", "fmt"), [
    ({"messages": []}, "messages"),
    ({"conversations": []}, "sharegpt"),
    ({"instruction": "a", "output": "b"}, "alpaca"),
    ({"instruction": "a", "input": "", "output": "b", "system": "s"}, "alpaca"),
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"prompt": [], "completion": []}, "prompt_completion"),
    ({"messages": [], "conversations": []}, "messages"),
    ({"instruction": "a"}, None),
    ({"prompt": "a"}, None),
    ({}, None),
    ([{"role": "user"}], None),
    ("messages", None),
])
def test_detect_format(value: object, fmt: str | None) -> None:
    assert detect_format(value) == fmt


# (format, row, expected messages as (role, content, train))
READS = [
    ("messages-system-train", "auto", {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "train": False}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "train": True}]},
     [("system", "Be brief.", None), ("user", "Hi", None), ("assistant", "Hello!", False),
      ("user", "2+2?", None), ("assistant", "4", True)]),
    ("messages-train-on-user", "messages", {"messages": [
        {"role": "user", "content": "Hi", "train": True}, {"role": "assistant", "content": "Yo"}]},
     [("user", "Hi", True), ("assistant", "Yo", None)]),
    ("sharegpt", "auto", {"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Bye"},
        {"from": "gpt", "value": "Bye!", "train": False}]},
     [("system", "Be brief.", None), ("user", "Hi", None), ("assistant", "Hello!", None), ("user", "Bye", None),
      ("assistant", "Bye!", False)]),
    ("sharegpt-user-assistant-names", "sharegpt", {"conversations": [
        {"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Yo"}]},
     [("user", "Hi", None), ("assistant", "Yo", None)]),
    ("alpaca-input", "auto", {"instruction": "Translate.", "input": "chat", "output": "cat"},
     [("user", "Translate.\n\nchat", None), ("assistant", "cat", None)]),
    ("alpaca-no-input", "auto", {"instruction": "Say hi.", "output": "hi"},
     [("user", "Say hi.", None), ("assistant", "hi", None)]),
    ("alpaca-empty-input", "auto", {"instruction": "Say hi.", "input": "", "output": "hi"},
     [("user", "Say hi.", None), ("assistant", "hi", None)]),
    ("alpaca-null-input-empty-system", "alpaca", {"instruction": "Say hi.", "input": None, "output": "hi",
                                                  "system": ""},
     [("user", "Say hi.", None), ("assistant", "hi", None)]),
    ("alpaca-system", "auto", {"system": "Be kind.", "instruction": "Greet.", "input": "Bob", "output": "Hi Bob"},
     [("system", "Be kind.", None), ("user", "Greet.\n\nBob", None), ("assistant", "Hi Bob", None)]),
    ("prompt-completion-strings", "auto", {"prompt": "2+2?", "completion": "4"},
     [("user", "2+2?", None), ("assistant", "4", None)]),
    ("prompt-completion-conversational", "auto", {
        "prompt": [{"role": "system", "content": "Math."}, {"role": "user", "content": "2+2?"}],
        "completion": [{"role": "assistant", "content": "4", "train": True}]},
     [("system", "Math.", None), ("user", "2+2?", None), ("assistant", "4", True)]),
]


@pytest.mark.parametrize(("fmt", "value", "expected"), [r[1:] for r in READS], ids=[r[0] for r in READS])
def test_reads_each_format(tmp_path: Path, fmt: str, value: dict, expected: list) -> None:
    path = write_lines(tmp_path / "d.jsonl", ["", row(value)])
    [conversation] = read_conversations(path, format=fmt)
    assert conversation.where == f"{path}:2"
    assert [(m.role, m.content, m.train) for m in conversation.messages] == expected


def test_role_map_maps_other_roles(tmp_path: Path) -> None:
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}]}
    messages = {"messages": [{"role": "human", "content": "Hi"}, {"role": "bot", "content": "Yo"}]}
    for value in (sharegpt, messages):
        path = write_lines(tmp_path / "d.jsonl", [row(value)])
        [conversation] = read_conversations(path, role_map={"bot": "assistant", "human": "user"})
        assert pairs(conversation) == [("user", "Hi"), ("assistant", "Yo")]


def test_role_map_overrides_sharegpt_names(tmp_path: Path) -> None:
    value = {"conversations": [{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "Yo"}]}
    path = write_lines(tmp_path / "d.jsonl", [row(value)])
    [conversation] = read_conversations(path, role_map={"gpt": "user", "human": "assistant"})
    assert pairs(conversation) == [("user", "Hi"), ("assistant", "Yo")]


def test_explicit_format_wins_over_detection(tmp_path: Path) -> None:
    value = {"messages": [{"role": "user", "content": "from messages"}, {"role": "assistant", "content": "m"}],
             "conversations": [{"from": "human", "value": "from sharegpt"}, {"from": "gpt", "value": "s"}]}
    path = write_lines(tmp_path / "d.jsonl", [row(value)])
    assert pairs(next(read_conversations(path)))[0] == ("user", "from messages")
    assert pairs(next(read_conversations(path, format="sharegpt")))[0] == ("user", "from sharegpt")


def test_explicit_format_that_does_not_fit_names_the_missing_field(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [good("messages", 1)])
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'instruction' is missing"):
        list(read_conversations(path, format="alpaca"))


def test_format_is_fixed_by_the_first_row(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [good("alpaca", 1), good("messages", 2)])
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'instruction' is missing"):
        list(read_conversations(path))


def test_crlf_lines_and_unicode(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes((msgs(("user", "héllo 🌍"), ("assistant", "日本")) + "\r\n\r\n" + good("messages", 2)
                      + "\r\n").encode("utf-8"))
    read = list(read_conversations(path))
    assert [c.where for c in read] == [f"{path}:1", f"{path}:3"]
    assert pairs(read[0]) == [("user", "héllo 🌍"), ("assistant", "日本")]


# --------------------------------------------------------------------------------------------- file types

SAMPLES = {
    "messages": [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!", "train": False}, {"role": "user", "content": "?"},
                      {"role": "assistant", "content": "Yes.", "train": True}]},
        {"messages": [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "🌍"}]},
    ],
    "sharegpt": [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                           {"from": "gpt", "value": "A"}]},
    ],
    "alpaca": [
        {"instruction": "Translate.", "input": "chat", "output": "cat", "system": None},
        {"instruction": "Say hi.", "input": None, "output": "hi", "system": "Be kind."},
    ],
    "prompt_completion": [{"prompt": "2+2?", "completion": "4"}, {"prompt": "Capital?", "completion": "Paris"}],
}


def read_all(path: Path) -> list[list[tuple[str, str, bool | None]]]:
    return [[(m.role, m.content, m.train) for m in c.messages] for c in read_conversations(path)]


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_json_array_and_parquet_read_like_jsonl(tmp_path: Path, fmt: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = SAMPLES[fmt]
    jsonl = write_lines(tmp_path / "d.jsonl", [row(r) for r in rows])
    json_path = tmp_path / "d.json"
    json_path.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)

    expected = read_all(jsonl)
    assert len(expected) == len(rows)
    assert read_all(json_path) == expected
    assert read_all(parquet) == expected
    assert [c.where for c in read_conversations(parquet)] == [f"{parquet}:row 1", f"{parquet}:row 2"]


def test_json_array_line_numbers_of_pretty_printed_items(tmp_path: Path) -> None:
    rows = SAMPLES["messages"] + [SAMPLES["messages"][1]]
    text = "\n\n" + json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
    starts = [n for n, line in enumerate(text.split("\n"), start=1) if line == "  {"]
    assert len(starts) == 3 and starts[0] == 4  # two blank lines, then "[", then the first item
    path = tmp_path / "d.json"
    path.write_text(text, encoding="utf-8")
    assert [c.where for c in read_conversations(path)] == [f"{path}:{n}" for n in starts]


def test_json_array_compact_items_on_shared_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(f'[{good("messages", 1)}, {good("messages", 2)},\n\n {good("messages", 3)}\n]',
                    encoding="utf-8")
    assert [c.where for c in read_conversations(path)] == [f"{path}:1", f"{path}:1", f"{path}:3"]


def test_json_array_bad_item_error_and_skip(tmp_path: Path) -> None:
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistent", "content": "a"}]}
    rows = [SAMPLES["messages"][0], bad, SAMPLES["messages"][1]]
    text = json.dumps(rows, indent=2)
    bad_line = [n for n, line in enumerate(text.split("\n"), start=1) if line == "  {"][1]
    path = tmp_path / "d.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as info:
        list(read_conversations(path))
    assert str(info.value).startswith(f"{path}:{bad_line}: message 2 has role 'assistent'")

    with RejectLog(tmp_path / "rejects.jsonl") as log:
        assert len(list(read_conversations(path, on_bad_row="skip", rejects=log))) == 2
    [record] = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text("utf-8").splitlines()]
    assert record["where"] == f"{path}:{bad_line}"
    assert json.loads(record["row"]) == bad  # the item's own text, not the whole file


@pytest.mark.parametrize(("text", "line", "fragment"), [
    ('[\n  {"messages": []},\n  {"messages": [}\n]', 3, "invalid JSON"),
    ('[\n  {"prompt": "a", "completion": "b"}\n  {"prompt": "c", "completion": "d"}\n]', 3,
     "expected ',' or ']' after a row"),
    ('\n{"messages": []}\n', 1, "expected a JSON array of rows"),
])
def test_json_file_that_is_not_an_array_of_rows(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    path = tmp_path / "d.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as info:
        list(iter_rows(path))
    assert info.value.where == f"{path}:{line}"
    assert fragment in str(info.value)


def test_json_file_with_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_bytes(b'[{"prompt": "caf\xe9", "completion": "b"}]')
    with pytest.raises(DataError, match="invalid UTF-8 at byte 16"):
        list(iter_rows(path))


def test_parquet_bad_row_names_its_row_number(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ""}]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError) as info:
        list(read_conversations(path))
    assert str(info.value).startswith(f"{path}:row 2: field 'completion' is empty")


def test_jsonl_is_streamed(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    garbage = b"\xff not json at all\n" * 400_000  # ~7.6 MB, never valid
    path.write_bytes(good("messages", 1).encode() + b"\n" + garbage)
    tracemalloc.start()
    try:
        conversations = read_conversations(path)
        first = next(conversations)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert pairs(first) == [("user", "q1"), ("assistant", "a1")]
    assert peak < 1_000_000, f"reading one row allocated {peak} bytes: the file was read whole"
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid UTF-8"):
        next(conversations)

