"""Files that lie about each other are refused with what, where and the fix: a config.json that describes
more layers or wider tensors than its checkpoint holds (never a silently random layer), and a cut-short or
corrupt tokenizer.json (named as corrupt, not blamed on the Hub). Tied embeddings never false-alarm."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_model_dir
from sftlab.cli import main
from sftlab.config import ModelConfig
from sftlab.errors import ConfigError
from sftlab.models.load import load_model, load_tokenizer

CPU = torch.device("cpu")
ARCHS = ("llama", "qwen2", "gpt2")
LAYERS = {"llama": "num_hidden_layers", "qwen2": "num_hidden_layers", "gpt2": "n_layer"}
WIDTH = {"llama": "hidden_size", "qwen2": "hidden_size", "gpt2": "n_embd"}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: tiny_model_dir(root / arch, arch=arch) for arch in ARCHS}


def edited(base: Path, tmp_path: Path, **changes: object) -> Path:
    """A copy of `base` whose config.json says `changes` (the weights untouched)."""
    path = tmp_path / "edited"
    shutil.copytree(base, path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_config_claiming_more_layers_than_the_checkpoint_is_refused(bases, tmp_path, arch) -> None:
    base = bases[arch]
    layers = json.loads((base / "config.json").read_text())[LAYERS[arch]]
    path = edited(base, tmp_path, **{LAYERS[arch]: layers + 1})
    with pytest.raises(ConfigError) as caught:
        load_model(ModelConfig(path=str(path)), device=CPU)
    message = str(caught.value)
    assert f"{path / 'config.json'} describes" in message
    assert f"that {path / 'model.safetensors'} does not hold" in message
    assert re.search(rf"\.{layers}\.\w", message)  # a tensor of the layer the weights lack, by name
    assert f"The weights hold {layers} layers (0-{layers - 1}); the config describes {layers + 1}" in message
    assert "would start at random" in message and "Restore the config.json" in message


def test_a_config_claiming_fewer_layers_is_said_on_stderr(bases, tmp_path, capsys) -> None:
    """Extra checkpoint tensors are not refused (some checkpoints ship extras transformers skips), but said."""
    path = edited(bases["llama"], tmp_path, num_hidden_layers=1)
    model = load_model(ModelConfig(path=str(path)), device=CPU)
    assert len(model.model.layers) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert re.search(rf"warning: {re.escape(str(path / 'model.safetensors'))} holds 9 tensors that "
                     rf"{re.escape(str(path / 'config.json'))} does not describe \(model\.layers\.1\.", err), err
    load_model(ModelConfig(path=str(bases["llama"])), device=CPU)
    assert "warning" not in capsys.readouterr().err


def test_qwen2_more_layers_than_its_layer_types_is_named_not_a_traceback(bases, tmp_path) -> None:
    path = edited(bases["qwen2"], tmp_path, num_hidden_layers=3)
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path / 'config.json'))} is inconsistent: .*"
                                          r"num_hidden_layers.* \(3\).*restore the config.json"):
        load_model(ModelConfig(path=str(path)), device=CPU)
    # With layer_types edited to match, the missing layer itself is what is refused.
    config = json.loads((path / "config.json").read_text())
    config["layer_types"] = config["layer_types"] + config["layer_types"][:1]
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"describes \d+ tensors that .* does not hold \(model\.layers\.2\."):
        load_model(ModelConfig(path=str(path)), device=CPU)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_config_with_doubled_width_names_the_tensor_and_both_shapes(bases, tmp_path, arch) -> None:
    base = bases[arch]
    width = json.loads((base / "config.json").read_text())[WIDTH[arch]]
    path = edited(base, tmp_path, **{WIDTH[arch]: 2 * width})
    with pytest.raises(ConfigError) as caught:
        load_model(ModelConfig(path=str(path)), device=CPU)
    message = str(caught.value)
    found = re.search(r"tensor (\S+) has shape \(([\d, ]+)\) in (\S+), but the config describes \(([\d, ]+)\) "
                      r"\(and \d+ more tensors\)", message)
    assert found, message
    name, in_file, file, wanted = found.groups()
    assert file == str(path / "model.safetensors")
    from safetensors import safe_open

    with safe_open(file, framework="pt") as handle:  # the shape named is the file's real one
        assert tuple(handle.get_slice(name).get_shape()) == tuple(int(n) for n in in_file.split(", "))
    import transformers

    with torch.device("meta"):  # the shape the edited config builds for that tensor
        described = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path))
    assert tuple(described.state_dict()[name].shape) == tuple(int(n) for n in wanted.split(", ")) != \
        tuple(int(n) for n in in_file.split(", "))
    assert message.startswith(f"{path / 'config.json'} does not match the weights")


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoints_as_saved_load_without_a_false_alarm(bases, arch) -> None:
    model = load_model(ModelConfig(path=str(bases[arch])), device=CPU)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_tied_embeddings_without_lm_head_in_the_file_are_not_missing(tmp_path) -> None:
    """A tied llama saves no lm_head.weight: transformers ties it to the embeddings, which is no gap."""
    import transformers
    from safetensors import safe_open

    from conftest import tiny_chat_tokenizer

    tokenizer = tiny_chat_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in handle.keys()  # noqa: SIM118 - a safe_open handle is no mapping
    model = load_model(ModelConfig(path=str(tmp_path)), device=CPU)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_untying_a_tied_checkpoint_in_config_is_a_missing_head(tmp_path) -> None:
    base = tmp_path / "tied"
    import transformers

    from conftest import tiny_chat_tokenizer

    tokenizer = tiny_chat_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    path = edited(base, tmp_path, tie_word_embeddings=False)
    with pytest.raises(ConfigError, match=r"describes 1 tensors that .* does not hold \(lm_head\.weight\)"):
        load_model(ModelConfig(path=str(path)), device=CPU)


def test_a_sharded_checkpoint_names_the_shard_holding_the_mismatched_tensor(bases, tmp_path) -> None:
    model = load_model(ModelConfig(path=str(bases["llama"])), device=CPU)
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="40KB")
    shutil.copy(bases["llama"] / "tokenizer.json", path)
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] *= 2
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    with pytest.raises(ConfigError) as caught:
        load_model(ModelConfig(path=str(path)), device=CPU)
    found = re.search(r"tensor (\S+) has shape \([\d, ]+\) in (\S+),", str(caught.value))
    assert found and "mlp" in found.group(1)
    assert found.group(2) == str(path / weight_map[found.group(1)])


def test_sftlab_train_refuses_the_lying_config_before_training(bases, tmp_path, capsys) -> None:
    path = edited(bases["llama"], tmp_path, num_hidden_layers=3)
    data = tmp_path / "train.jsonl"
    row = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]}
    data.write_text(json.dumps(row) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {path}\nmethod: lora\noutput_dir: {out}\n"
                      f"data:\n  train: {data}\n  cache: false\ntrain:\n  max_steps: 1\n", encoding="utf-8")
    assert main(["train", str(config)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "The weights hold 2 layers (0-1); the config describes 3" in err
    assert not (out / "adapter").exists() and not (out / "checkpoints").exists()


def cut(base: Path, tmp_path: Path, how: str) -> Path:
    path = tmp_path / how
    shutil.copytree(base, path, ignore=shutil.ignore_patterns("model.safetensors"))
    tokenizer = path / "tokenizer.json"
    data = tokenizer.read_bytes()
    if how == "cut_short":
        tokenizer.write_bytes(data[: len(data) // 2])
    else:  # damaged in the middle, its end intact
        middle = len(data) // 2
        tokenizer.write_bytes(data[:middle] + b"\x00{]" + data[middle + 3:])
    return path


@pytest.mark.parametrize(("how", "message"), [
    ("cut_short", r"is corrupt: it ends without the closing \} \([\d,]+ bytes\): cut short"),
    ("garbled", r"is corrupt: it is not valid JSON \(line \d+, column \d+: .*\)"),
])
def test_a_corrupt_tokenizer_json_is_named_as_corrupt(bases, tmp_path, monkeypatch, how, message) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = cut(bases["llama"], tmp_path, how)
    with pytest.raises(ConfigError) as caught:
        load_tokenizer(str(path))
    text = str(caught.value)
    assert re.search(re.escape(str(path / "tokenizer.json")) + " " + message, text), text
    assert "Download or copy the model's tokenizer files again" in text
    assert "Hub" not in text
