"""Putting one module in place of another inside a model, by its dotted name: how every method inserts its
parts (LoRA layers, bottleneck adapters, token rows), how a merge puts the plain layers back, and how QLoRA
puts NF4 layers in. Written once here, so that none of them re-derives the parent from a name."""

from __future__ import annotations

from torch import nn


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(the module holding `name`, the attribute it is held under): ("model.layers.0.mlp", "up_proj")."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def swap_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put `module` where `name` is registered; returns the module that was there."""
    parent, child = parent_of(model, name)
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old
