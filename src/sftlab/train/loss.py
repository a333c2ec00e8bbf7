"""The loss: the LM head only at supervised positions, chunked fp32 cross-entropy. The one place labels shift.

Position t of the hidden states predicts token t+1, so the targets are labels[:, 1:] and a position is
supervised when its target is not IGNORE_INDEX. Only those hidden states go through the output head,
chunk by chunk, each chunk's logits recomputed in backward instead of kept: full (B, T, V) logits never
exist, and ignored positions (prompts, often half of SFT tokens) cost no head FLOPs.

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

from sftlab.data.encode import IGNORE_INDEX

CHUNK_TOKENS = 2048
"""Supervised positions per head chunk: logits of at most CHUNK_TOKENS × vocab floats live at once."""


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat hidden-state indices into B*T, their target ids) for every supervised position.

    Computed where `labels` lives (the CPU, before the batch moves), so the step needs no host sync.
    """
    batch, length = labels.shape
    targets = labels[:, 1:]
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * length + cols, targets[rows, cols]


def hidden_states(model: nn.Module, batch: Any) -> torch.Tensor:
    """The decoder's last hidden states (B, T, H), without the output head (a packed batch is one row)."""
    return model.base_model(**batch.model_inputs(), use_cache=False)[0]


def _head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()  # (chunk, V)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def head_loss_sum(model: nn.Module, hidden: torch.Tensor, index: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over the selected positions of `hidden` (B, T, H)."""
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)  # (N, H)
    head = model.get_output_embeddings()
    softcap = _softcap(model)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], CHUNK_TOKENS):
        chunk, chunk_targets = flat[start:start + CHUNK_TOKENS], targets[start:start + CHUNK_TOKENS]
        if torch.is_grad_enabled():
            total = total + checkpoint(_head_loss, head, chunk, chunk_targets, softcap, use_reentrant=False)
        else:
            total = total + _head_loss(head, chunk, chunk_targets, softcap)
    return total


def loss_sum(model: nn.Module, batch: Any, method: Any = None) -> torch.Tensor:
    """Summed token loss of a batch whose `loss_index`/`loss_targets` came from supervised_positions();
    `method` (a sftlab Method) supplies the hidden states when it changes the forward (soft prompts)."""
    hidden = method.hidden_states(model, batch) if method is not None else hidden_states(model, batch)
    return head_loss_sum(model, hidden, batch.loss_index, batch.loss_targets)


def _softcap(model: nn.Module) -> float | None:
    config = model.config
    text = getattr(config, "get_text_config", lambda: config)()
    return getattr(text, "final_logit_softcapping", None)
