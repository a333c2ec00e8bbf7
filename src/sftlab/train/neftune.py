"""NEFTune (Jain et al. 2023, arXiv:2310.05914): noise on the input embeddings while training.

Each training forward adds uniform noise in [-s, s] to every input embedding, s = alpha / sqrt(L·d) for a row
of L positions and d embedding dimensions (the scale of the paper and of HF transformers' Trainer, whose L is
the batch's row length; here, with packing, the packed row's). The noise is drawn from torch's generator on the
embeddings' device, whose state each checkpoint keeps, so a resumed run draws what the uninterrupted run drew.
Evaluation, the forgetting probe and generation run in eval mode and see the clean embeddings.
"""

from __future__ import annotations

import math

import torch
from torch.utils.hooks import RemovableHandle


def add_embedding_noise(model: torch.nn.Module, alpha: float) -> RemovableHandle:
    """Hook the model's input embeddings (the module it has now: after a method added token rows) so that in
    training mode their output gets NEFTune's noise; the handle removes it."""
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"NEFTune's alpha must be a positive number, got {alpha!r}")

    def noisy(module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if not module.training or output.dim() < 2:
            return output
        scale = alpha / math.sqrt(output.shape[-2] * output.shape[-1])
        return output + torch.empty_like(output).uniform_(-scale, scale)

    return model.get_input_embeddings().register_forward_hook(noisy)
