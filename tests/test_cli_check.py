"""`sftlab check` end to end on a real tokenizer with its own chat template (Qwen2.5): report, exit code,
rejects file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import fixture_path
from sftlab.cli import main

QA = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
ROWS = [
    json.dumps({"messages": QA}),
    json.dumps({"messages": QA}),
    json.dumps({"messages": [QA[0], {"role": "assistant", "content": "It is 5."}]}),
    json.dumps({"messages": [{"role": "system", "content": "Be brief."}, *QA]}),
    json.dumps({"messages": [{"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello!", "train": False}]}),
    "{not json",
]


def run_check(tmp_path: Path, rows: list[str], capsys: pytest.CaptureFixture[str], *options: str) -> tuple[int, str]:
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    model = str(fixture_path("tokenizers", "qwen2_5"))
    code = main(["check", str(data), "data.max_seq_len=64", "--model", model, "--template", "auto", *options])
    return code, capsys.readouterr().out


def test_check_reports_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_check(tmp_path, ROWS, capsys, "--format", "json")
    report = json.loads(out)
    assert code == 0 and report["ok"] is True and report["problems"] == []
    assert (report["rows"], report["examples"], report["max_seq_len"]) == (6, 4, 64)
    assert report["rejected"] == {"invalid JSON": 1}
    assert report["dropped"] == {"no trained tokens": 1}
    assert (report["duplicates"], report["conflicting_prompts"], report["turns_missing_end_of_turn"]) == (1, 1, 0)
    roles = report["roles"]
    assert roles["assistant"]["share"] == 1.0 and roles["assistant"]["trained_tokens"] > 0
    assert roles["user"]["trained_tokens"] == roles["system"]["trained_tokens"] == 0
    # Qwen's template inserts its default system prompt when a row has none: template text, never trained.
    assert roles["template"]["tokens"] > 0 and roles["template"]["share"] == 0.0
    assert 0 < report["lengths"]["min"] <= report["lengths"]["median"] <= report["lengths"]["max"] <= 64
    rejects = (tmp_path / "data.rejects.jsonl").read_text(encoding="utf-8").splitlines()
    assert sorted(json.loads(line)["reason"] for line in rejects) == ["invalid JSON", "no trained tokens"]


def test_check_text_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_check(tmp_path, ROWS, capsys)
    assert code == 0
    assert "rows read" in out and "tokens per role" in out and "rejected: invalid JSON" in out


def test_check_fails_when_nothing_is_trained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [json.dumps({"messages": [QA[0], {**QA[1], "train": False}]}),
            json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hey", "train": False}]})]
    code, out = run_check(tmp_path, rows, capsys, "--format", "json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    assert report["examples"] == 0 and report["no_trained_tokens"] == 2
    assert "training would learn nothing" in report["problems"][0]


def test_check_reports_each_source_of_data_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(ROWS[:2]) + "\n", encoding="utf-8")
    (tmp_path / "qa.csv").write_text("question,answer\nWhat is 1+1?,It is 2.\nWhat is 3+3?,\n", encoding="utf-8")
    sources = f"data.train=[{good}, {{path: {tmp_path / 'qa.csv'}, columns: {{prompt: question, completion: answer}}}}]"
    model = str(fixture_path("tokenizers", "qwen2_5"))
    code = main(["check", sources, "--model", model, "--format", "json", "--rejects", str(tmp_path / "r.jsonl")])
    out = capsys.readouterr().out
    decoder, reports, at = json.JSONDecoder(), [], 0
    while at < len(out.strip()):
        report, at = decoder.raw_decode(out, at)
        reports.append(report)
        at += len(out[at:]) - len(out[at:].lstrip())
    assert code == 0 and [(r["rows"], r["examples"]) for r in reports] == [(2, 2), (2, 1)]
    assert reports[1]["rejected"] == {"missing completion": 1}
    assert json.loads((tmp_path / "r.2.jsonl").read_text(encoding="utf-8"))["where"] == "qa.csv[1]"
    assert not (tmp_path / "r.1.jsonl").exists()
