"""Messages are plain text: a user's role, key, value or path holding `[...]` is printed as given, through
the CLI, never read as rich markup (which turned `[/]` into a MarkupError traceback and made `[name]` vanish)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import fixture_path, tiny_model_dir
from sftlab.cli import main

TOKENIZER = str(fixture_path("tokenizers", "qwen2_5"))
GOOD = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "MarkupError" not in captured.err, captured.err
    return code, captured.out, captured.err.replace("\n", "")


def write_rows(path: Path, *rows: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("role", ["[/]", "[bold]boss", "[/bold]", "[link=file:///etc/passwd]x"])
def test_a_role_with_markup_is_named_as_written(role, tmp_path, capsys) -> None:
    data = write_rows(tmp_path / "data.jsonl", GOOD, {"messages": [{"role": role, "content": "x"},
                                                                   {"role": "assistant", "content": "y"}]})
    code, _, err = run(capsys, "inspect", str(data), "--model", TOKENIZER, "--template", "chatml")
    assert code == 2
    assert f"{data}:2" in err and repr(role) in err, err


@pytest.mark.parametrize(("override", "named"), [
    ("train.[/]=1", "unknown key 'train.[/]'"),
    ("[bold]x=1", "unknown key '[bold]x'"),
    ("data.role_map={'[/]': robot}", "data.role_map maps '[/]' to 'robot'"),
    ("lora.alpha=[/]", "lora.alpha must be a number, found ['/']"),
    ("method='[red]full'", "found '[red]full'"),
    ("lora.rank=[b]", "lora.rank must be an integer, found ['b']"),
    ("lora.rank=[/", "override 'lora.rank': not valid YAML"),
])
def test_a_key_or_value_with_markup_is_printed_as_given(override, named, tmp_path, capsys) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("method: lora\n", encoding="utf-8")
    code, _, err = run(capsys, "train", str(config), override)
    assert code == 2
    assert named in err, err


def test_bracketed_parts_of_paths_stay_in_messages(tmp_path, capsys) -> None:
    config = tmp_path / "[conf]" / "config.yaml"
    config.parent.mkdir()
    config.write_text("method: lora\n", encoding="utf-8")
    missing = tmp_path / "[name]" / "train.jsonl"
    code, _, err = run(capsys, "train", str(config), f"data.train={missing}", "model=x")
    assert code == 2 and f"{missing} does not exist" in err, err
    code, _, err = run(capsys, "train", str(tmp_path / "[gone]" / "config.yaml"))
    assert code == 2 and f"{tmp_path / '[gone]' / 'config.yaml'} does not exist" in err, err


def test_check_report_keeps_bracketed_paths_and_roles(tmp_path, capsys) -> None:
    data = write_rows(tmp_path / "[data]" / "chat.jsonl", GOOD, GOOD,
                      {"messages": [{"role": "[/]", "content": "x"}, {"role": "assistant", "content": "y"}]})
    rejects = tmp_path / "[out]" / "rejects.jsonl"
    rejects.parent.mkdir()
    code, out, _ = run(capsys, "check", str(data), "--model", TOKENIZER, "--template", "chatml",
                       "--rejects", str(rejects), "data.on_bad_row=skip")
    assert code == 0
    flat = out.replace("\n", "").replace("│", "").replace(" ", "")
    assert str(data).replace(" ", "") in flat and str(rejects).replace(" ", "") in flat, out


def test_lora_targets_in_a_message_print_as_given(tmp_path, capsys) -> None:
    model = tiny_model_dir(tmp_path / "model")
    data = write_rows(tmp_path / "train.jsonl", GOOD, GOOD)
    config = tmp_path / "config.yaml"
    config.write_text("method: lora\n", encoding="utf-8")
    code, _, err = run(capsys, "train", str(config), f"model={model}", f"data.train={data}",
                       f"output_dir={tmp_path / '[run]'}", "data.cache=false", "lora.targets=[lm_head]")
    assert code == 2
    assert "lora.targets=[lm_head] matched no module" in err, err


def test_training_notes_keep_bracketed_paths(tmp_path, capsys) -> None:
    model = tiny_model_dir(tmp_path / "model")
    data = write_rows(tmp_path / "train.jsonl", GOOD, GOOD, GOOD, {"messages": "not a list"})
    config = tmp_path / "config.yaml"
    config.write_text("method: lora\n", encoding="utf-8")
    out = tmp_path / "[run]"
    code, _, err = run(capsys, "train", str(config), f"model={model}", f"data.train={data}", f"output_dir={out}",
                       "data.cache=false", "data.on_bad_row=skip", "train.max_steps=1", "train.micro_batch_size=1")
    assert code == 0, err
    assert f"listed in {out / 'rejects.jsonl'}" in err, err
