"""Prefix tuning on a tiny random GQA Llama (4 query heads, 2 key/value heads): it trains through the one loop,
with gradient checkpointing giving the same per-step losses; only the prefixes get gradients; the export
loads back in sftlab and in HF PEFT (PREFIX_TUNING) with the same logits; greedy generation equals a greedy
loop over PEFT's forward. (PEFT's own generate() drops prefix-tuning prefixes in peft 0.21, so it is not
the reference.)"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import tiny_model_dir, tiny_tokenizer
from sftlab import export
from sftlab.config import load_config
from sftlab.data.batching import Batch, collate
from sftlab.data.encode import Example
from sftlab.data.templates import load_template
from sftlab.generate import generate, prompt_ids, sample, stop_token_ids
from sftlab.methods import METHODS, MergeError
from sftlab.methods.prefix import Prefix, prefix_encoder
from sftlab.methods.token_rows import token_rows_modules
from sftlab.models.load import load_model
from sftlab.runs import load_for_inference, prepare, train
from sftlab.train.setup import Setup

peft = pytest.importorskip("peft")  # a test-only dependency

QUIET = Console(quiet=True)
QA = [("What is the capital of France?", "Paris."), ("What is 2+2?", "Four."),
      ("Who wrote Hamlet?", "Shakespeare wrote it."), ("Color of the sky?", "Blue, on a clear day."),
      ("Name a prime number.", "Seven."), ("Say hi.", "Hi there!")]
SYSTEM = {"role": "system", "content": "Answer briefly."}
PREFIX = ("method=prefix", "prefix.num_virtual_tokens=4", "prefix.encoder_hidden=32")


@dataclass
class Runs:
    model_dir: Path
    plain: Setup
    checkpointed: Setup

    @property
    def run_dir(self) -> Path:
        return Path(self.plain.config.output_dir)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    """The same prefix-tuning run twice, the second with gradient checkpointing."""
    root = tmp_path_factory.mktemp("prefix")
    model_dir = tiny_model_dir(root / "model", init_range=0.2)
    data = root / "qa.jsonl"
    rows = [{"messages": [SYSTEM, {"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    setups = []
    for name, recompute in (("plain", "false"), ("gc", "true")):
        cfg = load_config(overrides=[f"model={model_dir}", f"data.train={data}", f"output_dir={root / name}",
                                     "data.cache=false", "model.dtype=float32", *PREFIX, "train.lr=5e-2",
                                     "train.max_steps=10", "train.micro_batch_size=6", "train.schedule=constant",
                                     f"train.gradient_checkpointing={recompute}"])
        setup = prepare(cfg, console=QUIET, device=torch.device("cpu"))
        train(setup, console=QUIET)
        setup.model.eval()
        setups.append(setup)
    return Runs(model_dir, *setups)


def padded_batch(vocab: int) -> Batch:
    """Two rows of different lengths (right padding), every position supervised."""
    generator = torch.Generator().manual_seed(1)
    lengths = (9, 5)
    examples = [Example(input_ids=ids, labels=ids) for ids in
                (torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths)]
    return collate(examples, pad_id=0)


def method_logits(model: torch.nn.Module, method: Prefix, batch: Batch) -> torch.Tensor:
    """(B, T, V) logits of the method's training forward."""
    with torch.no_grad():
        return model.get_output_embeddings()(method.hidden_states(model, batch))


def peft_model(base_dir: Path, adapter: Path, *, resize_to: int | None = None):
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if resize_to is not None:
        base.resize_token_embeddings(resize_to)
    return peft.PeftModel.from_pretrained(base, str(adapter)).eval()


def test_trains_and_gradient_checkpointing_gives_the_same_losses(runs: Runs) -> None:
    plain, recomputed = losses(runs.run_dir), losses(Path(runs.checkpointed.config.output_dir))
    assert len(plain) == 10 and plain[-1] < 0.85 * plain[0]
    assert recomputed == pytest.approx(plain, rel=1e-5)
    a = runs.plain.method.state_dict(runs.plain.model)
    b = runs.checkpointed.method.state_dict(runs.checkpointed.model)
    assert set(a) == {"prefix_encoder.embedding.weight", "prefix_encoder.transform.0.weight",
                      "prefix_encoder.transform.0.bias", "prefix_encoder.transform.2.weight",
                      "prefix_encoder.transform.2.bias"}
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("reparameterize", [True, False])
def test_only_prefix_parameters_get_gradients(runs: Runs, reparameterize: bool) -> None:
    cfg = load_config(overrides=[f"model={runs.model_dir}", "model.dtype=float32", *PREFIX,
                                 f"prefix.reparameterize={str(reparameterize).lower()}"])
    model = load_model(cfg.model, device=torch.device("cpu"))
    method = METHODS["prefix"](cfg)
    method.apply(model)
    encoder = prefix_encoder(model)
    # (P, layers · 2 · kv_heads · head_dim): 2 layers, 2 key/value heads of 16 (GQA: 4 query heads)
    assert encoder.table().shape == (4, 2 * 2 * 2 * 16)
    batch = padded_batch(model.config.vocab_size)
    method_logits(model, method, batch)  # a no-grad forward leaves nothing armed
    assert not encoder.armed
    model.get_output_embeddings()(method.hidden_states(model, batch)).square().mean().backward()
    assert not encoder.armed
    trainable = {id(p) for p in method.trainable_parameters(model).values()}
    assert trainable == {id(p) for p in encoder.parameters()}
    with_grad = {id(p) for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == trainable


def test_save_load_round_trip_gives_identical_logits(runs: Runs) -> None:
    model, method = runs.plain.model, runs.plain.method
    batch = padded_batch(model.config.vocab_size)
    prompt = batch.input_ids[:1]
    with torch.no_grad():
        expected = method.prefill(model, prompt).logits
    fresh = load_model(runs.plain.config.model, device=torch.device("cpu")).eval()
    again = METHODS["prefix"](runs.plain.config)
    again.apply(fresh)
    export.load_trained(fresh, again, runs.run_dir / "adapter")
    loaded, _, _, inferred = load_for_inference(str(runs.run_dir), device=torch.device("cpu"))
    assert isinstance(inferred, Prefix)
    for other, other_method in ((fresh, again), (loaded, inferred)):
        with torch.no_grad():
            assert torch.equal(other_method.prefill(other, prompt).logits, expected)
        # the training forward computes the MLP per layer, the export holds its folded table
        torch.testing.assert_close(method_logits(other, other_method, batch), method_logits(model, method, batch),
                                   rtol=0, atol=1e-5)


def test_peft_loads_the_export_with_the_same_logits(runs: Runs) -> None:
    adapter = runs.run_dir / "adapter"
    peft_config = json.loads((adapter / "adapter_config.json").read_text())
    assert {k: peft_config[k] for k in ("peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_layers",
                                        "num_attention_heads", "num_transformer_submodules", "prefix_projection",
                                        "encoder_hidden_size", "inference_mode")} == {
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "token_dim": 32,
        "num_layers": 2, "num_attention_heads": 2, "num_transformer_submodules": 1, "prefix_projection": True,
        "encoder_hidden_size": 32, "inference_mode": True}  # GQA: sized per key/value head, as PEFT does
    assert {k: tuple(v.shape) for k, v in load_file(adapter / "adapter_model.safetensors").items()} == {
        "prompt_embeddings": (4, 2 * 2 * 32)}
    reference = peft_model(runs.model_dir, adapter)
    model, method = runs.plain.model, runs.plain.method
    batch = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        theirs = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(method_logits(model, method, batch)[real], theirs[real], rtol=0, atol=1e-5)


def test_greedy_generation_equals_a_greedy_loop_over_peft_forward(runs: Runs) -> None:
    setup = runs.plain
    template = load_template("auto", setup.tokenizer)
    reference = peft_model(runs.model_dir, runs.run_dir / "adapter")
    stops = set(stop_token_ids(setup.tokenizer, template))
    for question, _ in QA[:3]:
        messages = [SYSTEM, {"role": "user", "content": question}]
        ids = prompt_ids(setup.tokenizer, template, messages)
        new: list[int] = []
        with torch.no_grad():
            for _ in range(8):  # PEFT's forward over the whole sequence each step, no cache
                token = int(reference(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if token in stops:
                    break
                new.append(token)
        assert sample(setup.model, ids, stop_ids=stops, temperature=0, max_new_tokens=8, method=setup.method) == new
        ours = generate(setup.model, setup.tokenizer, template, messages, temperature=0, max_new_tokens=8,
                        method=setup.method)
        assert ours == setup.tokenizer.decode(new, skip_special_tokens=True)


def test_merge_refuses_with_the_reason(runs: Runs) -> None:
    with pytest.raises(MergeError, match="not a change of any weight"):
        runs.plain.method.merge(runs.plain.model)


def base_without_chat_tokens(path: Path, *, tied: bool) -> Path:
    """A tiny random Llama over the base tiny tokenizer, whose vocabulary lacks the ChatML tokens."""
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, tie_word_embeddings=tied,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_added_token_rows_export_and_load_in_sftlab_and_peft(tmp_path: Path, tied: bool) -> None:
    base = base_without_chat_tokens(tmp_path / "base", tied=tied)
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    new_ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    cfg = load_config(overrides=[f"model={base}", "model.dtype=float32", *PREFIX, f"output_dir={tmp_path / 'run'}"])

    def fresh() -> tuple[torch.nn.Module, Prefix]:
        model = load_model(cfg.model, device=torch.device("cpu")).eval()
        model.resize_token_embeddings(len(tokenizer))
        method = Prefix(cfg, trainable_token_ids=new_ids)
        method.apply(model)
        return model, method

    model, method = fresh()
    assert len(token_rows_modules(model)) == 2
    with torch.no_grad():
        for param in method.trainable_parameters(model).values():
            param.add_(torch.randn_like(param) * 0.5)  # as if trained: rows and prefixes away from their start
    adapter = export.save_trained(model, method, cfg, tokenizer, tmp_path / "run")
    assert export.adapter_token_ids(adapter) == sorted(new_ids)
    ids = torch.tensor([[new_ids[0], 5, 6, 7, new_ids[1], 8]])
    batch = collate([Example(input_ids=ids[0].tolist(), labels=ids[0].tolist())], pad_id=0)
    expected = method_logits(model, method, batch)
    loaded, loaded_method = fresh()
    export.load_trained(loaded, loaded_method, adapter)
    torch.testing.assert_close(method_logits(loaded, loaded_method, batch), expected, rtol=0, atol=1e-5)
    reference = peft_model(base, adapter, resize_to=len(tokenizer))
    with torch.no_grad():
        theirs = reference(input_ids=ids).logits
    torch.testing.assert_close(theirs, expected, rtol=0, atol=1e-5)
