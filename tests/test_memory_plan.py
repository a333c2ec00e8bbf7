"""The memory plan (train/memory.py): one line before the weights are read, and a refusal — exit 2, before
any weight is read, naming the change that makes the run fit — when the plan exceeds the free memory."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from conftest import tiny_chat_tokenizer, tiny_model_dir
from sftlab.cli import main
from sftlab.train.memory import available_memory

ROWS = [("What is the capital of France?", "Paris."), ("Say hi.", "Hi there!")]


def write_rows(path: Path) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in ROWS), encoding="utf-8")
    return path


def llama7b_shaped_dir(path: Path, free: int) -> Path:
    """A dir whose config.json is a Llama-2-7B-shaped model with as many layers as make its fp32 weights
    1.3x the free memory, and whose weight file holds one tiny tensor: any attempt to read the weights
    could not build the model, so a refusal here came before the weights."""
    per_layer = 4 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # fp32 bytes of one decoder layer
    layers = math.ceil(1.3 * free / per_layer)
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    path.mkdir(parents=True)
    config.save_pretrained(path)
    save_file({"model.norm.weight": torch.ones(4096)}, str(path / "model.safetensors"))
    tiny_chat_tokenizer().save_pretrained(path)
    return path


def test_a_plan_that_does_not_fit_exits_2_before_reading_weights_naming_the_fix(tmp_path: Path, capsys) -> None:
    free, _, _ = available_memory(torch.device("cpu"))
    model = llama7b_shaped_dir(tmp_path / "big", free)
    (tmp_path / "run.yaml").write_text("method: lora\n", encoding="utf-8")
    args = ["train", str(tmp_path / "run.yaml"), f"model={model}", f"data.train={write_rows(tmp_path / 'rows.jsonl')}",
            f"output_dir={tmp_path / 'run'}", "data.cache=false", "data.template=chatml", "train.max_steps=1"]
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert re.search(r"memory plan: base [\d.]+ GiB \(fp32\) \+ trainable .* ≈ [\d.]+ GiB of [\d.]+ GiB free \(host\)",
                     err), err
    assert "it would fit with method=qlora" in err and "train.memory_check=warn" in err, err
    assert not (tmp_path / "run" / "adapter").exists()


def test_the_plan_line_is_printed_and_a_run_that_fits_trains(tmp_path: Path, capsys) -> None:
    model = tiny_model_dir(tmp_path / "m", hidden=64)
    (tmp_path / "run.yaml").write_text("method: qlora\n", encoding="utf-8")
    assert main(["train", str(tmp_path / "run.yaml"), f"model={model}",
                 f"data.train={write_rows(tmp_path / 'rows.jsonl')}",
                 f"output_dir={tmp_path / 'run'}", "data.cache=false", "train.max_steps=1"]) == 0
    printed = capsys.readouterr()
    text = " ".join((printed.out + printed.err).split())
    assert re.search(r"memory plan: base [\d.]+ MiB \(nf4\) \+ trainable [\d.]+ MiB \+ gradients [\d.]+ MiB \+ "
                     r"optimizer [\d.]+ MiB \+ activations ~[\d.]+ [MG]iB \(gradient checkpointing off\) \+ "
                     r"runtime [\d.]+ [MG]iB ≈ [\d.]+ [MG]iB of [\d.]+ GiB free \(host\)", text), text


def test_gradient_checkpointing_auto_turns_on_only_when_the_plan_needs_it(tmp_path: Path, monkeypatch) -> None:
    from dataclasses import replace
    from types import SimpleNamespace

    from rich.console import Console

    from sftlab.config import load_config
    from sftlab.train import memory

    model_dir = tiny_model_dir(tmp_path / "m", hidden=64)
    cfg = load_config(overrides=[f"model={model_dir}", "train.gradient_checkpointing=auto", "train.micro_batch_size=8"])
    data = SimpleNamespace(lengths=[512])
    cpu = torch.device("cpu")
    shape = memory.model_shape(cfg, model_dir, cpu)
    totals = {on: memory.plan(replace(cfg, train=replace(cfg.train, gradient_checkpointing=on)), shape, row_tokens=512,
                              runtime=0, available=None, where="host").total for on in (False, True)}
    assert totals[True] < totals[False]
    for available, expected in ((totals[False], False), ((totals[False] + totals[True]) // 2, True)):
        monkeypatch.setattr(memory, "available_memory", lambda device, ranks=1, free=available: (free, 0, "host"))
        console = Console(record=True, width=300)
        resolved = memory.plan_run(cfg, data, cpu, console)
        text = console.export_text()
        assert resolved.train.gradient_checkpointing is expected, text
        assert f"gradient checkpointing: auto -> {'on' if expected else 'off'} (without it the plan is" in text
        assert f"(gradient checkpointing {'on' if expected else 'off'})" in text
    monkeypatch.undo()
    off = memory.plan_run(replace(cfg, train=replace(cfg.train, memory_check="off")), data, cpu, Console(quiet=True))
    assert off.train.gradient_checkpointing is False  # no plan: auto stays off
    explicit = replace(cfg, train=replace(cfg.train, gradient_checkpointing=False))
    assert memory.plan_run(explicit, data, cpu, Console(quiet=True)).train.gradient_checkpointing is False


def test_under_torchrun_each_process_plans_with_its_share_of_the_host() -> None:
    one, rss, _ = available_memory(torch.device("cpu"))
    two, _, where = available_memory(torch.device("cpu"), ranks=2)
    assert where == "host, per process of 2"
    assert abs(two - (one - rss) / 2 - rss) < 0.05 * one  # MemAvailable moves a little between the two reads
