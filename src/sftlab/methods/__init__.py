"""Fine-tuning methods: what is inserted into the model, what trains, what is saved, how it merges."""

from __future__ import annotations

from sftlab.methods.base import Method, MergeError
from sftlab.methods.full import Full
from sftlab.methods.lora import LoRA

METHODS: dict[str, type[Method]] = {"full": Full, "lora": LoRA}

__all__ = ["METHODS", "Method", "MergeError", "Full", "LoRA"]
