"""A packed row gives every example exactly the per-token loss (and gradients) it has when run alone.

The reference is transformers' own attention (eager or sdpa) on each example by itself, unpadded; the
packed side is sftlab's packed attention on one row holding all of them. If attention leaked across
examples, or positions did not restart, the later examples' losses would differ.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
import transformers

from sftlab.data.batching import Batch, collate, collate_packed
from sftlab.data.encode import IGNORE_INDEX, Example
from sftlab.models.attention import PACKED_EAGER, PACKED_SDPA, packed_attention
from sftlab.train.loss import hidden_states

X = IGNORE_INDEX  # X: a label that does not train


def examples(vocab: int) -> list[Example]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for n, length in enumerate((9, 5, 12, 3, 7)):
        ids = torch.randint(0, vocab, (length,), generator=generator).tolist()
        labels = [X] * 2 + ids[2:] if n % 2 else [X] * (length // 2) + ids[length // 2:]
        out.append(Example(ids, labels, f"x:{n}"))
    return out


def model(arch: str, attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.3)
    config = {
        "llama": lambda: transformers.LlamaConfig(**common),
        # A 4-token sliding window on every layer: examples longer than it need the banded mask.
        "qwen2-window": lambda: transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=4,
                                                         max_window_layers=0),
        # Attention logit soft-capping (explicit path) and alternating sliding-window layers.
        "gemma2": lambda: transformers.Gemma2Config(**common, head_dim=8, sliding_window=4,
                                                    attn_logit_softcapping=2.0, final_logit_softcapping=5.0),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.3),
    }[arch]()
    config._attn_implementation = attn
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).float().eval()  # no dropout


def token_losses(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of every supervised position, in order (computed with full precision logits)."""
    hidden = hidden_states(model, batch)
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.loss_index)
    logits = model.get_output_embeddings()(flat).float()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, batch.loss_targets, reduction="none")


def losses_one_by_one(model: torch.nn.Module, data: list[Example]) -> torch.Tensor:
    """The reference: each example run by itself, unpadded, through the model's own attention."""
    return torch.cat([token_losses(model, collate([e], pad_id=0)) for e in data])


def one_by_one(model: torch.nn.Module, data: list[Example]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reference's per-token losses and the gradients of their sum (the model's gradients left zeroed)."""
    alone = losses_one_by_one(model, data)
    sum(alone).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return alone, reference


def assert_same(model: torch.nn.Module, losses: torch.Tensor, alone: torch.Tensor,
                reference: dict[str, torch.Tensor]) -> None:
    """The packed losses (their sum's gradients in the model) equal the reference's."""
    torch.testing.assert_close(losses, alone, rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], rtol=1e-4, atol=1e-5, msg=name)


CASES = [("llama", "eager"), ("llama", "sdpa"), ("qwen2-window", "eager"), ("qwen2-window", "sdpa"),
         ("gemma2", "eager"), ("gpt2", "eager"), ("gpt2", "sdpa")]


@pytest.mark.parametrize("arch, attn", CASES)
def test_packed_per_token_loss_and_gradients_equal_one_by_one(arch: str, attn: str) -> None:
    net = model(arch, attn)
    data = examples(64)
    alone, reference = one_by_one(net, data)

    with packed_attention(net) as used:
        assert used == {"eager": PACKED_EAGER, "sdpa": PACKED_SDPA}[attn]
        packed = token_losses(net, collate_packed(data))
        sum(packed).backward()
    assert net.config._attn_implementation == attn  # restored for export and generation
    assert_same(net, packed, alone, reference)


def test_the_check_catches_attention_across_examples() -> None:
    # The same comparison with the boundaries removed (one long sequence) must fail: the test can fail.
    net = model("llama", "sdpa")
    data = examples(64)
    alone = losses_one_by_one(net, data)
    batch = collate_packed(data)
    leaky = Batch(**{**batch.__dict__, "cu_seqlens": torch.tensor([0, batch.input_ids.shape[1]], dtype=torch.int32)})
    with packed_attention(net), torch.no_grad():
        wrong = token_losses(net, leaky)
    first = len(token_losses(net, collate([data[0]], pad_id=0)))
    torch.testing.assert_close(wrong[:first], alone[:first])  # the first example sees nothing else anyway
    assert (wrong[first:] - alone[first:]).abs().max() > 1e-3


def test_packed_attention_without_boundaries_is_an_error() -> None:
    net = model("llama", "sdpa")
    batch = collate([examples(64)[0]], pad_id=0)
    with packed_attention(net), pytest.raises(Exception, match="without example boundaries"):
        hidden_states(net, batch)


def test_an_unsupported_attention_is_refused_with_the_fix() -> None:
    net = model("llama", "sdpa")
    net.config._attn_implementation = "paged_attention"
    with pytest.raises(Exception, match="model.attn_implementation=sdpa, or data.packing=false"), packed_attention(net):
        pass


def _stand_in_varlen(wrong: bool = False):
    """A CPU stand-in for torch.nn.attention.varlen.varlen_attn with the current signature: (T, H, D)
    tensors, cu_seq boundaries, window_size=(-1, 0) for causal; per-example sdpa inside."""
    calls = []

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False):
        calls.append({"shape": tuple(query.shape), "window": tuple(window_size), "gqa": enable_gqa, "max": max_q})
        bounds = cu_seq_q.tolist()
        outs = []
        for a, b in itertools.pairwise(bounds):
            q, k, v = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (query, key, value))
            outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=window_size == (-1, 0), scale=scale,
                                                       enable_gqa=enable_gqa)[0].transpose(0, 1))
        out = torch.cat(outs)
        return out * 1.5 if wrong else out

    return varlen_attn, calls


@pytest.mark.parametrize("wrong", [False, True])
def test_the_one_kernel_path_is_checked_once_against_per_example_attention(monkeypatch, wrong) -> None:
    # The CUDA path (one varlen flash-attention call per row) cannot run here; with a stand-in kernel the
    # layouts, GQA, causal window and the first-call check are exercised. A wrong kernel is caught at its
    # first call and never used again; a right one gives the per-example result.
    import torch.nn.attention.varlen as varlen_module

    from sftlab.models import attention

    kernel, calls = _stand_in_varlen(wrong)
    monkeypatch.setattr(varlen_module, "varlen_attn", kernel)
    monkeypatch.setattr(attention, "_varlen_state", {"checked": False, "ok": False})
    monkeypatch.setattr(attention, "_varlen_usable", lambda query: not attention._varlen_state["checked"]
                        or attention._varlen_state["ok"])
    net = model("llama", "sdpa")
    data = examples(64)
    alone = losses_one_by_one(net, data)
    with packed_attention(net):
        if wrong:
            with pytest.warns(UserWarning, match="disagreed with per-example attention"):
                packed = token_losses(net, collate_packed(data))
        else:
            packed = token_losses(net, collate_packed(data))
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    batch = collate_packed(data)
    assert calls[0] == {"shape": (batch.input_ids.shape[1], 4, 8), "window": (-1, 0), "gqa": True,
                        "max": batch.max_seqlen}
    assert len(calls) == (1 if wrong else 2)  # 2 layers; a wrong kernel is dropped after its first call


def test_flash_attention_keeps_its_own_varlen_path_and_gets_the_boundaries() -> None:
    # flash_attention_2 (GPU + flash-attn) reads transformers' varlen keyword arguments itself: the model's
    # attention stays as it is, and a packed batch hands over exactly those arguments.
    net = model("llama", "sdpa")
    net.config._attn_implementation = "flash_attention_2"
    with packed_attention(net) as used:
        assert used == "flash_attention_2" and net.config._attn_implementation == "flash_attention_2"
    inputs = collate_packed(examples(64)).model_inputs()
    assert set(inputs) == {"input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                           "max_length_q", "max_length_k"}
    assert inputs["cu_seq_lens_q"].dtype == torch.int32 and isinstance(inputs["max_length_q"], int)


# --- shared prefixes: examples that begin alike read one copy of the beginning (data.share_prefixes) ---

def sharing_examples(vocab: int) -> list[Example]:
    """Conversations with a common 12-token untrained beginning (a system prompt), of which each shares what
    it may: all of it, part of it (its trained tokens start inside it, or it differs early), or nothing."""
    generator = torch.Generator().manual_seed(2)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=generator).tolist()

    system = tokens(12)
    out = []
    for n, (tail, untrained) in enumerate(((7, 4), (5, 2), (9, 6), (3, 0), (6, 3))):
        ids = system + tokens(tail)
        out.append(Example(ids, [X] * (12 + untrained) + ids[12 + untrained:], f"s:{n}"))
    early = system[:9] + tokens(6)  # differs from token 9 on: shares 9
    out.append(Example(early, [X] * 11 + early[11:], "s:early"))
    trained_inside = system + tokens(4)  # trains from token 6 on: may share 5 tokens only (< 8: runs whole)
    out.append(Example(trained_inside, [X] * 6 + trained_inside[6:], "s:inside"))
    out.append(examples(vocab)[2])  # an unrelated example
    return out


def test_shared_prefixes_cover_exactly_the_untrained_common_beginning() -> None:
    data = sharing_examples(64)
    batch = collate_packed(data, share_prefixes=True)
    lengths = [length for _, length in batch.shared]
    # The first runs whole; the full-prompt ones share 12 (the 4th trains its first tail token, so 12 - 1 = 11);
    # the early one 9; the one trained inside the prompt and the unrelated one none.
    assert lengths == [0, 12, 12, 11, 12, 9, 0, 0]
    assert all(start == 0 for start, length in batch.shared if length)  # the copy is the first example's
    assert batch.input_ids.shape[1] == sum(len(e.input_ids) for e in data) - sum(lengths)
    assert batch.num_tokens == sum(len(e.input_ids) for e in data) and batch.shared_tokens == sum(lengths)
    assert batch.num_supervised == collate_packed(data).num_supervised  # every trained token still trained
    # An example keeps its positions: the 2nd's first token in the row stands at position 12.
    second = int(batch.cu_seqlens[1])
    assert batch.position_ids[0, second].item() == 12
    assert collate_packed(data).shared == ()  # off unless asked for


@pytest.mark.parametrize("arch, attn", CASES)
def test_shared_prefixes_give_the_per_token_loss_and_gradients_of_one_by_one(arch: str, attn: str) -> None:
    net = model(arch, attn)
    data = sharing_examples(64)
    alone, reference = one_by_one(net, data)

    batch = collate_packed(data, share_prefixes=True)
    assert batch.shared_tokens > 50
    with packed_attention(net):
        shared = token_losses(net, batch)
        sum(shared).backward()
    assert_same(net, shared, alone, reference)


def test_the_check_catches_a_shared_prefix_read_from_the_wrong_place() -> None:
    # Pointing the shared examples at the wrong copy (one token late) must change their losses: the
    # comparison above can fail.
    net = model("llama", "sdpa")
    data = sharing_examples(64)
    alone = losses_one_by_one(net, data)
    batch = collate_packed(data, share_prefixes=True)
    moved = Batch(**{**batch.__dict__, "shared": tuple((start + 1 if n else 0, n) for start, n in batch.shared)})
    with packed_attention(net), torch.no_grad():
        wrong = token_losses(net, moved)
    assert (wrong - alone).abs().max() > 1e-3


def test_prefix_sharing_only_where_the_packed_attention_reads_it() -> None:
    from sftlab.models.attention import prefix_sharing

    net = model("llama", "sdpa")
    assert prefix_sharing(net)
    with packed_attention(net):
        assert prefix_sharing(net)
    net.config._attn_implementation = "flash_attention_2"  # its kernel would ignore the shared prefixes
    assert not prefix_sharing(net)
