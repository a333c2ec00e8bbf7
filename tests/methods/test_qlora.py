"""QLoRA on tiny random models: the NF4 base's size and error, identity at init, only adapters train,
merge onto dequant(NF4) == adapter forward, merge onto the original weights, save/load, PEFT export,
and training through prepare + train on CPU."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import tiny_model_dir
from sftlab import export
from sftlab.cli import main
from sftlab.config import load_config
from sftlab.errors import ConfigError
from sftlab.export import fidelity
from sftlab.methods import LoRA, QLoRA
from sftlab.methods.lora import lora_modules
from sftlab.models.load import load_model
from sftlab.models.quant import (
    FORWARD_MAX_REL_ERROR,
    FORWARD_MEAN_REL_ERROR,
    WEIGHT_REL_RMS_ERROR,
    NF4Linear,
    base_weight_bytes,
    nf4_modules,
    quantize,
    to_nf4,
)
from sftlab.models.targets import find_targets, is_linear
from sftlab.runs import prepare, train

QA = [("What is the capital of France?", "Paris."), ("What is 2+2?", "Four."),
      ("Who wrote Hamlet?", "Shakespeare wrote it."), ("Say hi.", "Hi there!")]


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # hidden 64: every weight splits into whole NF4 blocks of 64; default init (std 0.02), as trained models.
    root = tmp_path_factory.mktemp("bases")
    return {arch: tiny_model_dir(root / arch, arch=arch, hidden=64) for arch in ("llama", "gpt2")}


def qlora_config(base_dir: Path, *overrides: str):
    return load_config(overrides=[f"model={base_dir}", "model.dtype=float32", "method=qlora", "lora.rank=4",
                                  "lora.alpha=8", *overrides])


def plain(base_dir: Path) -> torch.nn.Module:
    return load_model(qlora_config(base_dir).model, device=torch.device("cpu")).eval()


def qlora_model(base_dir: Path, *overrides: str, trained: bool = True) -> tuple[torch.nn.Module, QLoRA]:
    """A QLoRA model; `trained`: B drawn at random (seeded) so the adapter is not a no-op."""
    cfg = qlora_config(base_dir, *overrides)
    model, method = plain(base_dir), QLoRA(cfg)
    torch.manual_seed(0)
    method.apply(model)
    if trained:
        for module in lora_modules(model).values():
            torch.nn.init.normal_(module.B, std=0.05)
    return model, method


def input_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))


def is_nf4(param: torch.Tensor) -> bool:
    return type(param.data).__name__ == "NF4Tensor"


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_base_holds_decoder_linears_in_at_most_035x_of_bf16(base_dirs, double_quant: bool) -> None:
    reference = plain(base_dirs["llama"])
    decoder = find_targets(reference, "all-linear")
    bf16_bytes = sum(2 * reference.get_submodule(name).weight.numel() for name in decoder)
    model, _ = qlora_model(base_dirs["llama"], f"qlora.double_quant={str(double_quant).lower()}")

    size = base_weight_bytes(model)
    ratio = size["nf4"] / bf16_bytes
    print(f"NF4 (double_quant={double_quant}): {size['nf4']:,} bytes for {bf16_bytes:,} bytes of bf16 "
          f"weights: {ratio:.3f}x")
    assert size["nf4_as_bf16"] == bf16_bytes  # every decoder linear layer is NF4 ...
    assert ratio <= 0.35
    assert len(nf4_modules(model)) == len(decoder)
    head = model.get_output_embeddings()  # ... and neither the head nor the embeddings are
    assert is_linear(head) and not is_nf4(head.weight) and not is_nf4(model.get_input_embeddings().weight)


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_weight_error_is_the_documented_one(double_quant: bool) -> None:
    weight = torch.randn(256, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    layer = NF4Linear.from_layer(torch.nn.Linear(128, 256).requires_grad_(False), block_size=64,
                                 double_quant=double_quant)
    nf4 = to_nf4(weight, block_size=64, double_quant=double_quant)
    error = ((nf4.get_original_weight() - weight).norm() / weight.norm()).item()
    print(f"NF4 weight relative RMS error (double_quant={double_quant}): {error:.4f}")
    assert 0 < error <= WEIGHT_REL_RMS_ERROR
    x = torch.randn(5, 128)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias))
    assert NF4Linear.from_layer(torch.nn.Linear(10, 3), block_size=64, double_quant=True) is None  # 30 weights


def test_a_block_size_no_layer_fits_is_a_config_error(base_dirs) -> None:
    model = plain(base_dirs["llama"])
    with pytest.raises(ConfigError, match="qlora.block_size=96"):
        QLoRA(qlora_config(base_dirs["llama"], "qlora.block_size=96")).apply(model)
    assert not lora_modules(model) and not nf4_modules(model)  # the model is left as it was


def test_quantised_forward_stays_within_the_documented_error(base_dirs) -> None:
    reference = plain(base_dirs["llama"])
    ids = input_ids(reference.config.vocab_size)
    exact = logits(reference, ids)
    quantised = plain(base_dirs["llama"])
    quantize(quantised, find_targets(quantised, "all-linear"), block_size=64, double_quant=True)

    diff = (logits(quantised, ids) - exact).abs()
    max_rel, mean_rel = (diff.max() / exact.abs().max()).item(), (diff.mean() / exact.abs().mean()).item()
    print(f"NF4 vs fp32 logits: max rel error {max_rel:.4f}, mean rel error {mean_rel:.4f}")
    assert max_rel <= FORWARD_MAX_REL_ERROR and mean_rel <= FORWARD_MEAN_REL_ERROR
    assert diff.max() > 0  # the weights really are quantised


@pytest.mark.parametrize("arch, dora", [("llama", False), ("gpt2", False), ("llama", True)])
def test_identity_at_init(base_dirs, arch: str, dora: bool) -> None:
    nf4_base = plain(base_dirs[arch])
    quantize(nf4_base, find_targets(nf4_base, "all-linear"), block_size=64, double_quant=True)
    model, _ = qlora_model(base_dirs[arch], "lora.dropout=0.1", f"lora.dora={str(dora).lower()}", trained=False)
    ids = input_ids(model.config.vocab_size)
    assert lora_modules(model)
    torch.testing.assert_close(logits(model, ids), logits(nf4_base, ids), atol=1e-6, rtol=0)


def test_only_lora_parameters_get_gradients(base_dirs) -> None:
    model, method = qlora_model(base_dirs["llama"], "lora.targets=[q_proj, v_proj]")
    ids = input_ids(model.config.vocab_size)
    model(input_ids=ids).logits.square().mean().backward()

    trainable = method.trainable_parameters(model)
    adapter_params = {id(p) for m in lora_modules(model).values() for p in (m.A, m.B)}
    assert {id(p) for p in trainable.values()} == adapter_params
    with_grad = {id(p) for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == adapter_params
    for module in nf4_modules(model).values():  # every decoder linear, targets or not, is frozen NF4
        assert not module.weight.requires_grad and module.weight.grad is None
    assert len(nf4_modules(model)) == len(find_targets(plain(base_dirs["llama"]), "all-linear"))
    # The export contract: exactly LoRA's parameter names (PEFT-format export, checkpoints).
    lora_model = plain(base_dirs["llama"])
    LoRA(qlora_config(base_dirs["llama"], "lora.targets=[q_proj, v_proj]")).apply(lora_model)
    assert list(trainable) == list(LoRA(method.config).trainable_parameters(lora_model))


@pytest.mark.parametrize("arch, dora", [("llama", False), ("gpt2", False), ("llama", True)])
def test_merge_onto_dequantized_equals_adapter_forward(base_dirs, arch: str, dora: bool) -> None:
    model, method = qlora_model(base_dirs[arch], f"lora.dora={str(dora).lower()}")
    ids = input_ids(model.config.vocab_size)
    adapter = logits(model, ids)

    merged = method.merge(model)
    assert not any(type(m).__module__.startswith("sftlab.") for m in merged.modules())
    assert not any(is_nf4(p) for p in merged.parameters())
    torch.testing.assert_close(logits(merged, ids), adapter, atol=1e-5, rtol=0)


def test_merge_onto_original_weights_and_which_is_closer(base_dirs) -> None:
    base_dir = base_dirs["llama"]
    model, method = qlora_model(base_dir)
    ids = input_ids(model.config.vocab_size)
    # The same adapter on the unquantised fp32 base: what merging onto the original weights must give.
    reference = plain(base_dir)
    LoRA(method.config).apply(reference)
    reference.load_state_dict({**reference.state_dict(), **{k: v for k, v in model.state_dict().items()
                                                            if k.endswith((".A", ".B"))}})
    expected = logits(reference, ids)

    adapter_model, _ = qlora_model(base_dir)
    onto_original = method.merge(model, onto="original")  # reloads the base from model.path
    torch.testing.assert_close(logits(onto_original, ids), expected, atol=1e-5, rtol=0)
    again, again_method = qlora_model(base_dir)
    given = again_method.merge(again, onto="original", original_state_dict=plain(base_dir).state_dict())
    torch.testing.assert_close(logits(given, ids), expected, atol=1e-5, rtol=0)

    dequantized_model, dequantized_method = qlora_model(base_dir)
    onto_dequantized = dequantized_method.merge(dequantized_model)
    close_dequantized = fidelity(adapter_model, onto_dequantized, ids)
    close_original = fidelity(adapter_model, onto_original, ids)
    print(f"vs the adapter model: onto dequantized {close_dequantized}, onto original {close_original}")
    assert close_dequantized["max_abs_logit_diff"] < 1e-4 < close_original["max_abs_logit_diff"]
    assert close_dequantized["mean_kl"] < close_original["mean_kl"]


def test_save_load_round_trip_gives_identical_logits(base_dirs, tmp_path: Path) -> None:
    model, method = qlora_model(base_dirs["llama"])
    ids = input_ids(model.config.vocab_size)
    save_file({k: v.contiguous() for k, v in method.state_dict(model).items()}, str(tmp_path / "trainable.safetensors"))

    fresh, fresh_method = qlora_model(base_dirs["llama"], trained=False)
    fresh_method.load_state_dict(fresh, load_file(str(tmp_path / "trainable.safetensors")))
    assert torch.equal(logits(fresh, ids), logits(model, ids))


def test_peft_loads_the_adapter_on_the_original_base(base_dirs, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base_dir = base_dirs["llama"]
    model, method = qlora_model(base_dir)
    ids = input_ids(model.config.vocab_size)
    ours = logits(model, ids)
    out = export.save_adapter(model, method, method.config, None, tmp_path / "adapter")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir.resolve())

    peft_model = peft.PeftModel.from_pretrained(plain(base_dir), str(out)).eval()
    theirs = logits(peft_model, ids)
    # PEFT puts the adapter on the fp32 base: it differs from ours by the NF4 error alone ...
    diff = (theirs - ours).abs()
    assert (diff.max() / ours.abs().max()).item() <= FORWARD_MAX_REL_ERROR
    assert (diff.mean() / ours.abs().mean()).item() <= FORWARD_MEAN_REL_ERROR
    # ... and equals the same adapter merged onto the original weights.
    onto_original = method.merge(model, onto="original")
    torch.testing.assert_close(theirs, logits(onto_original, ids), atol=1e-5, rtol=0)


def test_qlora_trains_on_cpu_through_prepare_and_train_and_merges_from_the_cli(tmp_path: Path, capsys) -> None:
    model_dir = tiny_model_dir(tmp_path / "model", hidden=64, init_range=0.2)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in QA), encoding="utf-8")
    cfg = load_config(overrides=[f"model={model_dir}", f"data.train={data}", f"output_dir={tmp_path / 'run'}",
                                 "data.cache=false", "method=qlora", "lora.rank=8", "train.lr=1e-2",
                                 "train.max_steps=12", "train.micro_batch_size=4", "train.warmup_steps=2"])
    console = Console(record=True, width=200)
    setup = prepare(cfg, console=console)
    text = console.export_text()
    assert re.search(r"base weights: [\d.]+ MB \(linear layers [\d.]+ MB NF4, 0\.2\dx of bf16", text), text
    assert nf4_modules(setup.model)
    train(setup, console=Console(quiet=True))

    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    print(f"QLoRA loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps")
    assert losses[-1] < 0.5 * losses[0]
    assert nf4_modules(setup.model) and all(not m.weight.requires_grad for m in nf4_modules(setup.model).values())

    # `sftlab merge --onto original`: a plain HF dir, and the check says the other merge is the closer one.
    merged_dir = tmp_path / "merged"
    assert main(["merge", str(tmp_path / "run"), "--output", str(merged_dir), "--onto", "original"]) == 0
    printed = capsys.readouterr().out
    print(printed)
    assert "onto dequantized (not written)" in printed, printed
    assert "closer to the trained adapter model: onto dequantized" in printed, printed
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    assert not any(type(m).__module__.startswith("sftlab.") for m in merged.modules())
