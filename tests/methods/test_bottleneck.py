"""Bottleneck adapters on tiny random models: identity at init for both placements, only the adapters (and
added-token rows) get gradients, save -> load gives the same logits, training through `prepare` + `train`
drives the loss down, and `sftlab merge` refuses with the reason and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import tiny_model_dir, tiny_tokenizer
from sftlab import export
from sftlab.cli import main
from sftlab.config import load_config
from sftlab.errors import SftlabError
from sftlab.methods import METHODS, Bottleneck, LoRA, MergeError
from sftlab.methods.bottleneck import BottleneckAdapter, bottleneck_modules
from sftlab.models.load import load_model
from sftlab.runs import load_for_inference, prepare, train

QA = [("What is the capital of France?", "Paris."), ("What is 2+2?", "Four."),
      ("Who wrote Hamlet?", "Shakespeare wrote it."), ("Color of the sky?", "Blue, on a clear day."),
      ("Name a prime number.", "Seven."), ("Say hi.", "Hi there!")]
ARCHS = ("llama", "gpt2", "qwen2")
PLACED = {  # the blocks each placement wraps in layer N, per architecture
    ("llama", "houlsby"): ("model.layers.{}.self_attn", "model.layers.{}.mlp"),
    ("llama", "pfeiffer"): ("model.layers.{}.mlp",),
    ("qwen2", "houlsby"): ("model.layers.{}.self_attn", "model.layers.{}.mlp"),
    ("qwen2", "pfeiffer"): ("model.layers.{}.mlp",),
    ("gpt2", "houlsby"): ("transformer.h.{}.attn", "transformer.h.{}.mlp"),
    ("gpt2", "pfeiffer"): ("transformer.h.{}.mlp",),
}


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {arch: tiny_model_dir(root / arch, arch=arch, hidden=32) for arch in ARCHS}


def adapter_setup(base_dir: Path, *overrides: str):
    cfg = load_config(overrides=[f"model={base_dir}", "model.dtype=float32", "method=adapter",
                                 "adapter.bottleneck_dim=8", *overrides])
    model = load_model(cfg.model, device=torch.device("cpu")).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    return model, Bottleneck(cfg), ids


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def perturb(model: torch.nn.Module) -> None:
    """Give every adapter non-zero up-projections (at init they are 0: the down projection gets no gradient)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in bottleneck_modules(model).values():
            for param in module.adapter_parameters().values():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("arch, placement", sorted(PLACED))
def test_output_unchanged_at_init_and_blocks_placed(arch: str, placement: str, base_dirs) -> None:
    model, method, ids = adapter_setup(base_dirs[arch], f"adapter.placement={placement}", "adapter.dropout=0.1")
    before = logits(model, ids)
    method.apply(model)
    expected = {name.format(layer) for layer in range(2) for name in PLACED[arch, placement]}
    assert set(bottleneck_modules(model)) == expected
    torch.testing.assert_close(logits(model, ids), before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch, activation", [("llama", "relu"), ("gpt2", "gelu"), ("qwen2", "silu")])
def test_only_adapter_parameters_get_gradients(arch: str, activation: str, base_dirs) -> None:
    model, method, ids = adapter_setup(base_dirs[arch], f"adapter.activation={activation}")
    method.apply(model)
    perturb(model)
    model(input_ids=ids).logits.float().square().mean().backward()
    adapter_params = {id(p) for m in bottleneck_modules(model).values()
                      for p in (*m.adapter_down.parameters(), *m.adapter_up.parameters())}
    assert len(adapter_params) == 4 * 2 * 2  # 2 layers x (attention, MLP) x (2 weights + 2 biases)
    assert {id(p) for p in method.trainable_parameters(model).values()} == adapter_params
    with_grad = {id(p) for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == adapter_params
    assert all(type(m.act).__name__.lower() == activation for m in bottleneck_modules(model).values())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_load_round_trip_gives_identical_logits(arch: str, base_dirs, tmp_path: Path) -> None:
    model, method, ids = adapter_setup(base_dirs[arch])
    method.apply(model)
    perturb(model)
    out = export.save_trained(model, method, method.config, None, tmp_path)
    document = json.loads((out / export.ADAPTER_CONFIG).read_text())
    assert "peft_type" not in document and document["sftlab_method"] == "bottleneck_adapter"
    assert document["modules"] == list(bottleneck_modules(model))
    first = PLACED[arch, "houlsby"][0].format(0)
    assert load_file(out / export.ADAPTER_WEIGHTS)[f"{first}.adapter_down.weight"].shape == (8, 32)

    fresh, fresh_method, _ = adapter_setup(base_dirs[arch])
    fresh_method.apply(fresh)
    export.load_trained(fresh, fresh_method, out)
    assert torch.equal(logits(fresh, ids), logits(model, ids))


@pytest.mark.parametrize("overrides, message", [
    (("adapter.bottleneck_dim=4",),
     r"bottleneck_dim is 8, the model's adapters have 4; set .*adapter.bottleneck_dim=8"),
    (("adapter.activation=gelu",), r"activation is 'relu', the model's adapters have 'gelu'"),
    (("adapter.placement=pfeiffer",), r"wraps other blocks .*adapter only: \['model.layers.0.self_attn'"),
])
def test_loading_into_another_adapter_shape_says_what_to_set(overrides, message, base_dirs, tmp_path) -> None:
    model, method, _ = adapter_setup(base_dirs["llama"])
    method.apply(model)
    out = export.save_trained(model, method, method.config, None, tmp_path)
    other, other_method, _ = adapter_setup(base_dirs["llama"], *overrides)
    other_method.apply(other)
    with pytest.raises(SftlabError, match=message):
        export.load_trained(other, other_method, out)


def test_a_lora_dir_is_not_mistaken_for_a_bottleneck_one(base_dirs, tmp_path: Path) -> None:
    cfg = load_config(overrides=[f"model={base_dirs['llama']}", "method=lora", "lora.rank=2"])
    lora_model = load_model(cfg.model, device=torch.device("cpu"))
    LoRA(cfg).apply(lora_model)
    lora_dir = export.save_trained(lora_model, LoRA(cfg), cfg, None, tmp_path)
    model, method, _ = adapter_setup(base_dirs["llama"])
    method.apply(model)
    with pytest.raises(SftlabError, match="found 'LORA'; this is not a bottleneck adapter dir"):
        export.load_trained(model, method, lora_dir)


def test_merge_refuses_with_the_reason(base_dirs) -> None:
    model, method, _ = adapter_setup(base_dirs["gpt2"], "adapter.activation=silu")
    method.apply(model)
    assert METHODS["adapter"] is Bottleneck and not method.mergeable
    with pytest.raises(MergeError, match=r"non-linearity \(silu\) between its down and up projections"):
        method.merge(model)


# --- through prepare + train, on a base whose tokenizer lacks the ChatML tokens the data step adds ------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """(setup, run dir, printed text) of a short method=adapter run that also trains added-token rows."""
    root = tmp_path_factory.mktemp("run")
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in QA), encoding="utf-8")
    cfg = load_config(overrides=[f"model={root / 'base'}", f"data.train={data}", f"output_dir={root / 'out'}",
                                 "data.cache=false", "data.template=chatml", "data.add_special_tokens=true",
                                 "model.dtype=float32", "method=adapter",
                                 "adapter.bottleneck_dim=16", "train.lr=3e-2", "train.max_steps=20",
                                 "train.micro_batch_size=6", "train.warmup_steps=2"])
    console = Console(record=True, width=200)
    setup = prepare(cfg, console=console)
    train(setup, console=Console(quiet=True))
    return setup, root / "out", console.export_text()


def test_training_drives_the_loss_down_and_prints_the_share(trained) -> None:
    setup, run_dir, printed = trained
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 20 and losses[-1] < 0.5 * losses[0], losses
    assert "method adapter: trainable" in printed
    assert setup.method.trainable_token_ids  # <|im_start|>, <|im_end|> were added: their rows train too
    assert any(name.endswith(".rows") for name in setup.method.trainable_parameters(setup.model))


@pytest.mark.parametrize("where", ["run dir", "adapter dir"])
def test_run_and_adapter_dir_load_for_inference_with_identical_logits(trained, where: str) -> None:
    setup, run_dir, _ = trained
    source = run_dir if where == "run dir" else run_dir / "adapter"  # the bare dir names its base model
    model, tokenizer, _, method = load_for_inference(str(source), device=torch.device("cpu"))
    assert isinstance(method, Bottleneck) and method.trainable_token_ids == setup.method.trainable_token_ids
    assert all(isinstance(m, BottleneckAdapter) for m in bottleneck_modules(model).values())
    ids = torch.tensor([tokenizer.encode("<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n")])
    assert torch.equal(logits(model, ids), logits(setup.model.eval(), ids))


def test_sftlab_merge_refuses_and_writes_nothing(trained, tmp_path: Path, capsys) -> None:
    _, run_dir, _ = trained
    out = tmp_path / "merged"
    assert main(["merge", str(run_dir), "--output", str(out)]) != 0
    error = capsys.readouterr().err
    assert "non-linearity" in error and "W_up·act(W_down·h) is not a matrix" in error
    assert not out.exists()
