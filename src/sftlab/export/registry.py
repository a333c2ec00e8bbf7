"""The registry of export formats: one entry per format a run writes and reads back. A method's registry entry
names its format (`Method.export_format`); an adapter dir with no run around it is recognised by its own
files (`recognizes`), tried in FORMATS' order, HF PEFT's LoRA last (it reads any PEFT LoRA dir)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from sftlab.config import Config
from sftlab.export import bottleneck, peft_lora, peft_prefix, peft_prompt
from sftlab.export.model_dir import chat_template_for, save_model
from sftlab.methods.base import Method

Saver = Callable[[nn.Module, Method, Config, Any, Path], Path]
Loader = Callable[[nn.Module, Method, Path], None]


@dataclass(frozen=True)
class ExportFormat:
    name: str
    save: Saver
    """Writes the trained model's export into a dir (model, method, config, tokenizer, dir)."""
    load: Loader | None = None
    """Reads an adapter dir into a model the method has been applied to (None: a plain model dir loads as is)."""
    recognizes: Callable[[str | Path], bool] | None = None
    """True for an adapter dir in this format (None: not an adapter format)."""
    token_ids: Callable[[str | Path], list[int]] | None = None
    """The token ids whose rows the adapter trained."""
    settings: Callable[[str | Path], tuple[str | None, list[str]]] | None = None
    """(base model, config overrides) that rebuild the method of such a dir with no run around it."""


def _save_model_dir(model: nn.Module, method: Method, config: Config, tokenizer: Any, into: Path) -> Path:
    return save_model(model, tokenizer, into, chat_template=chat_template_for(config, tokenizer))


FORMATS: dict[str, ExportFormat] = {format.name: format for format in (
    ExportFormat("model_dir", _save_model_dir),
    ExportFormat("bottleneck", bottleneck.save_bottleneck, bottleneck.load_bottleneck, bottleneck.is_bottleneck_dir,
                 bottleneck.bottleneck_token_ids, bottleneck.bottleneck_adapter_settings),
    ExportFormat("peft_prompt", peft_prompt.save_prompt_adapter, peft_prompt.load_prompt_adapter,
                 peft_prompt.is_prompt_dir, peft_prompt.prompt_token_ids, peft_prompt.prompt_adapter_settings),
    ExportFormat("peft_prefix", peft_prefix.save_prefix, peft_prefix.load_prefix, peft_prefix.is_prefix_dir,
                 peft_prefix.prefix_token_ids, peft_prefix.prefix_adapter_settings),
    ExportFormat("peft_lora", peft_lora.save_adapter, peft_lora.load_adapter, lambda adapter_dir: True,
                 peft_lora.adapter_token_ids, peft_lora.adapter_lora_settings),
)}
"""Format name -> entry; the adapter formats in the order an unknown adapter dir is tried."""


def format_of(method: Method | type[Method]) -> ExportFormat:
    return FORMATS[method.export_format]


def adapter_format(adapter_dir: str | Path) -> ExportFormat:
    """The format of an adapter dir, from its own files."""
    return next(f for f in FORMATS.values() if f.recognizes is not None and f.recognizes(adapter_dir))
