"""DoRA (`lora.dora: true`) on tiny random models: identity at init, only A, B and the magnitude get gradients,
merge == adapter forward and unmerge restores W0, HF PEFT loads the export with the same logits and gradients,
save -> load round trip, and training drives the loss down — for nn.Linear (Llama) and GPT-2's Conv1D."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import safe_open
from test_lora import assert_merge_round_trip
from transformers import AutoModelForCausalLM

from conftest import tiny_model_dir
from sftlab import export
from sftlab.config import load_config
from sftlab.errors import SftlabError
from sftlab.methods import LoRA
from sftlab.methods.lora import DoRALinear, lora_modules
from sftlab.models.load import load_model

peft = pytest.importorskip("peft")  # a test-only dependency (pip install -e .[test])

ARCHS = ("llama", "gpt2")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {arch: tiny_model_dir(root / arch, arch=arch, hidden=32) for arch in ARCHS}


def dora_model(base_dir: Path, *overrides: str, seed: int = 0, randomise: bool = True):
    """A base model with DoRA applied; with `randomise`, every B and magnitude are moved off their init so
    both the direction and the magnitude change the output."""
    cfg = load_config(overrides=[f"model={base_dir}", "model.dtype=float32", "lora.dora=true", "lora.rank=4",
                                 "lora.alpha=8", *overrides])
    model = load_model(cfg.model, device=CPU).eval()
    method = LoRA(cfg)
    torch.manual_seed(seed)
    method.apply(model)
    if randomise:
        with torch.no_grad():
            for module in lora_modules(model).values():
                torch.nn.init.normal_(module.B, std=0.05)
                module.magnitude.mul_(1 + 0.2 * torch.randn_like(module.magnitude))
    return model, method, cfg


def plain_model(base_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def input_ids(model: torch.nn.Module) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("arch", ARCHS)
def test_output_unchanged_at_init(arch: str, base_dirs: dict[str, Path]) -> None:
    model, _, _ = dora_model(base_dirs[arch], "lora.dropout=0.1", randomise=False)
    modules = lora_modules(model)
    assert modules and all(isinstance(m, DoRALinear) for m in modules.values())
    ids = input_ids(model)
    torch.testing.assert_close(logits(model, ids), logits(plain_model(base_dirs[arch]), ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_only_a_b_and_magnitude_get_gradients(arch: str, base_dirs: dict[str, Path]) -> None:
    model, method, _ = dora_model(base_dirs[arch])
    model(input_ids=input_ids(model)).logits.square().mean().backward()
    adapter_params = {id(p) for m in lora_modules(model).values() for p in (m.A, m.B, m.magnitude)}
    assert {id(p) for p in method.trainable_parameters(model).values()} == adapter_params
    assert {name.rsplit(".", 1)[-1] for name in method.trainable_parameters(model)} == {"A", "B", "magnitude"}
    with_grad = {id(p) for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == adapter_params


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_equals_adapter_forward_and_unmerge_restores_w0(arch: str, base_dirs: dict[str, Path]) -> None:
    model, method, _ = dora_model(base_dirs[arch])
    modules = lora_modules(model)
    ids = input_ids(model)
    w0 = {name: module.base.weight.detach().clone() for name, module in modules.items()}
    adapter = logits(model, ids)
    assert (adapter - logits(plain_model(base_dirs[arch]), ids)).abs().max() > 1e-3  # not a no-op

    assert_merge_round_trip(model, method, modules, ids, adapter, w0)


def peft_params(peft_model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """PEFT's adapter parameters by sftlab's names (`<module>.A`, `.B`, `.magnitude`)."""
    ours = {"lora_A.default.weight": "A", "lora_B.default.weight": "B",
            "lora_magnitude_vector.default.weight": "magnitude"}
    params = {}
    for name, param in peft_model.named_parameters():
        for suffix, short in ours.items():
            if name.endswith("." + suffix):
                module = name.removeprefix("base_model.model.").removesuffix("." + suffix)
                params[f"{module}.{short}"] = param
    return params


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_loads_export_with_same_logits_and_gradients(arch: str, base_dirs: dict[str, Path],
                                                          tmp_path: Path) -> None:
    model, method, cfg = dora_model(base_dirs[arch])
    ids = input_ids(model)
    out = export.save_adapter(model, method, cfg, None, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["fan_in_fan_out"] is (arch == "gpt2")
    name = next(iter(lora_modules(model)))
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        assert f"base_model.model.{name}.lora_magnitude_vector" in set(f.keys())

    peft_model = peft.PeftModel.from_pretrained(plain_model(base_dirs[arch]), str(out), is_trainable=True).eval()
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), atol=1e-5, rtol=0)

    # The detached weight norm: the same loss gives A, B and the magnitude the same gradients as in PEFT.
    theirs = peft_params(peft_model)
    ours = method.trainable_parameters(model)
    assert set(theirs) == set(ours)
    for m in (model, peft_model):
        m(input_ids=ids).logits.square().mean().backward()
    for key, param in ours.items():
        torch.testing.assert_close(param.grad, theirs[key].grad, atol=1e-6, rtol=1e-4, msg=key)


def test_dropout_in_training_matches_peft(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    # With dropout on, PEFT's base term keeps the undropped input and only the DoRA correction sees the
    # dropped one; both draw one dropout mask per layer in the same order, so a shared seed gives equal logits.
    model, method, cfg = dora_model(base_dirs["llama"], "lora.dropout=0.3")
    out = export.save_adapter(model, method, cfg, None, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(plain_model(base_dirs["llama"]), str(out), is_trainable=True)
    ids = input_ids(model)
    model.train()
    peft_model.train()
    results = []
    for m in (model, peft_model):
        torch.manual_seed(3)
        results.append(logits(m, ids))
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=0)
    torch.manual_seed(4)
    assert not torch.allclose(logits(model, ids), results[0], atol=1e-4)  # dropout is really on


@pytest.mark.parametrize("arch", ARCHS)
def test_load_adapter_round_trip(arch: str, base_dirs: dict[str, Path], tmp_path: Path) -> None:
    model, method, cfg = dora_model(base_dirs[arch])
    out = export.save_adapter(model, method, cfg, None, tmp_path / "adapter")
    fresh, fresh_method, _ = dora_model(base_dirs[arch], seed=7)
    ids = input_ids(model)
    assert not torch.equal(logits(fresh, ids), logits(model, ids))
    export.load_adapter(fresh, fresh_method, out)
    assert torch.equal(logits(fresh, ids), logits(model, ids))


def test_load_dora_adapter_made_by_peft(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    torch.manual_seed(0)
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True,
                                  init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(plain_model(base_dirs["llama"]), peft_config).eval()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn_like(param))
    peft_model.save_pretrained(tmp_path / "peft")
    model, method, _ = dora_model(base_dirs["llama"], "lora.targets=[q_proj, v_proj]", randomise=False)
    export.load_adapter(model, method, tmp_path / "peft")
    ids = input_ids(model)
    torch.testing.assert_close(logits(model, ids), logits(peft_model, ids), atol=1e-5, rtol=0)


def test_load_adapter_refuses_dora_mismatch(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    model, method, cfg = dora_model(base_dirs["llama"])
    dora_dir = export.save_adapter(model, method, cfg, None, tmp_path / "dora")
    plain, plain_method, _ = dora_model(base_dirs["llama"], "lora.dora=false", randomise=False)
    with pytest.raises(SftlabError, match=r"use_dora=true.*Set lora\.dora=true"):
        export.load_adapter(plain, plain_method, dora_dir)
    lora_dir = export.save_adapter(plain, plain_method, cfg, None, tmp_path / "lora")
    with pytest.raises(SftlabError, match=r"use_dora=false.*Set lora\.dora=false"):
        export.load_adapter(model, method, lora_dir)


def test_dora_drives_the_loss_down(tmp_path: Path) -> None:
    from sftlab.runs import prepare, train

    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in [("What is the capital of France?", "Paris."), ("What is 2+2?", "Four."),
                         ("Say hi.", "Hi there!"), ("Name a prime number.", "Seven.")]]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    model_dir = tiny_model_dir(tmp_path / "model", init_range=0.2)
    cfg = load_config(overrides=[f"model={model_dir}", f"data.train={data}", f"output_dir={tmp_path / 'run'}",
                                 "data.cache=false", "train.log_every_steps=1", "method=lora", "lora.dora=true",
                                 "lora.rank=8", "train.lr=1e-2", "train.max_steps=8", "train.micro_batch_size=4",
                                 "train.warmup_steps=2"])
    quiet = Console(quiet=True)
    setup = prepare(cfg, console=quiet)
    assert any(isinstance(m, DoRALinear) for m in setup.model.modules())
    result = train(setup, console=quiet)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.2 * losses[0]  # measured: 7.6 -> 0.31
    assert json.loads((result.export_dir / "adapter_config.json").read_text())["use_dora"] is True
