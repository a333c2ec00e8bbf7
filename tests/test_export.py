"""Export contracts: a sftlab LoRA adapter loads in HF PEFT with the same logits; it loads back into sftlab;
a merged or fully fine-tuned model dir loads in plain transformers with the same logits."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import tiny_model_dir
from sftlab import export
from sftlab.config import load_config
from sftlab.data.templates import CHATML, LLAMA3
from sftlab.errors import SftlabError
from sftlab.methods import Full, LoRA, MergeError
from sftlab.methods.lora import lora_modules
from sftlab.models.load import load_model, load_tokenizer

peft = pytest.importorskip("peft")  # a test-only dependency (pip install -e .[test])

ATOL = 1e-5
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {arch: tiny_model_dir(root / arch, arch=arch, hidden=32) for arch in ("llama", "qwen2", "gpt2")}


def lora_model(base_dir: Path, *overrides: str, seed: int = 0):
    """A base model with LoRA applied and every B randomised, so the adapter changes the output."""
    cfg = load_config(overrides=[f"model={base_dir}", "model.dtype=float32", "lora.rank=4", "lora.alpha=8",
                                 *overrides])
    model = load_model(cfg.model, device=CPU).eval()
    method = LoRA(cfg)
    torch.manual_seed(seed)
    method.apply(model)
    for module in lora_modules(model).values():
        torch.nn.init.normal_(module.B, std=0.05)
    return model, method, cfg


def plain_model(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def input_ids(model: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=generator)


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def safetensors_keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


ALL_LLAMA = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
CASES = {  # case: (arch, overrides, the target_modules PEFT is given)
    "llama-all-linear": ("llama", [], ALL_LLAMA),
    "llama-suffixes": ("llama", ["lora.targets=[q_proj, v_proj, down_proj]"], ["q_proj", "v_proj", "down_proj"]),
    "llama-regex": ("llama", [r"lora.targets=model\.layers\.1\.(self_attn|mlp)\.(k|up)_proj"],
                    r"model\.layers\.1\.(self_attn|mlp)\.(k|up)_proj"),
    "llama-rslora": ("llama", ["lora.rslora=true", "lora.alpha=16"], ALL_LLAMA),
    # PEFT would also wrap embed_tokens with this regex: the export names the wrapped layers exactly.
    "llama-regex-wider-than-linear": ("llama", ["lora.targets=.*(o_proj|embed_tokens)"],
                                      r"model\.layers\.0\.self_attn\.o_proj|model\.layers\.1\.self_attn\.o_proj"),
    "qwen2-all-linear": ("qwen2", [], ALL_LLAMA),
    "gpt2-all-linear": ("gpt2", [], ["c_attn", "c_fc", "c_proj"]),
    "gpt2-suffixes": ("gpt2", ["lora.targets=[c_attn]"], ["c_attn"]),
}


@pytest.mark.parametrize("case", CASES)
def test_adapter_loads_in_peft_with_same_logits(case: str, base_dirs: dict[str, Path], tmp_path: Path) -> None:
    arch, overrides, target_modules = CASES[case]
    model, method, cfg = lora_model(base_dirs[arch], *overrides)
    ids = input_ids(model)
    ours = logits(model, ids)
    base = plain_model(base_dirs[arch])
    assert (ours - logits(base, ids)).abs().max() > 1e-3  # the adapter is not a no-op

    out = export.save_adapter(model, method, cfg, load_tokenizer(str(base_dirs[arch])), tmp_path / "adapter")
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == target_modules

    peft_model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    torch.testing.assert_close(logits(peft_model, ids), ours, atol=ATOL, rtol=0)
    wrapped = {name.removeprefix("base_model.model.") for name, m in peft_model.named_modules()
               if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped == set(lora_modules(model))


def test_adapter_files_use_peft_names(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    model, method, cfg = lora_model(base_dirs["gpt2"], "lora.targets=[c_attn, c_fc]", "lora.dropout=0.1")
    out = export.save_adapter(model, method, cfg, None, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
                                   "use_rslora", "fan_in_fan_out", "bias", "modules_to_save", "init_lora_weights")} \
        == {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
            "target_modules": ["c_attn", "c_fc"], "use_rslora": False, "fan_in_fan_out": True, "bias": "none",
            "modules_to_save": None, "init_lora_weights": True}
    assert config["base_model_name_or_path"] == str(base_dirs["gpt2"].resolve())
    keys = safetensors_keys(out / "adapter_model.safetensors")
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
    assert len(keys) == 2 * 2 * 2  # 2 layers x (c_attn, c_fc) x (lora_A, lora_B)
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        a = f.get_tensor("base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight")
        b = f.get_tensor("base_model.model.transformer.h.0.mlp.c_fc.lora_B.weight")
    assert a.shape == (4, 32) and b.shape == (128, 4)  # (r, in), (out, r); GPT-2's mlp is 4 x n_embd


def test_adapter_dir_carries_tokenizer_and_trained_template(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    model, method, cfg = lora_model(base_dirs["llama"], "data.template=llama3")
    tokenizer = load_tokenizer(str(base_dirs["llama"]))
    out = export.save_adapter(model, method, cfg, tokenizer, tmp_path / "adapter")
    assert AutoTokenizer.from_pretrained(out).chat_template == LLAMA3
    assert tokenizer.chat_template == CHATML  # the caller's tokenizer is left as it was


def test_load_adapter_round_trip(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    for arch in ("llama", "gpt2"):
        model, method, cfg = lora_model(base_dirs[arch], "lora.targets=[q_proj, o_proj, gate_proj, c_attn]")
        out = export.save_adapter(model, method, cfg, None, tmp_path / arch)
        fresh, fresh_method, _ = lora_model(base_dirs[arch], "lora.targets=[q_proj, o_proj, gate_proj, c_attn]",
                                            seed=7)
        ids = input_ids(model)
        assert not torch.equal(logits(fresh, ids), logits(model, ids))
        export.load_adapter(fresh, fresh_method, out)
        assert torch.equal(logits(fresh, ids), logits(model, ids))


def test_load_adapter_made_by_peft(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    torch.manual_seed(0)
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                  task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(plain_model(base_dirs["qwen2"]), peft_config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    model, method, _ = lora_model(base_dirs["qwen2"], "lora.targets=[q_proj, v_proj]")
    export.load_adapter(model, method, tmp_path / "peft")
    ids = input_ids(model)
    torch.testing.assert_close(logits(model, ids), logits(peft_model, ids), atol=ATOL, rtol=0)


MISMATCHES = {
    "rank": (["lora.rank=8"], "lora.rank=4"),
    "alpha": (["lora.alpha=4"], "lora.alpha=8"),
    "rslora": (["lora.rslora=true"], "lora.rslora=false"),
    "targets": (["lora.targets=[q_proj]"], "Set lora.targets"),
}


@pytest.mark.parametrize("case", MISMATCHES)
def test_load_adapter_refuses_other_lora_config(case: str, base_dirs: dict[str, Path], tmp_path: Path) -> None:
    model, method, cfg = lora_model(base_dirs["llama"])
    out = export.save_adapter(model, method, cfg, None, tmp_path / "adapter")
    overrides, hint = MISMATCHES[case]
    other, other_method, _ = lora_model(base_dirs["llama"], *overrides)
    with pytest.raises(SftlabError, match=hint.replace(".", r"\.").replace("[", r"\[")):
        export.load_adapter(other, other_method, out)


def test_load_adapter_refuses_what_is_not_a_lora_adapter(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    model, method, cfg = lora_model(base_dirs["llama"])
    with pytest.raises(SftlabError, match="has no adapter_config.json"):
        export.load_adapter(model, method, tmp_path)
    out = export.save_adapter(model, method, cfg, None, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "lora_bias": True}))
    with pytest.raises(SftlabError, match="lora_bias=True is a PEFT feature sftlab does not support"):
        export.load_adapter(model, method, out)
    (out / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(SftlabError, match="peft_type is 'IA3'"):
        export.load_adapter(model, method, out)
    full_cfg = load_config(overrides=[f"model={base_dirs['llama']}", "method=full"])
    with pytest.raises(SftlabError, match="method is 'full'"):
        export.save_adapter(model, Full(full_cfg), full_cfg, None, tmp_path / "full")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_dir_loads_in_plain_transformers(arch: str, base_dirs: dict[str, Path], tmp_path: Path) -> None:
    model, method, _ = lora_model(base_dirs[arch])
    ids = input_ids(model)
    adapter_logits = logits(model, ids)
    adapter_model = copy.deepcopy(model)

    out = export.merge_to_dir(model, method, load_tokenizer(str(base_dirs[arch])), tmp_path / "merged")

    assert not lora_modules(model)
    merged = plain_model(out)
    torch.testing.assert_close(logits(merged, ids), adapter_logits, atol=ATOL, rtol=0)
    base_keys = safetensors_keys(base_dirs[arch] / "model.safetensors")
    assert safetensors_keys(out / "model.safetensors") == base_keys  # no LoRA keys, no `.base.` renames
    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML
    check = export.fidelity(adapter_model, merged, [ids, {"input_ids": ids[:1], "attention_mask": torch.ones(1, 12)}])
    assert check["max_abs_logit_diff"] < ATOL and abs(check["mean_kl"]) < 1e-10
    unadapted = export.fidelity(plain_model(base_dirs[arch]), merged, ids)
    assert unadapted["max_abs_logit_diff"] > 1e-3 and unadapted["mean_kl"] > 0


def test_merged_dir_loads_without_sftlab(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    model, method, _ = lora_model(base_dirs["qwen2"])
    ids = input_ids(model)
    torch.save(logits(model, ids), tmp_path / "expected.pt")
    torch.save(ids, tmp_path / "ids.pt")
    out = export.merge_to_dir(model, method, load_tokenizer(str(base_dirs["qwen2"])), tmp_path / "merged")
    script = (
        "import sys, torch\n"
        "sys.modules['sftlab'] = None  # any import of sftlab now fails\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"d = {str(tmp_path)!r}\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32).eval()\n"
        f"AutoTokenizer.from_pretrained({str(out)!r})\n"
        "ids = torch.load(d + '/ids.pt')\n"
        "with torch.no_grad():\n"
        "    got = model(input_ids=ids).logits\n"
        "assert (got - torch.load(d + '/expected.pt')).abs().max() < 1e-5\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True,
                            timeout=300,
                            env={"HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_save_model_refuses_unmerged_lora(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    model, _, _ = lora_model(base_dirs["llama"])
    with pytest.raises(MergeError, match="still holds sftlab modules"):
        export.save_model(model, None, tmp_path / "model")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_fine_tune_saves_a_plain_model(arch: str, base_dirs: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_config(overrides=[f"model={base_dirs[arch]}", "model.dtype=float32", "method=full"])
    model = load_model(cfg.model, device=CPU).eval()
    method = Full(cfg)
    method.apply(model)
    with torch.no_grad():
        for param in method.trainable_parameters(model).values():
            param.add_(torch.randn_like(param) * 0.01)

    out = export.save_model(model, load_tokenizer(str(base_dirs[arch])), tmp_path / "model", chat_template=LLAMA3)

    loaded = plain_model(out)
    ids = input_ids(model)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    theirs = loaded.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in model.state_dict().items())
    assert AutoTokenizer.from_pretrained(out).chat_template == LLAMA3
