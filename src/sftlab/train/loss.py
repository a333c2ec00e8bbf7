"""The loss: the LM head only at supervised positions, chunked fp32 cross-entropy.

Position t of the hidden states predicts token t+1, so the targets are labels[:, 1:] and a position is
supervised when its target is not IGNORE_INDEX (the one place labels shift: data/shift.py, run when a batch
is made). Only those hidden states go through the output head,
chunk by chunk: full (B, T, V) logits never exist, and ignored positions (prompts, often half of SFT
tokens) cost no head FLOPs. For a plain linear head each chunk's gradients (into the hidden states, and
into the head weight when it trains) are computed in the forward pass, right after its loss, so no
chunk's logits outlive it and backward recomputes nothing (`FusedHeadLoss`); any other head runs its
chunks under activation checkpointing instead.

The functions return the *sum* of token losses and the token count; the training loop divides by the
supervised-token count of the whole optimizer step (all micro-batches), so the step loss is the mean
over its tokens, not a mean of per-batch means.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sftlab.data.shift import supervised_positions as supervised_positions  # re-exported: read with the loss
from sftlab.models.forward import hidden_states

CHUNK_TOKENS = 2048
"""Supervised positions per head chunk at most; fewer for big vocabularies (LOGITS_BYTES)."""
LOGITS_BYTES = 256 * 2**20
"""Memory for one chunk's fp32 logits: 256 MiB is 440 positions of a 151k vocabulary, 2048 of ≤ 32k."""


def _head_logits(head: nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """fp32 logits (chunk, V) of any head module, soft-capped."""
    logits = head(hidden).float()
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def _head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return F.cross_entropy(_head_logits(head, hidden, softcap), targets, reduction="sum")


def _selected(model: nn.Module, hidden: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, nn.Module,
                                                                                       float | None, int]:
    """(the selected positions of `hidden` (B, T, H) as (N, H), the output head, its soft-cap, the positions
    per chunk within LOGITS_BYTES)."""
    head = model.get_output_embeddings()
    size = max(1, min(CHUNK_TOKENS, LOGITS_BYTES // (4 * head.weight.shape[0])))
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, index), head, _softcap(model), size


def head_loss_sum(model: nn.Module, hidden: torch.Tensor, index: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over the selected positions of `hidden` (B, T, H)."""
    flat, head, softcap, size = _selected(model, hidden, index)
    if type(head) is nn.Linear and torch.is_grad_enabled():
        return FusedHeadLoss.apply(flat, head.weight, head.bias, targets, softcap, size)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], size):
        chunk, chunk_targets = flat[start:start + size], targets[start:start + size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_head_loss, head, chunk, chunk_targets, softcap, use_reentrant=False)
        else:
            total = total + _head_loss(head, chunk, chunk_targets, softcap)
    return total


class FusedHeadLoss(torch.autograd.Function):
    """Σ cross-entropy(softcap(hidden @ weightᵀ + bias), targets) with its gradients made in the forward pass.

    Per chunk: logits (fp32) -> loss; then dL/dlogits = softmax - onehot (times 1 - tanh² under a soft-cap),
    which gives dL/dhidden = dlogits @ weight and dL/dweight += dlogitsᵀ @ hidden at once. Backward only
    scales what was stored by the incoming gradient: the logits are never kept nor recomputed. The same
    FLOPs as autograd without recompute, and the memory of one chunk.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, softcap: float | None, size: int) -> torch.Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], size):
            chunk, chunk_targets = hidden[start:start + size], targets[start:start + size]
            logits, capped = _capped_logits(chunk, weight, bias, softcap)  # (n, V)
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            total += (lse - logits.gather(1, chunk_targets[:, None]).squeeze(1)).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            dlogits = _dnll(logits, lse, chunk_targets, capped)
            if need_bias:
                grad_bias += dlogits.sum(0)
            dlogits = dlogits.to(weight.dtype)
            if need_hidden:
                grad_hidden[start:start + size] = dlogits @ weight
            if need_weight:  # each chunk's product in the weight's dtype, the sum over chunks in fp32
                grad_weight += dlogits.t() @ chunk.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_total.float()
        return (None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype),
                None if grad_bias is None else (grad_bias * scale).to(ctx.weight_dtype),
                None, None, None)


def loss_sum(model: nn.Module, batch: Any, method: Any = None) -> torch.Tensor:
    """Summed token loss of a batch whose `loss_index`/`loss_targets` came from supervised_positions();
    `method` (a sftlab Method) supplies the hidden states when it changes the forward (soft prompts)."""
    hidden = method.hidden_states(model, batch) if method is not None else hidden_states(model, batch)
    return head_loss_sum(model, hidden, batch.loss_index, batch.loss_targets)


def _softcap(model: nn.Module) -> float | None:
    config = model.config
    text = getattr(config, "get_text_config", lambda: config)()
    return getattr(text, "final_logit_softcapping", None)


def head_logprobs(model: nn.Module, hidden: torch.Tensor, index: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at the selected positions of `hidden` (B, T, H): (N,) fp32, one value per position (for
    losses over whole sequences, e.g. preference training). The head runs on those positions only, one chunk
    of fp32 logits at a time, as for head_loss_sum."""
    flat, head, softcap, size = _selected(model, hidden, index)
    if type(head) is nn.Linear and torch.is_grad_enabled():
        return FusedHeadLogprobs.apply(flat, head.weight, head.bias, targets, softcap, size)
    pieces = [flat.new_zeros(0, dtype=torch.float32)]
    for start in range(0, flat.shape[0], size):
        chunk, chunk_targets = flat[start:start + size], targets[start:start + size]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_head_logprobs, head, chunk, chunk_targets, softcap, use_reentrant=False))
        else:
            pieces.append(_head_logprobs(head, chunk, chunk_targets, softcap))
    return torch.cat(pieces)


def _head_logprobs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return -F.cross_entropy(_head_logits(head, hidden, softcap), targets, reduction="none")


class FusedHeadLogprobs(torch.autograd.Function):
    """log softmax(softcap(hidden @ weightᵀ + bias))[target] per position, (N,) fp32, one chunk of logits at a time.

    d logp_i / d logits_i = onehot_i − softmax_i (times 1 − tanh² under a soft-cap). A frozen head (LoRA and the
    other adapter methods) needs only dlogp_i/dhidden_i = that @ weight, (N, H): it is made in the forward pass and
    backward scales each row by its incoming gradient; the logits are never kept nor recomputed. A head that trains
    (full fine-tuning) needs Σ_i g_i·(onehot_i − softmax_i)ᵀ hidden_i, which depends on the incoming g_i: backward
    then recomputes each chunk's logits (as activation checkpointing would) and forms every gradient from them.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, softcap: float | None, size: int) -> torch.Tensor:
        need_params = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        keep = ctx.needs_input_grad[0] and not need_params
        grad_hidden = torch.empty_like(hidden) if keep else None
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], size):
            chunk, chunk_targets = hidden[start:start + size], targets[start:start + size]
            logits, capped = _capped_logits(chunk, weight, bias, softcap)
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            out[start:start + size] = logits.gather(1, chunk_targets[:, None]).squeeze(1) - lse
            if keep:
                # d logp / d hidden = −(d nll / d logits) @ weight
                grad_hidden[start:start + size] = -(_dnll(logits, lse, chunk_targets, capped).to(weight.dtype) @ weight)
        ctx.softcap, ctx.size, ctx.keep = softcap, size, keep
        ctx.save_for_backward(*((grad_hidden,) if keep else (hidden, weight, bias, targets)))
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.keep:
            (grad_hidden,) = ctx.saved_tensors
            return grad_hidden * grad_out[:, None].to(grad_hidden.dtype), None, None, None, None, None
        hidden, weight, bias, targets = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        size = ctx.size
        for start in range(0, hidden.shape[0], size):
            chunk, chunk_targets = hidden[start:start + size], targets[start:start + size]
            logits, capped = _capped_logits(chunk, weight, bias, ctx.softcap)
            lse = torch.logsumexp(logits, dim=-1)
            dlogits = _dnll(logits, lse, chunk_targets, capped) * -grad_out[start:start + size, None].float()
            if need_bias:
                grad_bias += dlogits.sum(0)
            dlogits = dlogits.to(weight.dtype)
            if need_hidden:
                grad_hidden[start:start + size] = dlogits @ weight
            if need_weight:  # each chunk's product in the weight's dtype, the sum over chunks in fp32
                grad_weight += dlogits.t() @ chunk.to(weight.dtype)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(weight.dtype), None, None, None)


def _capped_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits (n, V) after the soft-cap, and tanh(logits / softcap) (None without one)."""
    logits = F.linear(hidden, weight, bias).float()
    if not softcap:
        return logits, None
    capped = torch.tanh(logits / softcap)
    return capped * softcap, capped


def _dnll(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, capped: torch.Tensor | None) -> torch.Tensor:
    """d −log p(target) / d (pre-cap) logits = softmax − onehot (× (1 − tanh²) under a soft-cap), (n, V), in
    place of `logits` (the gradient of a log-prob is its negation)."""
    dlogits = logits.sub_(lse[:, None]).exp_()  # softmax
    dlogits[torch.arange(len(targets), device=dlogits.device), targets] -= 1.0
    if capped is not None:
        dlogits *= 1.0 - capped.square_()
    return dlogits
