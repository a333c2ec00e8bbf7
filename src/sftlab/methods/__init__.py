"""Fine-tuning methods: what is inserted into the model, what trains, what is saved, how it merges; one
registry entry per method (registry.py)."""

from __future__ import annotations

from sftlab.methods.base import MergeError, Method
from sftlab.methods.bottleneck import Bottleneck
from sftlab.methods.full import Full
from sftlab.methods.lora import LoRA
from sftlab.methods.prefix import Prefix
from sftlab.methods.prompt import PromptTuning, PTuning
from sftlab.methods.qlora import QLoRA
from sftlab.methods.registry import METHODS, method_class

__all__ = ["METHODS", "Bottleneck", "Full", "LoRA", "MergeError", "Method", "PTuning", "Prefix", "PromptTuning",
           "QLoRA", "method_class"]
