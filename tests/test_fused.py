"""Fused RMSNorm / SiLU-gated MLP: swapped in only where they compute what the original modules compute."""

from __future__ import annotations

import torch
import transformers

from sftlab.models.fused import SiluGate, fuse


def tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.3)
    config = {"llama": lambda: transformers.LlamaConfig(**common),
              "qwen2": lambda: transformers.Qwen2Config(**common),
              "gemma2": lambda: transformers.Gemma2Config(**common, head_dim=8)}[arch]()
    return transformers.AutoModelForCausalLM.from_config(config).float().eval()


def logits_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_silu_gate_gradients_match_autograd() -> None:
    gate = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SiluGate.apply, (gate, up))
    torch.testing.assert_close(SiluGate.apply(gate, up), torch.nn.functional.silu(gate) * up)


def test_llama_and_qwen2_fuse_norms_and_mlps_with_the_same_logits_and_gradients() -> None:
    ids = torch.randint(0, 64, (2, 9))
    for arch in ("llama", "qwen2"):
        model = tiny(arch)
        before = logits_and_grads(model, ids)
        fused = fuse(model)
        name = {"llama": "Llama", "qwen2": "Qwen2"}[arch]
        # 2 layers x 2 norms + the final norm; 2 MLPs.
        assert sorted(fused) == [f"{name}MLP (gated MLP) × 2", f"{name}RMSNorm (RMSNorm) × 5"]
        after = logits_and_grads(model, ids)
        torch.testing.assert_close(after[0], before[0], rtol=1e-5, atol=1e-6)
        for key, grad in before[1].items():
            torch.testing.assert_close(after[1][key], grad, rtol=1e-4, atol=1e-6, msg=key)
        assert set(model.state_dict()) == set(tiny(arch).state_dict())  # nothing renamed or added


def test_lookalikes_keep_their_own_forward() -> None:
    # Gemma-2's norm scales by (1 + weight) and its MLP uses a tanh-GELU: the check refuses both.
    model = tiny("gemma2")
    ids = torch.randint(0, 64, (1, 7))
    before = model(input_ids=ids).logits
    assert fuse(model) == []
    torch.testing.assert_close(model(input_ids=ids).logits, before)


def test_a_wrapper_that_forwards_attribute_reads_is_not_taken_for_an_mlp() -> None:
    # A bottleneck adapter around an MLP answers `gate_proj` from its base block; fusing the wrapper would
    # drop the adapter branch (and the check cannot see it: that branch starts at zero).
    from sftlab.methods.bottleneck import BottleneckAdapter

    mlp = tiny("llama").model.layers[0].mlp
    wrapper = BottleneckAdapter(mlp, hidden_size=32, bottleneck_dim=4, activation="relu")
    holder = torch.nn.Sequential(wrapper)
    holder.get_input_embeddings = lambda: torch.nn.Embedding(2, 32)
    assert fuse(holder) == ["LlamaMLP (gated MLP) × 1"]  # the block inside, not the wrapper
    assert "forward" not in wrapper.__dict__ and "forward" in mlp.__dict__
