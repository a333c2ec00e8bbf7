"""The decoder without its output head: what the loss (train/loss.py) and the methods that change a forward
(soft prompts, prefixes) build on. Model-level, so that methods/ need nothing from train/."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def hidden_states(model: nn.Module, batch: Any) -> torch.Tensor:
    """The decoder's last hidden states (B, T, H), without the output head (a packed batch is one row)."""
    return model.base_model(**batch.model_inputs(), use_cache=False)[0]
