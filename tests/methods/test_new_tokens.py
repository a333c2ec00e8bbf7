"""Tokens the data step adds (ChatML on a base tokenizer) get trained embedding rows under LoRA: only the new
rows (and an untied head's new rows) move, the old rows stay the base's bit for bit; the rows are saved with
the adapter in PEFT's `trainable_token_indices` format and load back in sftlab and in HF PEFT."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from conftest import only_for, tiny_tokenizer
from sftlab import export
from sftlab.config import load_config
from sftlab.errors import ConfigError
from sftlab.methods import LoRA
from sftlab.methods.token_rows import token_rows_modules
from sftlab.models.load import load_model
from sftlab.runs import RunResult, load_for_inference, prepare, train
from sftlab.train.setup import Setup

peft = pytest.importorskip("peft")  # a test-only dependency

QUIET = Console(quiet=True)
ROWS_KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
HEAD_KEY = "base_model.model.lm_head.token_adapter.trainable_tokens_delta"
QA = [("What is the capital of France?", "Paris."), ("What is 2+2?", "It is 4."), ("Say hi.", "Hello!"),
      ("Explain dice.", "Imagine you have two magic dice...")]


def base_model_dir(path: Path, *, tied: bool, extra_rows: int = 0) -> Path:
    """A tiny random Llama whose vocabulary is the base tiny tokenizer's (no ChatML tokens), plus
    `extra_rows` padding rows."""
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer) + extra_rows, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                         tie_word_embeddings=tied, bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def data_file(path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_config(base: Path, data: Path, out: Path, *overrides: str):
    method = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("method=")), "lora")
    return load_config(overrides=[f"model={base}", f"data.train={data}", f"output_dir={out}", "data.cache=false",
                                  "data.template=chatml", "data.add_special_tokens=true", "model.dtype=float32",
                                  *only_for(method, f"method={method}", "lora.rank=4"), "train.lr=2e-2",
                                  "train.max_steps=6", "train.micro_batch_size=4", *overrides])


@dataclass
class Run:
    base: Path
    setup: Setup
    result: RunResult
    initial: dict[str, torch.Tensor]
    """The trainable tensors right after prepare (before any step)."""


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def run(request, tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("tied" if request.param else "untied")
    base = base_model_dir(root / "base", tied=request.param)
    setup = prepare(run_config(base, data_file(root / "qa.jsonl"), root / "run"), console=QUIET,
                    device=torch.device("cpu"))
    initial = {k: v.clone() for k, v in setup.method.state_dict(setup.model).items()}
    result = train(setup, console=QUIET)
    setup.model.eval()
    return Run(base, setup, result, initial)


def base_weights(base: Path) -> tuple[torch.Tensor, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()


def sample_ids(tokenizer) -> torch.Tensor:
    """Two rows holding the new tokens and old ones, (2, T)."""
    text = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nIt is 4.<|im_end|>\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids, ids[::-1]])


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def test_only_new_rows_and_lora_train(run: Run) -> None:
    model, method, tokenizer = run.setup.model, run.setup.method, run.setup.tokenizer
    old = len(tiny_tokenizer())
    new_ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert list(method.trainable_token_ids) == new_ids == [old, old + 1]
    tied = model.config.tie_word_embeddings
    rows = {"model.embed_tokens.rows"} | (set() if tied else {"lm_head.rows"})
    trainable = method.trainable_parameters(model)
    assert rows <= set(trainable) and all(k.endswith((".A", ".B")) for k in set(trainable) - rows)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in trainable.values()}

    base_embedding, base_head = base_weights(run.base)
    embedding = model.get_input_embeddings().weight.detach()
    head = model.get_output_embeddings().weight.detach()
    assert embedding.shape[0] == old + 2 == len(tokenizer)
    assert torch.equal(embedding[:old], base_embedding)  # exactly the base: never touched
    assert torch.equal(head[:old], base_head)
    for name in rows:
        assert not torch.equal(trainable[name].detach(), run.initial[name]), f"{name} did not train"
    torch.testing.assert_close(embedding[old:], trainable["model.embed_tokens.rows"].detach(), atol=0, rtol=0)
    if tied:
        assert torch.equal(head, embedding)  # the tie holds through training
    else:
        assert not torch.equal(head[old:], embedding[old:])


def test_adapter_holds_rows_in_peft_format(run: Run) -> None:
    adapter = run.result.export_dir
    trainable = run.setup.method.trainable_parameters(run.setup.model)
    state = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    ids = list(run.setup.method.trainable_token_ids)
    assert torch.equal(state[ROWS_KEY], trainable["model.embed_tokens.rows"].detach())
    if run.setup.model.config.tie_word_embeddings:
        assert HEAD_KEY not in state and config["trainable_token_indices"] == ids
    else:
        assert torch.equal(state[HEAD_KEY], trainable["lm_head.rows"].detach())
        assert config["trainable_token_indices"] == {"model.embed_tokens": ids, "lm_head": ids}
    assert "resize_token_embeddings(len(tokenizer))" in (adapter / "README.md").read_text()
    assert len(AutoTokenizer.from_pretrained(adapter)) == ids[-1] + 1


def test_load_for_inference_reproduces_the_trained_model(run: Run) -> None:
    model, tokenizer, _, method = load_for_inference(str(run.result.output_dir), device=torch.device("cpu"))
    ids = sample_ids(tokenizer)
    assert list(method.trainable_token_ids) == list(run.setup.method.trainable_token_ids)
    assert torch.equal(logits(model, ids), logits(run.setup.model, ids))
    # merge writes the rows into the base weights: a plain model with the same output
    adapter_logits = logits(model, ids)
    method.merge(model)
    assert not token_rows_modules(model)
    torch.testing.assert_close(logits(model, ids), adapter_logits, atol=1e-5, rtol=0)


def test_peft_loads_the_adapter_with_the_same_logits(run: Run) -> None:
    tokenizer = AutoTokenizer.from_pretrained(run.result.export_dir)
    base = AutoModelForCausalLM.from_pretrained(run.base, dtype=torch.float32)
    base.resize_token_embeddings(len(tokenizer))  # as the adapter's README.md tells PEFT users
    peft_model = peft.PeftModel.from_pretrained(base, str(run.result.export_dir)).eval()
    ids = sample_ids(tokenizer)
    torch.testing.assert_close(logits(peft_model, ids), logits(run.setup.model, ids), atol=1e-5, rtol=0)


def test_load_adapter_made_by_peft_that_trains_only_embedding_rows(tmp_path: Path) -> None:
    # PEFT's plain-list form on an untied model trains the embedding rows only: the head keeps its base rows.
    # The ids are listed unsorted: PEFT stores the rows in that order.
    base_dir = base_model_dir(tmp_path / "base", tied=False, extra_rows=2)
    vocab = len(tiny_tokenizer())
    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
                                  trainable_token_indices=[vocab + 1, vocab])
    peft_model = peft.get_peft_model(plain, peft_config).eval()
    with torch.no_grad():
        peft_model.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].normal_()
    peft_model.save_pretrained(tmp_path / "peft")

    cfg = load_config(overrides=[f"model={base_dir}", "model.dtype=float32", "lora.rank=4", "lora.alpha=8",
                                 "lora.targets=[q_proj]"])
    model = load_model(cfg.model, device=torch.device("cpu")).eval()
    method = LoRA(cfg, trainable_token_ids=export.adapter_token_ids(tmp_path / "peft"))
    method.apply(model)
    export.load_adapter(model, method, tmp_path / "peft")
    ids = torch.tensor([[vocab + 1, 5, vocab, 17, 3]])
    torch.testing.assert_close(logits(model, ids), logits(peft_model, ids), atol=1e-5, rtol=0)


def test_padded_vocabulary_is_not_shrunk(tmp_path: Path) -> None:
    # The model already has rows beyond the tokenizer: the added tokens take two of them, which then train.
    base = base_model_dir(tmp_path / "base", tied=False, extra_rows=8)
    setup = prepare(run_config(base, data_file(tmp_path / "qa.jsonl"), tmp_path / "run"), console=QUIET,
                    device=torch.device("cpu"))
    vocab = len(tiny_tokenizer())
    assert setup.model.get_input_embeddings().weight.shape[0] == vocab + 8
    assert list(setup.method.trainable_token_ids) == [vocab, vocab + 1]


def test_frozen_embeddings_with_added_tokens_is_refused(tmp_path: Path) -> None:
    base = base_model_dir(tmp_path / "base", tied=True)
    cfg = run_config(base, data_file(tmp_path / "qa.jsonl"), tmp_path / "run", "method=full",
                     "full.freeze_embeddings=true")
    with pytest.raises(ConfigError, match="freeze_embeddings"):
        prepare(cfg, console=QUIET, device=torch.device("cpu"))
