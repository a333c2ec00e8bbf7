"""`sftlab inspect` end to end on a real tokenizer dir: text, json and html views."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import fixture_path
from sftlab.cli import main
from sftlab.data.encode import IGNORE_INDEX

ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "Ping"}, {"role": "assistant", "content": "Pong"}]},
]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


@pytest.fixture
def model() -> str:
    return str(fixture_path("tokenizers", "qwen2_5"))


def test_json_view_has_ids_labels_and_tokens(data: Path, model: str, capsys) -> None:
    assert main(["inspect", str(data), "--model", model, "--format", "json", "-n", "5"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["where"] for r in records] == [f"{data}:1", f"{data}:2"]
    for record in records:
        assert len(record["input_ids"]) == len(record["labels"]) == len(record["tokens"])
        trained = "".join(t for t, label in zip(record["tokens"], record["labels"]) if label != IGNORE_INDEX)
        assert trained in ("Hello!<|im_end|>4<|im_end|>", "Pong<|im_end|>")
        assert "".join(record["tokens"]).startswith("<|im_start|>")


def test_text_view_marks_trained_spans_without_colour(data: Path, model: str, capsys) -> None:
    assert main(["inspect", str(data), "--model", model, "-n", "1", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "[[Hello!<|im_end|>]]" in out and "[[4<|im_end|>]]" in out
    assert "[[Pong" not in out  # -n 1
    assert "<|im_start|>user\nHi<|im_end|>" in out


def test_overrides_change_the_mask(data: Path, model: str, capsys) -> None:
    assert main(["inspect", str(data), "--model", model, "-n", "1", "--no-color", "data.train_on=last_assistant"]) == 0
    out = capsys.readouterr().out
    assert "[[4<|im_end|>]]" in out and "[[Hello!" not in out


def test_html_view_is_a_page(data: Path, model: str, tmp_path: Path) -> None:
    out = tmp_path / "view.html"
    assert main(["inspect", str(data), "--model", model, "--format", "html", "--output", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and page.count('class="example"') == 2
    assert '<span class="t on" title="#' in page and '>Hello<' in page


def test_errors_are_messages_not_tracebacks(data: Path, tmp_path: Path, capsys) -> None:
    assert main(["inspect", str(data)]) == 2
    assert "pass --model" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.jsonl"),
                 "--model", str(fixture_path("tokenizers", "qwen2_5"))]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["inspect", str(data), "--model", str(tmp_path)]) == 2
    assert "holds no tokenizer files" in capsys.readouterr().err
