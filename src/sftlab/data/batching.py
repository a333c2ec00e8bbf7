"""Examples -> Batch tensors: right-padded rows, or one padding-free packed row (`collate_packed`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from sftlab.data.encode import IGNORE_INDEX, Example


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor              # (B, T)
    labels: torch.Tensor                 # (B, T), IGNORE_INDEX at padding and untrained tokens
    attention_mask: torch.Tensor | None  # (B, T), 0 at padding; None for a packed row (no padding)
    position_ids: torch.Tensor           # (B, T); in a packed row they restart at 0 for each example
    loss_index: torch.Tensor             # (N,) flat indices into B*T of supervised hidden positions
    loss_targets: torch.Tensor           # (N,) the token each of them predicts
    where: tuple[str, ...] = ()
    cu_seqlens: torch.Tensor | None = None
    """Packed rows only: (examples + 1,) int32 boundaries, example i spans [cu[i], cu[i+1]) of the row."""
    max_seqlen: int = 0
    """Packed rows only: the longest example's length."""

    @property
    def num_supervised(self) -> int:
        return int(self.loss_index.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel()) if self.attention_mask is None else int(self.attention_mask.sum())

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def model_inputs(self) -> dict[str, object]:
        """Keyword arguments of the decoder's forward. A packed row passes its example boundaries under the
        names transformers' varlen attention reads (flash-attention kernels, and sftlab's own packed attention)."""
        if self.cu_seqlens is None:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                    "position_ids": self.position_ids}
        return {"input_ids": self.input_ids, "position_ids": self.position_ids,
                "cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                "max_length_q": self.max_seqlen, "max_length_k": self.max_seqlen}

    def to(self, device: torch.device | str) -> Batch:
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=True)
                 for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)


def collate(examples: Sequence[Example], *, pad_id: int) -> Batch:
    from sftlab.data.shift import supervised_positions

    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    index, targets = supervised_positions(labels)
    return Batch(input_ids, labels, attention_mask, position_ids, index, targets,
                 tuple(e.where for e in examples))


def collate_packed(examples: Sequence[Example]) -> Batch:
    """All examples side by side in one (1, T) row, T = their total length: no padding at all.

    Positions restart at 0 with each example, and the label of each example's first token is ignored, so no
    example's last token is trained to predict the next example's first — as unpacked, where a first token
    is never a target. Attention is kept inside each example by the packed attention (models/attention.py).
    """
    from sftlab.data.shift import supervised_positions

    lengths = [len(e.input_ids) for e in examples]
    input_ids = torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.long).unsqueeze(0)
    labels = torch.tensor([t for e in examples for t in e.labels], dtype=torch.long).unsqueeze(0)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    labels[0, bounds[:-1]] = IGNORE_INDEX
    starts = np.repeat(bounds[:-1], lengths)
    position_ids = torch.from_numpy(np.arange(bounds[-1]) - starts).unsqueeze(0)
    index, targets = supervised_positions(labels)
    return Batch(input_ids, labels, None, position_ids, index, targets, tuple(e.where for e in examples),
                 cu_seqlens=torch.from_numpy(bounds.astype(np.int32)), max_seqlen=max(lengths))
