"""The registry of methods: one entry per method, the method's class. Its class attributes say what it is
called, which config sections it reads, whether it merges (or why not: its `merge` raises saying so), which
export format its run writes, and what it needs (packing allowed, a frozen reference copy for preference
stages, an NF4 base); its methods apply it, name its trainable parameters and merge it. Code outside
methods/ asks the entry (`method_class(cfg.method).whole_model`), never compares a method's name."""

from __future__ import annotations

from sftlab.errors import ConfigError
from sftlab.methods.base import Method
from sftlab.methods.bottleneck import Bottleneck
from sftlab.methods.full import Full
from sftlab.methods.lora import LoRA
from sftlab.methods.prefix import Prefix
from sftlab.methods.prompt import PromptTuning, PTuning
from sftlab.methods.qlora import QLoRA

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Full, LoRA, QLoRA, Bottleneck, PromptTuning, PTuning,
                                                              Prefix)}


def method_class(name: str) -> type[Method]:
    """The registry entry of method `name`; a name this version does not have is refused with the ones it has."""
    if name not in METHODS:
        raise ConfigError(f"method {name!r} is not available in this version of sftlab; use one of "
                          f"{', '.join(METHODS)}.")
    return METHODS[name]
