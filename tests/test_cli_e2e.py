"""End to end through the CLI: train a tiny model, then generate, chat and merge from the run dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_model_dir
from sftlab.cli import main

ROWS = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [("Ping?", "Pong."), ("Hi!", "Hello there."), ("2+2?", "Four."), ("Sky?", "Blue.")]]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e")
    model = tiny_model_dir(root / "base", init_range=0.2)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    config = root / "config.yaml"
    config.write_text(f"model: {model}\nmethod: lora\noutput_dir: {root / 'run'}\n"
                      f"data:\n  train: {data}\n  cache: false\n"
                      "lora:\n  rank: 4\ntrain:\n  max_steps: 30\n  lr: 1e-2\n  micro_batch_size: 4\n"
                      "  save_every_steps: 10\n", encoding="utf-8")
    assert main(["train", str(config)]) == 0
    return {"root": root, "run": root / "run", "model": model}


def test_train_writes_the_documented_run_dir(run) -> None:
    out = run["run"]
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-20", "step-30"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 31))
    for key in ("step", "loss", "lr", "tokens", "supervised_tokens", "seconds"):
        assert key in lines[0]
    assert lines[-1]["loss"] < lines[0]["loss"]


def test_generate_from_the_run_dir_answers_a_trained_prompt(run, capsys) -> None:
    assert main(["generate", str(run["run"]), "--prompt", "Ping?", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip() == "Pong."


def test_chat_answers_turn_by_turn(run, capsys, monkeypatch) -> None:
    answers = iter(["Hi!", "/reset", "2+2?", "/exit"])  # trained on single turns only
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert main(["chat", str(run["run"]), "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "Hello there." in out and "Four." in out


def test_merge_writes_a_plain_model_with_a_fidelity_check(run, capsys) -> None:
    merged = run["root"] / "merged"
    assert main(["merge", str(run["run"]), "--output", str(merged)]) == 0
    out = capsys.readouterr().out
    assert "fidelity" in out and "max |Δlogit|" in out
    diff = float(out.split("max |Δlogit| ")[1].split(",")[0])
    assert diff < 1e-4
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(merged))
    assert not any("lora" in n.lower() or n.endswith(".A") for n, _ in model.named_parameters())
    assert main(["generate", str(merged), "--prompt", "Ping?", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip() == "Pong."


def test_merge_never_replaces_a_dir_without_overwrite_nor_leaves_a_partial_one(run, capsys, monkeypatch) -> None:
    import errno

    from sftlab.export import merge_stream

    target = run["root"] / "merged-again"
    target.mkdir()
    (target / "mine.txt").write_text("keep", encoding="utf-8")
    assert main(["merge", str(run["run"]), "--output", str(target)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in target.iterdir()) == ["mine.txt"]

    def full_disk(self, name, tensor):  # part of the weights written (the merge streams them), then no space
        self.handle.write(b"\0" * 64)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(merge_stream.ShardWriter, "write", full_disk)
    assert main(["merge", str(run["run"]), "--output", str(target), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "keeps its previous contents" in err.replace("\n", "")
    assert sorted(p.name for p in run["root"].iterdir() if p.name.startswith(".merged-again")) == []
    assert sorted(p.name for p in target.iterdir()) == ["mine.txt"]
    monkeypatch.undo()
    assert main(["merge", str(run["run"]), "--output", str(target), "--overwrite"]) == 0
    assert (target / "config.json").is_file() and not (target / "mine.txt").exists()


def test_a_finished_run_is_never_trained_over_without_overwrite(run, capsys) -> None:
    out = run["run"]
    weights = out / "adapter" / "adapter_model.safetensors"
    before = (weights.read_bytes(), weights.stat().st_mtime_ns, (out / "finished.json").read_text())
    # The same config again: nothing to do, nothing written.
    assert main(["train", str(out / "config.yaml")]) == 0
    assert "nothing to do" in capsys.readouterr().err
    # Any other config, or --no-resume: refused, nothing written.
    for extra in (["train.max_steps=40"], ["--no-resume"]):
        assert main(["train", str(out / "config.yaml"), *extra]) == 2
        err = capsys.readouterr().err
        assert "holds a finished run (30 steps, wrote adapter" in err and "--overwrite" in err
    assert (weights.read_bytes(), weights.stat().st_mtime_ns, (out / "finished.json").read_text()) == before
    # --overwrite trains it again from scratch (deterministic: the same weights, written anew).
    (out / "notes.txt").write_text("mine", encoding="utf-8")  # not the run's: kept
    assert main(["train", str(out / "config.yaml"), "--overwrite"]) == 0
    assert "done: 30 steps" in capsys.readouterr().out
    assert weights.read_bytes() == before[0] and weights.stat().st_mtime_ns != before[1]
    assert (out / "notes.txt").read_text() == "mine"
