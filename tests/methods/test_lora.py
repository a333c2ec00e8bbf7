"""LoRA on tiny random models: identity at init, only adapters get gradients, merge == adapter forward,
unmerge restores W0 — for nn.Linear (Llama) and GPT-2's transposed Conv1D."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_model_dir
from sftlab.config import load_config
from sftlab.methods import LoRA
from sftlab.methods.lora import LoRALinear, lora_modules
from sftlab.models.load import load_model

ARCHS = ("llama", "gpt2")


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {arch: tiny_model_dir(root / arch, arch=arch, hidden=32) for arch in ARCHS}


def lora_setup(base_dir: Path, *overrides: str):
    cfg = load_config(overrides=[f"model={base_dir}", "model.dtype=float32", "lora.rank=4", *overrides])
    model = load_model(cfg.model, device=torch.device("cpu")).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    return model, LoRA(cfg), ids


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_output_unchanged_at_init(arch: str, base_dirs: dict[str, Path]) -> None:
    model, method, ids = lora_setup(base_dirs[arch], "lora.dropout=0.1")
    before = logits(model, ids)
    torch.manual_seed(0)
    method.apply(model)
    assert lora_modules(model)
    torch.testing.assert_close(logits(model, ids), before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_only_lora_parameters_get_gradients(arch: str, base_dirs: dict[str, Path]) -> None:
    model, method, ids = lora_setup(base_dirs[arch])
    method.apply(model)
    for module in lora_modules(model).values():
        torch.nn.init.normal_(module.B, std=0.05)  # with B = 0, A would get no gradient
    model(input_ids=ids).logits.float().square().mean().backward()
    trainable = method.trainable_parameters(model)
    adapter_params = {id(p) for m in lora_modules(model).values() for p in (m.A, m.B)}
    assert {id(p) for p in trainable.values()} == adapter_params
    with_grad = {id(p) for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == adapter_params


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_equals_adapter_forward_and_unmerge_restores_w0(arch: str, base_dirs: dict[str, Path]) -> None:
    model, method, ids = lora_setup(base_dirs[arch], "lora.alpha=16")
    method.apply(model)
    modules = lora_modules(model)
    for module in modules.values():
        torch.nn.init.normal_(module.B, std=0.05)
    w0 = {name: module.base.weight.detach().clone() for name, module in modules.items()}
    adapter = logits(model, ids)

    assert_merge_round_trip(model, method, modules, ids, adapter, w0)


def assert_merge_round_trip(model, method, modules, ids, adapter, w0) -> None:
    """merge() gives the adapter's logits (1e-5), unmerge() restores W0 (1e-6) and the logits, and the
    method's merge leaves a plain model with the same logits. Shared by the LoRA and DoRA tests."""
    for module in modules.values():
        module.merge()
    torch.testing.assert_close(logits(model, ids), adapter, atol=1e-5, rtol=0)
    for module in modules.values():
        module.unmerge()
    for name, module in modules.items():
        torch.testing.assert_close(module.base.weight, w0[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, ids), adapter, atol=1e-5, rtol=0)

    plain = method.merge(model)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    torch.testing.assert_close(logits(plain, ids), adapter, atol=1e-5, rtol=0)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_a_half_precision_base_runs_the_update_in_its_dtype_and_matches_fp64(half: torch.dtype) -> None:
    """Over a bf16/fp16 base the thin products run in the base's dtype (the fp32 adapter cast down), so no
    fp32 copy of the (tokens, in) input is made or kept for the backward; output and gradients still agree
    with the same computation in fp64 to the half dtype's rounding, and A, B keep fp32 values and gradients."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48, bias=True).to(half)
    layer = LoRALinear(base, rank=8, alpha=16)
    torch.nn.init.normal_(layer.B, std=0.05)  # B = 0 at init would hide the update
    x = torch.randn(3, 5, 64).to(half).requires_grad_()
    saved: list[tuple[torch.dtype, torch.Size]] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.append((tensor.dtype, tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        out = layer(x)
    assert out.dtype == half
    assert not any(dtype == torch.float32 and shape[-1] in (64, 48) for dtype, shape in saved), saved
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out.float() * weight).sum().backward()
    assert layer.A.grad.dtype == layer.B.grad.dtype == torch.float32

    x64 = x.detach().double().requires_grad_()
    A, B = layer.A.detach().double().requires_grad_(), layer.B.detach().double().requires_grad_()
    ref = torch.nn.functional.linear(x64, base.weight.double(), base.bias.double())
    ref = ref + layer.scaling * (x64 @ A.t()) @ B.t()
    (ref * weight.double()).sum().backward()
    tolerance = 2e-2 if half == torch.bfloat16 else 3e-3
    for got, want in ((out.double(), ref), (x.grad.double(), x64.grad), (layer.A.grad.double(), A.grad),
                      (layer.B.grad.double(), B.grad)):
        assert (got - want).abs().max() <= tolerance * want.abs().max(), (got - want).abs().max()


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_dora_over_a_half_precision_base_matches_fp64_without_fp32_activations(half: torch.dtype) -> None:
    """DoRA's forward over a bf16/fp16 base keeps its activations in the base's dtype (m/n − 1 and (m/n)·s
    formed in fp32, then cast) and agrees with out = W0·x + b + (m/n − 1)·W0·x + (m/n)·s·B·A·x in fp64, n
    detached, for the output and the gradients of x, A, B and m."""
    from sftlab.methods.lora import DoRALinear

    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48, bias=True).to(half)
    layer = DoRALinear(base, rank=8, alpha=16)
    torch.nn.init.normal_(layer.B, std=0.05)
    with torch.no_grad():
        layer.magnitude.mul_(1 + 0.1 * torch.randn(48))
    x = torch.randn(3, 5, 64).to(half).requires_grad_()
    saved: list[tuple[torch.dtype, torch.Size]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, t.shape)) or t, lambda t: t):
        out = layer(x)
    assert out.dtype == half
    assert not any(dtype == torch.float32 and len(shape) > 1 and shape[0] == 3 for dtype, shape in saved), saved
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out.float() * weight).sum().backward()

    x64 = x.detach().double().requires_grad_()
    A, B = layer.A.detach().double().requires_grad_(), layer.B.detach().double().requires_grad_()
    m = layer.magnitude.detach().double().requires_grad_()
    w0, bias = base.weight.double(), base.bias.double()
    norm = torch.linalg.vector_norm(w0 + layer.scaling * (B @ A), dim=1).detach()
    plain = torch.nn.functional.linear(x64, w0)
    ref = plain + bias + (m / norm - 1) * plain + (m / norm) * layer.scaling * ((x64 @ A.t()) @ B.t())
    (ref * weight.double()).sum().backward()
    tolerance = 2e-2 if half == torch.bfloat16 else 3e-3
    for got, want in ((out.double(), ref), (x.grad.double(), x64.grad), (layer.A.grad.double(), A.grad),
                      (layer.B.grad.double(), B.grad), (layer.magnitude.grad.double(), m.grad)):
        assert (got - want).abs().max() <= tolerance * want.abs().max(), (got - want).abs().max()

    dropped = DoRALinear(torch.nn.Linear(64, 48).to(half), rank=8, alpha=16, dropout=0.1).train()
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, t.shape)) or t, lambda t: t):
        out = dropped(x.detach())
    out.float().sum().backward()  # W0·x' from the dropped input, in the base's dtype
    assert out.dtype == half and dropped.magnitude.grad.dtype == torch.float32
    assert not any(dtype == torch.float32 and len(shape) > 1 and shape[0] == 3 for dtype, shape in saved), saved
