"""`sftlab export --format gguf`: the merged model as a GGUF file that an independent reader (transformers'
GGUF loader) loads with the model's logits, its tokenizer and chat template, and the end-of-turn token as
the stop token; an Ollama Modelfile whose template renders what the chat template renders."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers

from conftest import real_tokenizer, tiny_chat_tokenizer, tiny_model_dir
from sftlab import cli
from sftlab.cli import main
from sftlab.data.templates import load_template
from sftlab.export import gguf as gguf_export
from sftlab.export.gguf import GGUFExportError, write_gguf
from sftlab.export.ollama import chat_pieces, modelfile
from sftlab.models.gguf import parsed_once
from sftlab.runs import export_gguf, load_for_inference

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
Q8_MEAN_KL = 1e-2
"""Q8_0's documented tolerance: mean KL(fp32 model || Q8_0 file) per token of the next-token distributions
(measured: 1.4e-3 on the tiny test model, 5.5e-3 on SmolLM2-135M after LoRA, whose tied embeddings and
output head are Q8_0 too; f16: 2e-6 and 6e-6)."""
ROWS = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [("Ping?", "Pong."), ("Hi!", "Hello there."), ("2+2?", "Four."), ("Sky?", "Blue.")]]


def _read(path: Path) -> tuple[object, object]:
    """The file as transformers' GGUF reader loads it: (model, tokenizer)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def _metadata(path: Path) -> dict[str, object]:
    import gguf

    with parsed_once():  # gguf's own reader over a plain view of the mapped bytes: the same fields, ~3x faster
        reader = gguf.GGUFReader(str(path))
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.chat_template",
            "general.architecture", "tokenizer.ggml.pre")
    return {key: reader.fields[key].contents() for key in keys if key in reader.fields}


def _logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _mean_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    ref, got = reference.double().log_softmax(-1), other.double().log_softmax(-1)
    value = float((ref.exp() * (ref - got)).sum(-1).mean())
    print(f"mean KL {value:.2e}, max |Δlogit| {(reference - other).abs().max():.3f}")
    return value


def _tiny(arch: str, path: Path) -> tuple[object, object]:
    """A tiny random model with the tiny chat tokenizer."""
    tokenizer = tiny_chat_tokenizer()
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, bos_token_id=None,
                  eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id)
    configs = {"llama": lambda: transformers.LlamaConfig(**common),
               "qwen2": lambda: transformers.Qwen2Config(**common),
               "qwen3": lambda: transformers.Qwen3Config(head_dim=128, **common),  # head_dim != hidden / heads
               "mistral": lambda: transformers.MistralConfig(**common)}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(configs[arch]()).eval()
    return model, tokenizer


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_an_f32_gguf_reads_back_with_the_same_logits_tokenizer_and_stop_token(arch, tmp_path) -> None:
    model, tokenizer = _tiny(arch, tmp_path)
    template = load_template("chatml", tokenizer)
    out = tmp_path / "model.gguf"
    info = write_gguf(model, tokenizer, template, out, quant="f32")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert info["eos_token"] == "<|im_end|>" and info["eos_token_id"] == im_end
    read = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32)
    torch.testing.assert_close(_logits(read), _logits(model), rtol=0, atol=1e-5)
    meta = _metadata(out)
    assert meta["tokenizer.ggml.pre"] == "gpt2"  # the tiny tokenizer's plain byte-level split
    assert meta["tokenizer.ggml.eos_token_id"] == im_end == meta["tokenizer.ggml.eot_token_id"]
    assert meta["tokenizer.chat_template"] == template.source
    if arch == "llama":  # the tokenizer the reader rebuilds (minutes for Qwen's 150k tokens on a busy CPU)
        read_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
        text = "<|im_start|>user\nHello! What is 22+2024?<|im_end|>\n<|im_start|>assistant\n"
        assert read_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
        assert read_tokenizer.eos_token == "<|im_end|>"


def _rounded(model, kind: str):
    """A copy of `model` whose matrices went through `kind` (f16 or q8_0) and back, as a GGUF file stores them."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    def through(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() < 2:
            return tensor
        if kind == "f16":
            return tensor.half().float()
        data = tensor.numpy().astype("float32")
        stored = quantize(data, GGMLQuantizationType.Q8_0)
        return torch.from_numpy(dequantize(stored, GGMLQuantizationType.Q8_0).reshape(data.shape).copy())

    rounded = copy.deepcopy(model).eval()  # a copy, not a new model: random init of 135M weights costs seconds
    rounded.load_state_dict({key: through(value) for key, value in model.state_dict().items()})
    return rounded


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_f16_and_q8_0_files_hold_exactly_the_rounded_weights(kind, tmp_path) -> None:
    model, tokenizer = _tiny("llama", tmp_path)
    template = load_template("chatml", tokenizer)
    write_gguf(model, tokenizer, template, tmp_path / f"{kind}.gguf", quant=kind)
    read = _logits(_read(tmp_path / f"{kind}.gguf")[0])
    torch.testing.assert_close(read, _logits(_rounded(model, kind)), rtol=0, atol=1e-4)
    assert _mean_kl(_logits(model), read) < (1e-5 if kind == "f16" else Q8_MEAN_KL)


def test_an_unmapped_architecture_is_refused_by_name_and_nothing_is_written(tmp_path) -> None:
    base = tiny_model_dir(tmp_path / "gpt2", arch="gpt2")
    out = tmp_path / "out" / "model.gguf"
    with pytest.raises(GGUFExportError, match=r"maps the architectures llama, mistral, qwen2, qwen3; this model "
                                              r"is 'gpt2'"):
        export_gguf(str(base), out)
    assert not out.parent.exists() or not list(out.parent.iterdir())


@pytest.mark.parametrize(("name", "pre"), [("qwen2_5", "qwen2"), ("llama3_2", "llama-bpe")])
def test_the_pre_tokenizer_is_named_for_llama_cpp_from_the_tokenizers_own_regex(name, pre) -> None:
    backend = json.loads(real_tokenizer(name).backend_tokenizer.to_str())
    assert gguf_export._pre_tokenizer(backend, None) == pre
    assert gguf_export._pre_tokenizer(backend, "smollm") == "smollm"  # a GGUF base's own name wins


def test_the_cli_quant_choices_are_the_writers() -> None:
    assert cli.GGUF_QUANTS == gguf_export.QUANTS


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gguf-run")
    tiny_model_dir(root / "base", init_range=0.2)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    config = root / "config.yaml"
    config.write_text(f"model: {root / 'base'}\nmethod: lora\noutput_dir: {root / 'run'}\n"
                      f"data:\n  train: {root / 'train.jsonl'}\n  cache: false\n  template: chatml\n"
                      "lora:\n  rank: 4\ntrain:\n  max_steps: 30\n  lr: 1e-2\n  micro_batch_size: 4\n"
                      "  save_every_steps: 30\n", encoding="utf-8")
    assert main(["train", str(config)]) == 0
    return root / "run"


def test_export_from_a_lora_run_into_its_run_dir_with_a_modelfile(run, capsys) -> None:
    assert main(["export", str(run), "--format", "gguf", "--quant", "f32", "--output", str(run / "model.gguf")]) == 0
    out = capsys.readouterr().out
    assert "generation stops at <|im_end|>" in out and f"ollama create model -f {run / 'model.Modelfile'}" in out
    manifest = json.loads((run / ".sftlab-manifest.json").read_text(encoding="utf-8"))["files"]
    assert {"model.gguf", "model.Modelfile"} <= set(manifest)
    model, _, _, method = load_for_inference(str(run))
    merged = method.merge(model)
    torch.testing.assert_close(_logits(_read(run / "model.gguf")[0]), _logits(merged), rtol=0, atol=1e-4)
    text = (run / "model.Modelfile").read_text(encoding="utf-8")
    assert text.startswith("FROM ./model.gguf\nTEMPLATE") and 'PARAMETER stop "<|im_end|>"' in text
    # Greedy through the exported file's own model and tokenizer answers as the run does.
    read, read_tokenizer = _read(run / "model.gguf")
    prompt = read_tokenizer.apply_chat_template([{"role": "user", "content": "Ping?"}], add_generation_prompt=True,
                                                tokenize=False)
    ids = read_tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    new = read.generate(ids, max_new_tokens=10, do_sample=False,
                        eos_token_id=read_tokenizer.eos_token_id)[0, ids.shape[1]:]
    assert read_tokenizer.decode(new, skip_special_tokens=True) == "Pong."
    assert int(new[-1]) == read_tokenizer.convert_tokens_to_ids("<|im_end|>")  # stopped at the end of turn


def test_export_never_replaces_a_file_without_overwrite_nor_a_users_file_in_the_run_dir(run, tmp_path, capsys) -> None:
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"mine")
    assert main(["export", str(run), "--format", "gguf", "--output", str(mine)]) == 2
    assert "already exists" in capsys.readouterr().err and mine.read_bytes() == b"mine"
    users = run / "theirs.gguf"
    users.write_bytes(b"theirs")
    assert main(["export", str(run), "--format", "gguf", "--output", str(users), "--overwrite"]) == 2
    assert "was not written by this sftlab run" in capsys.readouterr().err and users.read_bytes() == b"theirs"
    assert main(["export", str(run), "--format", "gguf", "--output", str(mine), "--overwrite", "--quant", "q8_0"]) == 0
    assert mine.read_bytes()[:4] == b"GGUF" and not list(tmp_path.glob(".mine*"))


@pytest.mark.parametrize("name", ["chatml", "llama3", "qwen2_5"])
def test_the_modelfile_template_renders_what_the_chat_template_renders(name) -> None:
    tokenizer = real_tokenizer(name) if name == "qwen2_5" else tiny_chat_tokenizer()
    template = load_template("auto" if name == "qwen2_5" else name, tokenizer)
    pieces = chat_pieces(template)
    assert pieces is not None
    for messages in ([{"role": "user", "content": "Hi"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]):
        expected = template.render_text(messages, add_generation_prompt=True)
        given = messages if messages[0]["role"] == "system" or not pieces.default_system else \
            [{"role": "system", "content": pieces.default_system}, *messages]  # Ollama adds SYSTEM when none
        assert pieces.render(given) == expected
    text = modelfile("m.gguf", template, "<|im_end|>")
    assert ("SYSTEM" in text) == (name == "qwen2_5")
