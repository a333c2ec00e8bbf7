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
