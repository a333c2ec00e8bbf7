"""Broken models, tokenizers and target specs give one clear SftlabError each: what was expected, what was
found, where, and how to fix it — from the loaders, from a method's apply, and through `sftlab train`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_chat_tokenizer, tiny_model_dir, tiny_tokenizer
from sftlab.cli import main
from sftlab.config import ModelConfig, load_config
from sftlab.data.templates import load_template
from sftlab.errors import ConfigError, SftlabError, TemplateError
from sftlab.methods import METHODS
from sftlab.models.load import load_model, load_tokenizer

CPU = torch.device("cpu")
LLAMA_LINEAR = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("models") / "base")


def broken(base: Path, tmp_path: Path, damage: str) -> Path:
    """A copy of the tiny model dir with one kind of damage done to it."""
    path = tmp_path / damage
    if damage == "missing":
        return path
    shutil.copytree(base, path)
    weights = path / "model.safetensors"
    if damage == "no_weights":
        weights.unlink()
    elif damage == "garbage_header":
        weights.write_bytes(b"\xff" * 64 + weights.read_bytes()[64:])
    elif damage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "missing_shard":
        weights.unlink()
        model = load_model(ModelConfig(path=str(base)), device=CPU)
        model.save_pretrained(path, max_shard_size="100KB")
        shards = sorted(path.glob("model-*.safetensors"))
        assert len(shards) > 2
        shards[1].unlink()
    elif damage == "bad_json":
        (path / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": 64,,\n}', encoding="utf-8")
    elif damage == "pickled":
        state = {k: v.clone() for k, v in load_model(ModelConfig(path=str(base)), device=CPU).state_dict().items()}
        weights.unlink()
        torch.save(state, path / "pytorch_model.bin")
    return path


# (damage, what the message must say); `{path}` is the damaged dir.
CASES = [
    ("missing", r"model '{path}': no such directory \({path}\), and not a hub id"),
    ("no_weights", r"{path} has config.json but no weight files; expected model.safetensors .* fetch"),
    ("garbage_header", r"{path}/model.safetensors is not a readable safetensors file .* truncated or corrupt"),
    ("truncated", r"{path}/model.safetensors is not a readable safetensors file .* Download or copy it again"),
    ("missing_shard", (r"{path}/model.safetensors.index.json names \d+ shard files, and these are missing from "
                       r"{path}: model-00002-of-\d+.safetensors\. .*fetch the missing shards")),
    ("bad_json", r"{path}/config.json is not valid JSON \(line 2, column 21: .*\); expected the model's"),
    ("pickled", r"{path} holds its weights as pickles \(pytorch_model.bin\), not safetensors;.*save_pretrained"),
]


@pytest.mark.parametrize(("damage", "message"), CASES, ids=[c[0] for c in CASES])
def test_a_broken_model_dir_is_named_with_the_fix(base, tmp_path, damage, message) -> None:
    path = broken(base, tmp_path, damage)
    with pytest.raises(ConfigError, match=message.format(path=re.escape(str(path)))):
        load_model(ModelConfig(path=str(path)), device=CPU)


@pytest.mark.parametrize("damage", ["missing", "bad_json"])
def test_the_tokenizer_loader_reports_the_same_problems(base, tmp_path, damage) -> None:
    path = broken(base, tmp_path, damage)
    message = dict(CASES)[damage].format(path=re.escape(str(path)))
    with pytest.raises(ConfigError, match=message):
        load_tokenizer(str(path))


def test_a_file_given_as_the_model_says_to_point_at_its_directory(base) -> None:
    with pytest.raises(ConfigError,
                       match=f"is a file; expected a Hugging Face model directory .*{re.escape(str(base))}"):
        load_model(ModelConfig(path=str(base / "model.safetensors")), device=CPU)


def test_an_unreachable_hub_id_says_there_is_no_local_dir_either(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"cannot load a tokenizer from 'no-org/no-model' \(the Hugging Face Hub is "
                                          r"not reachable from here\): .* no local directory 'no-org/no-model'"):
        load_tokenizer("no-org/no-model")


def test_a_tokenizer_without_a_chat_template_under_template_auto() -> None:
    with pytest.raises(TemplateError,
                       match="data.template=auto but .* has no chat template .* Set data.template=chatml"):
        load_template("auto", tiny_tokenizer())


# --- targets that match nothing ------------------------------------------------------------------------

TARGETS = [
    ("lora", "lora.targets=[query, value]", (r"lora.targets=\[query, value\] matched no module; the model's linear "
                                             rf"layers are named: {LLAMA_LINEAR} \(full names like "
                                             r"model.layers.0.self_attn.q_proj\)\. Use all-linear")),
    ("lora", "lora.targets=.*attention[.]query", (r"lora.targets='.\*attention\[.\]query' matched no module; the "
                                                  rf"model's linear layers are named: {LLAMA_LINEAR} ")),
    # A bare suffix as a string is a regex over full names: say how to write the list it probably meant.
    ("lora", "lora.targets=q_proj", (r"lora.targets='q_proj' matched no module; .* for suffixes write a list, "
                                     r"e.g. lora.targets=\[q_proj\]")),
    ("qlora", "lora.targets=[query]", rf"lora.targets=\[query\] matched no module; .* named: {LLAMA_LINEAR} "),
]


@pytest.mark.parametrize(("method", "override", "message"), TARGETS, ids=["suffixes", "regex", "bare-suffix", "qlora"])
def test_targets_that_match_nothing_list_the_linear_layer_names(base, method, override, message) -> None:
    cfg = load_config(overrides=[f"model={base}", f"method={method}", override])
    model = load_model(cfg.model, device=CPU)
    with pytest.raises(ConfigError, match=message):
        METHODS[method](cfg).apply(model)


def test_gpt2_conv1d_layer_names_are_listed_once_each(tmp_path) -> None:
    path = tiny_model_dir(tmp_path / "gpt2", arch="gpt2")
    cfg = load_config(overrides=[f"model={path}", "method=lora", "lora.targets=[q_proj]"])
    model = load_model(cfg.model, device=CPU)
    with pytest.raises(ConfigError, match=r"layers are named: c_attn, c_proj, c_fc \(full names like "
                                          r"transformer.h.0.attn.c_attn\)"):
        METHODS["lora"](cfg).apply(model)


# --- through `sftlab train` ---------------------------------------------------------------------------

def small_vocab_model_dir(path: Path) -> Path:
    """A model whose embeddings have 100 rows, saved with the 400-token tiny tokenizer."""
    import transformers

    tokenizer = tiny_chat_tokenizer()
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, bos_token_id=None,
                                      eos_token_id=None, pad_token_id=None)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def no_template_model_dir(base: Path, path: Path) -> Path:
    shutil.copytree(base, path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer_config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    return path


E2E = [
    ("missing", "no such directory"),
    ("truncated", "model.safetensors is not a readable safetensors file"),
    ("pickled", "holds its weights as pickles"),
    ("small_vocab", r"the data holds token id \d+, but the vocabulary of model .*small has 100 rows"),
    ("no_template", "data.template=auto but .* has no chat template"),
]


@pytest.mark.parametrize(("damage", "message"), E2E, ids=[c[0] for c in E2E])
def test_sftlab_train_exits_non_zero_with_the_message(base, tmp_path, capsys, damage, message) -> None:
    if damage == "small_vocab":
        model = small_vocab_model_dir(tmp_path / "small")
    elif damage == "no_template":
        model = no_template_model_dir(base, tmp_path / "plain")
    else:
        model = broken(base, tmp_path, damage)
    data = tmp_path / "train.jsonl"
    row = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]}
    data.write_text(json.dumps(row) + "\n", encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {model}\nmethod: lora\noutput_dir: {tmp_path / 'run'}\n"
                      f"data:\n  train: {data}\n  cache: false\ntrain:\n  max_steps: 1\n", encoding="utf-8")
    assert main(["train", str(config)]) == 2
    err = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert re.search(f"error: .*{message}", err), err
    assert issubclass(ConfigError, SftlabError)
