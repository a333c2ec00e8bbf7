"""The bad-input matrix: each broken data file or config makes `sftlab train` exit non-zero with a message
naming file:line or the config key, before any model weights are read (the model loader is booby-trapped)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_model_dir
from sftlab.cli import main

GOOD = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


def jsonl(*rows: object) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def msgs(*pairs: tuple[object, object]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in pairs]}


# id: (data file name, its text (str) or bytes, expected line, overrides)
DATA_CASES = {
    "invalid-json": ("bad.jsonl", jsonl(GOOD, GOOD, "{not json", GOOD), 3, []),
    "truncated-last-line": ("bad.jsonl", jsonl(GOOD, GOOD, GOOD) + '{"messages": [{"role": "user"', 4, []),
    "row-is-a-list": ("bad.jsonl", jsonl(GOOD, [GOOD]), 2, []),
    "row-is-a-string": ("bad.jsonl", jsonl(GOOD, GOOD, '"just text"'), 3, []),
    "unknown-row-keys": ("bad.jsonl", jsonl(GOOD, {"text": "hello", "label": 1}), 2, []),
    "unknown-role": ("bad.jsonl", jsonl(GOOD, msgs(("user", "Hi"), ("robot", "Beep"))), 2, []),
    "content-a-number": ("bad.jsonl", jsonl(GOOD, GOOD, msgs(("user", "Hi"), ("assistant", 42))), 3, []),
    "content-a-list-of-numbers": ("bad.jsonl", jsonl(msgs(("user", [1, 2]), ("assistant", "x"))), 1, []),
    "messages-empty": ("bad.jsonl", jsonl(GOOD, {"messages": []}), 2, []),
    "messages-not-a-list": ("bad.jsonl", jsonl(GOOD, {"messages": "user: hi"}), 2, []),
    "message-not-an-object": ("bad.jsonl", jsonl(GOOD, {"messages": ["hi", "hello"]}), 2, []),
    "message-without-role": ("bad.jsonl", jsonl(GOOD, {"messages": [{"content": "hi"}]}), 2, []),
    "no-assistant-turn": ("bad.jsonl", jsonl(GOOD, msgs(("user", "Hi"))), 2, []),
    "train-flag-not-bool": ("bad.jsonl",
                            jsonl(GOOD, {"messages": [{"role": "user", "content": "Hi"},
                                                      {"role": "assistant", "content": "x", "train": "yes"}]}), 2, []),
    "alpaca-missing-output": ("bad.jsonl", jsonl({"instruction": "a", "output": "b"}, {"instruction": "c"}), 2, []),
    "prompt-completion-not-string": ("bad.jsonl", jsonl({"prompt": "a", "completion": "b"},
                                                        {"prompt": "a", "completion": 3}), 2, []),
    "sharegpt-unknown-speaker": ("bad.jsonl", jsonl({"conversations": [{"from": "human", "value": "a"},
                                                                       {"from": "alien", "value": "b"}]}), 1, []),
    "format-forced-wrong": ("bad.jsonl", jsonl(GOOD), 1, ["data.format=alpaca"]),
    "formats-mixed": ("bad.jsonl", jsonl(GOOD, GOOD, {"instruction": "a", "output": "b"}), 3, []),
    "invalid-utf8": ("bad.jsonl", jsonl(GOOD).encode() + b'{"messages": "\xff\xfe"}\n', 2, []),
    "json-array-with-bad-item": ("bad.json", "[\n" + ",\n".join(map(json.dumps, [GOOD, GOOD, {"messages": 7}])) + "\n]",
                                 4, []),
    "bad-row-deep-in-a-big-file": ("bad.jsonl", jsonl(*[GOOD] * 4999, msgs(("user", "Hi"), ("assistant", None))),
                                   5000, []),
}

# id: (overrides, what the message must name); the data and model are fine
CONFIG_CASES = {
    "unknown-key": (["data.max_seq_lne=512"], "did you mean 'data.max_seq_len'"),
    "wrong-type": (["train.lr=fast"], "train.lr must be a number"),
    "wrong-type-bool": (["data.packing=maybe"], "data.packing must be true or false"),
    "rank-zero": (["lora.rank=0"], "lora.rank must be a positive integer"),
    "dropout-out-of-range": (["lora.dropout=1.5"], "lora.dropout must be in [0, 1)"),
    "micro-batch-zero": (["train.micro_batch_size=0"], "train.micro_batch_size must be at least 1"),
    "unknown-method": (["method=qlora2"], "method must be one of full, lora"),
    "bad-literal": (["data.train_on=assistants"], "data.train_on must be one of assistant, last_assistant, all"),
    "max-seq-len-too-small": (["data.max_seq_len=1"], "data.max_seq_len must be at least 2"),
    "other-methods-option": (["prefix.num_virtual_tokens=10"], "prefix.num_virtual_tokens is set, but method is lora"),
    "lora-option-on-full": (["method=full", "lora.rank=8"], "lora.rank is set, but method is full"),
    "packing-with-soft-prompt": (["method=prompt", "data.packing=true"],
                                 "data.packing=true cannot be used with method prompt"),
    "eval-every-without-eval-data": (["train.eval_every_steps=10"],
                                     "train.eval_every_steps is set but there is no evaluation data"),
    "patience-without-eval-period": (["data.eval_fraction=0.1", "train.early_stopping_patience=2"],
                                     "train.early_stopping_patience counts evaluations"),
    "warmup-negative": (["train.warmup_steps=-1"], "train.warmup_steps must be 0 or more"),
    "eval-fraction-out-of-range": (["data.eval_fraction=1.5"], "data.eval_fraction must be in [0, 1)"),
    "betas-out-of-range": (["train.betas=[0.9, 1.5]"], "train.betas must be two numbers in [0, 1)"),
    "role-map-bad-target": (["data.role_map={bot: robot}"], "data.role_map maps 'bot' to 'robot'"),
    "train-file-missing": (["data.train=/nonexistent/train.jsonl"],
                           "data.train: /nonexistent/train.jsonl does not exist"),
    "train-file-wrong-type": (["data.train={tmp}/notes.txt"],
                              "data.train: {tmp}/notes.txt: unsupported file type '.txt'"),
    "train-glob-matches-nothing": (["data.train={tmp}/nothing/*.jsonl"], "as a pattern it matches no file"),
    "eval-file-missing": (["data.eval={tmp}/eval.jsonl"], "data.eval: {tmp}/eval.jsonl does not exist"),
    "template-file-missing": (["data.template={tmp}/mine.jinja"], "mine.jinja"),
    "output-dir-is-a-file": (["output_dir={tmp}/notes.txt"], "output_dir {tmp}/notes.txt is a file"),
    "eval-file-and-fraction": (["data.eval={tmp}/train.jsonl", "data.eval_fraction=0.1"],
                               "data.eval and data.eval_fraction are both set"),
    "model-dir-missing": (["model=/nonexistent/model-dir"], "/nonexistent/model-dir"),
    "override-without-value-syntax": (["train.lr"], "unrecognized arguments: train.lr"),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    """Any attempt to load model weights fails the test."""
    import transformers

    from sftlab.train import setup

    def trap(*args, **kwargs):
        raise AssertionError("model weights were read before the input was validated")

    monkeypatch.setattr(setup, "load_model", trap)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", trap)


def train(tmp_path: Path, model_dir: Path, overrides: list[str], capsys, config_text: str = "method: lora\n") -> str:
    config = tmp_path / "config.yaml"
    config.write_text(config_text, encoding="utf-8")
    args = ["train", str(config), f"model={model_dir}", f"output_dir={tmp_path / 'run'}", "data.cache=false",
            *[item.replace("{tmp}", str(tmp_path)) for item in overrides]]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code not in (0, None), err
    return err


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_a_broken_data_file_is_named_by_file_and_line(case, model_dir, tmp_path, capsys) -> None:
    name, content, line, overrides = DATA_CASES[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    err = train(tmp_path, model_dir, [f"data.train={path}", *overrides], capsys)
    assert f"{path}:{line}" in err.replace("\n", ""), err


def test_a_broken_eval_file_is_named_too(model_dir, tmp_path, capsys) -> None:
    (tmp_path / "train.jsonl").write_text(jsonl(GOOD, GOOD), encoding="utf-8")
    (tmp_path / "eval.jsonl").write_text(jsonl(GOOD, msgs(("user", "x"), ("wizard", "y"))), encoding="utf-8")
    err = train(tmp_path, model_dir, [f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'eval.jsonl'}"],
                capsys)
    assert f"{tmp_path / 'eval.jsonl'}:2" in err.replace("\n", "")


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_a_broken_config_is_named_by_its_key(case, model_dir, tmp_path, capsys) -> None:
    overrides, fragment = CONFIG_CASES[case]
    (tmp_path / "train.jsonl").write_text(jsonl(GOOD, GOOD), encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not data", encoding="utf-8")
    err = train(tmp_path, model_dir, [f"data.train={tmp_path / 'train.jsonl'}", *overrides], capsys)
    assert fragment.replace("{tmp}", str(tmp_path)) in err.replace("\n", ""), err


@pytest.mark.parametrize("text, fragment", [
    ("method: lora\ntrain:\n  lr: [1e-4\n", "{tmp}/config.yaml: not valid YAML"),
    ("- method: lora\n", "{tmp}/config.yaml: expected a mapping of keys at the top level"),
    ("method: lora\ntrain: 5\n", "train must be a mapping, found 5"),
])
def test_a_broken_config_file_is_named(text, fragment, model_dir, tmp_path, capsys) -> None:
    (tmp_path / "train.jsonl").write_text(jsonl(GOOD, GOOD), encoding="utf-8")
    err = train(tmp_path, model_dir, [f"data.train={tmp_path / 'train.jsonl'}"], capsys, config_text=text)
    assert fragment.replace("{tmp}", str(tmp_path)) in err.replace("\n", ""), err


def test_the_matrix_is_large_enough() -> None:
    assert len(DATA_CASES) + len(CONFIG_CASES) + 1 + 3 >= 30


def test_the_real_command_exits_non_zero_naming_the_line(model_dir, tmp_path) -> None:
    """As a user runs it: a subprocess, the message on stderr, a non-zero exit status."""
    path = tmp_path / "bad.jsonl"
    path.write_text(jsonl(*[GOOD] * 2999, {"messages": [{"role": "user", "content": "Hi"}, "oops"]}), encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text("method: lora\n", encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "sftlab", "train", str(config), f"model={model_dir}",
                           f"data.train={path}", f"output_dir={tmp_path / 'run'}", "data.cache=false"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2
    assert f"{path}:3000" in done.stderr.replace("\n", "")
    assert "Traceback" not in done.stderr
