"""The loss equals transformers' own causal-LM loss, without ever building full logits."""

from __future__ import annotations

import pytest
import torch
import transformers

from sftlab.data.batching import collate
from sftlab.data.encode import IGNORE_INDEX, Example
from sftlab.train import loss as loss_module
from sftlab.train.loss import loss_sum, supervised_positions

X = IGNORE_INDEX  # X: a label that does not train
EXAMPLES = [Example([1, 5, 6, 7, 8, 9, 10], [X, X, 6, 7, X, 9, 10]), Example([3, 4, 5], [X, 4, 5]),
            Example([2, 2, 2, 2], [X, X, X, 2])]


def tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    config = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen2": lambda: transformers.Qwen2Config(**common),
        "gemma2": lambda: transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=5.0),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4),
    }[arch]()
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt2"])
def test_loss_equals_transformers_loss_and_gradients(arch: str) -> None:
    model = tiny(arch)
    batch = collate(EXAMPLES, pad_id=0)
    ours = loss_sum(model, batch) / batch.num_supervised
    ours.backward()
    our_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    reference = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids, labels=batch.labels).loss
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(our_grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_chunking_does_not_change_the_loss(monkeypatch) -> None:
    model = tiny("llama")
    batch = collate(EXAMPLES, pad_id=0)
    whole = loss_sum(model, batch)
    monkeypatch.setattr(loss_module, "CHUNK_TOKENS", 2)
    torch.testing.assert_close(loss_sum(model, batch), whole, rtol=1e-6, atol=1e-6)


def test_head_runs_only_on_supervised_positions(monkeypatch) -> None:
    model = tiny("llama")
    batch = collate(EXAMPLES, pad_id=0)
    rows = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    with torch.no_grad():  # evaluation: the head module itself, chunk by chunk
        loss_sum(model, batch)
    handle.remove()
    # 4 + 2 + 1 targets (a label at position 0 is never a target), out of 3 x 7 padded positions.
    assert sum(rows) == batch.num_supervised == 7
    fused = []  # training: the fused head loss gets the same 7 positions
    real = loss_module.FusedHeadLoss.forward
    monkeypatch.setattr(loss_module.FusedHeadLoss, "forward",
                        staticmethod(lambda ctx, hidden, *rest:
                                     fused.append(hidden.shape[0]) or real(ctx, hidden, *rest)))
    loss_sum(model, batch).backward()
    assert fused == [7]


@pytest.mark.parametrize("softcap, bias, dtype", [(None, False, torch.float32), (3.0, True, torch.float32),
                                                  (None, False, torch.bfloat16)])
def test_fused_head_loss_equals_autograd_in_value_and_gradients(softcap, bias, dtype) -> None:
    # Three chunks of 4 positions; the reference is autograd over the plain formula, all positions at once.
    torch.manual_seed(0)
    hidden = torch.randn(11, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(40, 16, dtype=dtype, requires_grad=True)
    b = torch.randn(40, dtype=dtype, requires_grad=True) if bias else None
    targets = torch.randint(0, 40, (11,))
    ours = loss_module.FusedHeadLoss.apply(hidden, weight, b, targets, softcap, 4)
    (ours * 0.5).backward()
    got = [t.grad.clone() for t in (hidden, weight, b) if t is not None]
    for t in (hidden, weight, b):
        if t is not None:
            t.grad = None
    logits = torch.nn.functional.linear(hidden, weight, b).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    reference = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    (reference * 0.5).backward()
    want = [t.grad for t in (hidden, weight, b) if t is not None]
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours, reference, **tolerance)
    for mine, theirs in zip(got, want):
        assert mine.dtype == theirs.dtype
        torch.testing.assert_close(mine, theirs, **tolerance)


def test_supervised_positions_shift_once() -> None:
    labels = torch.tensor([[X, 5, X, 7], [X, X, 3, X]])
    index, targets = supervised_positions(labels)
    assert index.tolist() == [0, 2, 5] and targets.tolist() == [5, 7, 3]
