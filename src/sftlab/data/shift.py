"""The one place labels shift: position t of a sequence predicts token t+1, so the targets of a batch are
labels[:, 1:], and a position is supervised when its target is not IGNORE_INDEX. Batching computes these
positions once per batch (on the CPU, before the batch moves); the loss (train/loss.py) reads them."""

from __future__ import annotations

import torch

from sftlab.data.encode import IGNORE_INDEX


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat hidden-state indices into B*T, their target ids) for every supervised position.

    Computed where `labels` lives (the CPU, before the batch moves), so the step needs no host sync.
    """
    _, length = labels.shape
    targets = labels[:, 1:]
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * length + cols, targets[rows, cols]
