"""Full fine-tuning: every weight trains (optionally with the input embeddings frozen)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from sftlab.errors import SftlabError
from sftlab.methods.base import Method


class Full(Method):
    name = "full"
    sections = ("full",)
    mergeable = True
    export_format = "model_dir"
    whole_model = True

    def apply(self, model: nn.Module) -> None:
        for param in model.parameters():
            param.requires_grad_(True)
        if self.config.full.freeze_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        # named_parameters() lists a tied weight once, under its first name.
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def merge(self, model: nn.Module) -> nn.Module:
        return model  # the weights are already the model's own

    @contextmanager
    def adapters_disabled(self, model: nn.Module) -> Iterator[None]:
        raise SftlabError("full fine-tuning changes the base weights themselves, so the trained model holds no view "
                          "of the base: its reference is a frozen copy of the base model or reference log-probs "
                          "computed before training (dpo.precompute_reference=true).")
        yield  # a generator, as contextmanager needs
