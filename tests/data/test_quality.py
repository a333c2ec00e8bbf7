"""`sftlab check`'s report: exact counts on a dataset with one of each kind of flaw, per-role trained shares
and lengths checked against an independent count, batching, and the verdict when nothing is trained."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from conftest import tiny_tokenizer
from sftlab.config import DataConfig
from sftlab.data import quality
from sftlab.data.encode import IGNORE_INDEX, ROLE_CODES, Encoder
from sftlab.data.schema import Conversation, Message
from sftlab.data.templates import Segment, load_template

MAX_SEQ_LEN = 93
"""Exactly the multi-turn row's length: it is kept, and only the long row is over."""
LONG_ANSWER = " ".join(["Imagine you have two magic dice."] * 16)
QA = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
MULTI_TURN = [{"role": "system", "content": "You are a helpful AI."},
              {"role": "user", "content": "Hello! How can I help you today?"},
              {"role": "assistant", "content": "The capital of France is Paris.", "train": False},
              {"role": "user", "content": "And then?"},
              {"role": "assistant", "content": "Imagine you have two magic dice..."}]
ROWS: list[object] = [
    {"messages": QA},                                                                  # 1
    {"messages": QA},                                                                  # 2 exact duplicate of 1
    {"messages": [QA[0], {"role": "assistant", "content": "It is 5."}]},               # 3 same prompt, new answer
    {"messages": [QA[0], {"role": "assistant", "content": "It is 22."}]},              # 4 and a third answer
    {"messages": MULTI_TURN},                                                          # 5 one answer untrained
    {"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "Hello!"}]},  # 6 blank
    {"messages": [{"role": "user", "content": "Explain quantum entanglement like I'm five."},
                  {"role": "assistant", "content": LONG_ANSWER}]},                     # 7 too long
    "{not json",                                                                       # 8 bad row
    {"messages": [{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!", "train": False}]},        # 9 nothing trained
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hey"}]},  # 10 unknown role
]
EXAMPLE_ROWS = (0, 1, 2, 3, 4, 5)  # indices of ROWS that become examples under truncation=drop
TOO_LONG_ROW = 6


def write_rows(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def make_encoder(truncation: str = "drop") -> Encoder:
    tok = tiny_tokenizer()
    return Encoder(tok, load_template("chatml", tok), max_seq_len=MAX_SEQ_LEN, truncation=truncation,
                   add_special_tokens=True)


def conversation(row: dict) -> Conversation:
    return Conversation(tuple(Message(m["role"], m["content"], m.get("train")) for m in row["messages"]))


def analyze(tmp_path: Path, rows: list[object] = ROWS, truncation: str = "drop",
            **config: object) -> quality.QualityReport:
    data = write_rows(tmp_path / "data.jsonl", rows)
    cfg = DataConfig(max_seq_len=MAX_SEQ_LEN, truncation=truncation, **config)  # type: ignore[arg-type]
    return quality.analyze(data, cfg, make_encoder(truncation), rejects_path=tmp_path / "rejects.jsonl")


def test_counts_every_kind_of_flaw(tmp_path: Path) -> None:
    report = analyze(tmp_path)
    assert report.ok and report.problems == []
    assert report.rows == 10
    assert report.rejected == {"invalid JSON": 1, "unknown role": 1}
    assert report.dropped == {"too long": 1, "no trained tokens": 1}
    assert (report.examples, report.conversations) == (6, 8)
    assert report.rows == sum(report.rejected.values()) + sum(report.dropped.values()) + report.examples
    assert (report.dropped_too_long, report.no_trained_tokens, report.truncated) == (1, 1, 0)
    assert (report.duplicates, report.conflicting_prompts, report.blank_messages) == (1, 1, 1)  # 3 answers: 1 prompt
    assert report.turns == {"min": 2, "median": 2, "max": 4}
    assert report.messages == {"system": 1, "user": 9, "assistant": 9, "tool": 0}
    assert report.turns_missing_end_of_turn == 0
    warnings = "\n".join(report.warnings)
    for expected in ("2 of the 10 rows (20%) are rejected", "rows repeating an earlier conversation exactly "
                     "(deduplicate them): 1", "different answers: 1", "whitespace only: 1",
                     "no token is trained", "longer than data.max_seq_len=93", "data.on_bad_row=error"):
        assert expected in warnings


def test_role_shares_match_an_independent_count(tmp_path: Path) -> None:
    report = analyze(tmp_path)
    tok = make_encoder().tokenizer
    # Independently: an assistant message's content tokenises on its own (a newline and a special token
    # surround it); a trained one adds its <|im_end|>.
    assistant_tokens = assistant_trained = 0
    for index in EXAMPLE_ROWS:
        for message in ROWS[index]["messages"]:  # type: ignore[index]
            if message["role"] == "assistant":
                trained = message.get("train", True)
                n = len(tok.encode(message["content"], add_special_tokens=False))
                assistant_tokens += n + trained
                assistant_trained += (n + 1) * trained
    assert report.roles["assistant"].tokens == assistant_tokens
    assert report.roles["assistant"].trained_tokens == assistant_trained
    assert report.roles["assistant"].share == pytest.approx(assistant_trained / assistant_tokens)
    assert 0 < report.roles["assistant"].share < 1  # row 5's first answer is untrained
    # Every role, through the Encoder directly.
    direct = make_encoder().encode_detailed([conversation(ROWS[i]) for i in EXAMPLE_ROWS])  # type: ignore[arg-type]
    for role, code in ROLE_CODES.items():
        name = role or "template"
        tokens = sum(r.roles.count(code) for r in direct)
        trained = sum(1 for r in direct for c, label in zip(r.roles, r.example.labels)
                      if c == code and label != IGNORE_INDEX)
        assert (report.roles[name].tokens, report.roles[name].trained_tokens) == (tokens, trained)
    assert report.roles["user"].trained_tokens == report.roles["system"].trained_tokens == 0
    assert report.roles["system"].tokens > 0 and report.roles["template"].tokens > 0
    assert report.trained_tokens == assistant_trained
    assert sum(r.tokens for r in report.roles.values()) == sum(len(r.example.input_ids) for r in direct)


@pytest.mark.parametrize("truncation", ["drop", "truncate"])
def test_lengths_are_exact_and_before_truncation(tmp_path: Path, truncation: str) -> None:
    report = analyze(tmp_path, truncation=truncation)
    encoder = make_encoder()
    # Independently: tokenise the whole render; the too-long row counts with its full length.
    lengths = np.array([len(encoder.tokenizer.encode(
        encoder.template.render_text(ROWS[i]["messages"]), add_special_tokens=False))  # type: ignore[index]
        for i in (*EXAMPLE_ROWS, TOO_LONG_ROW)])
    assert lengths[-1] > MAX_SEQ_LEN == lengths[:-1].max()
    median, p95 = np.percentile(lengths, [50, 95], method="inverted_cdf")
    assert report.lengths == quality.Lengths(count=7, min=int(lengths.min()), median=int(median),
                                             p95=int(p95), max=int(lengths.max()), over_max_seq_len=1)
    if truncation == "truncate":
        assert (report.truncated, report.dropped_too_long, report.examples) == (1, 0, 7)
        assert report.truncated_inside_trained_turn == 1  # the cut falls inside the long answer
        assert report.dropped == {"no trained tokens": 1}
        assert any("truncated to data.max_seq_len=93: 1" in w for w in report.warnings)
    else:
        assert (report.truncated, report.dropped_too_long, report.examples) == (0, 1, 6)


def test_rejects_file_holds_every_row_that_is_not_an_example(tmp_path: Path) -> None:
    report = analyze(tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert report.rejects_path == str(tmp_path / "rejects.jsonl")
    assert sorted((int(r["where"].rsplit(":", 1)[1]), r["reason"]) for r in lines) == [
        (7, "too long"), (8, "invalid JSON"), (9, "no trained tokens"), (10, "unknown role")]
    assert [r["row"] for r in lines if r["reason"] == "invalid JSON"] == ["{not json"]

    clean = tmp_path / "clean"
    clean.mkdir()
    report = analyze(clean, [{"messages": QA}])
    assert report.rejects_path is None and not (clean / "rejects.jsonl").exists()
    assert report.warnings == [] and report.ok


@pytest.mark.parametrize("batch_rows", [1, 2, 4])
def test_batching_does_not_change_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             batch_rows: int) -> None:
    whole = analyze(tmp_path).to_dict()
    monkeypatch.setattr(quality, "BATCH_ROWS", batch_rows)
    assert analyze(tmp_path).to_dict() == whole  # duplicates and conflicts are found across batches


def test_on_bad_row_error_still_reports_every_bad_row(tmp_path: Path) -> None:
    strict = analyze(tmp_path, on_bad_row="error")
    lenient = analyze(tmp_path, on_bad_row="skip")
    assert strict.rejected == lenient.rejected == {"invalid JSON": 1, "unknown role": 1}
    assert any("data.on_bad_row=error" in w for w in strict.warnings)
    assert not any("data.on_bad_row=error" in w for w in lenient.warnings)


def test_nothing_trained_is_a_problem(tmp_path: Path) -> None:
    rows = [{"messages": [QA[0], {**QA[1], "train": False}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey", "train": False}]}]
    report = analyze(tmp_path, rows)
    assert not report.ok
    assert report.examples == 0 and report.no_trained_tokens == 2
    assert len(report.problems) == 1
    assert "no row became a training example (2 rows read: 2 no trained tokens)" in report.problems[0]
    assert report.to_dict()["ok"] is False


def test_turns_missing_end_of_turn_counts_each_trained_turn() -> None:
    closed = [Segment("<|im_start|>assistant\n", False), Segment("Hi", True, "assistant"),
              Segment("<|im_end|>", True, "assistant"), Segment("\n", False)]
    open_turn = [Segment("<|im_start|>assistant\n", False), Segment("Hi", True, "assistant"), Segment("\n", False)]
    untrained = [Segment("<|im_start|>user\n", False), Segment("Hi", False, "user")]
    # train_on=all: trained template text between turns does not join the turns into one
    everything = [Segment("<|im_start|>user\n", True), Segment("Hi", True, "user"),
                  Segment("<|im_end|>", True, "user"), Segment("\n<|im_start|>assistant\n", True),
                  Segment("Yo", True, "assistant"), Segment("\n", True)]
    markers = ("<|im_end|>",)
    assert quality.turns_missing_end_of_turn(closed, markers) == 0
    assert quality.turns_missing_end_of_turn(open_turn, markers) == 1
    assert quality.turns_missing_end_of_turn(untrained, markers) == 0
    assert quality.turns_missing_end_of_turn(everything, markers) == 1
    assert quality.turns_missing_end_of_turn(open_turn + closed + open_turn, markers) == 2


def test_write_text_and_json(tmp_path: Path) -> None:
    report = analyze(tmp_path)
    out = io.StringIO()
    quality.write(report, fmt="text", console=Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    for expected in ("rows read", "rejected: unknown role", "dropped: too long", "assistant", "p95",
                     "warning: 2 of the 10 rows", "ok: the data trains something"):
        assert expected in text
    out = io.StringIO()
    quality.write(report, fmt="json", console=Console(file=out))
    decoded = json.loads(out.getvalue())
    assert decoded["ok"] is True and decoded["rows"] == 10
    assert decoded["roles"]["assistant"]["share"] == pytest.approx(report.roles["assistant"].share)

    bad = analyze(tmp_path, [{"messages": [QA[0], {**QA[1], "train": False}]}])
    out = io.StringIO()
    quality.write(bad, console=Console(file=out, width=200, color_system=None))
    assert "problem: no row became a training example" in out.getvalue()
    assert "not ok" in out.getvalue()
