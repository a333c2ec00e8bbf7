"""Examples -> Batch tensors (right-padded), and the seeded per-epoch order the loop walks through."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import torch

from sftlab.data.encode import IGNORE_INDEX, Example


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor       # (B, T)
    labels: torch.Tensor          # (B, T), IGNORE_INDEX at padding and untrained tokens
    attention_mask: torch.Tensor  # (B, T), 0 at padding
    position_ids: torch.Tensor    # (B, T)
    loss_index: torch.Tensor      # (N,) flat indices into B*T of supervised hidden positions
    loss_targets: torch.Tensor    # (N,) the token each of them predicts
    where: tuple[str, ...] = ()

    @property
    def num_supervised(self) -> int:
        return int(self.loss_index.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> "Batch":
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=True)
                 for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)


def collate(examples: Sequence[Example], *, pad_id: int) -> Batch:
    from sftlab.train.loss import supervised_positions

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


def epoch_order(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of epoch `epoch`: a pure function of (seed, epoch), so resume replays it."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)
