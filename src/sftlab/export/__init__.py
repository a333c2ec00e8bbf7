"""Export: what a run writes and reads back, in formats other tools load.

- `model_dir`: plain Hugging Face model dirs (full fine-tuning, merged adapters) and the fidelity check;
- `peft_lora`: HF PEFT's LoRA adapter format (LoRA, QLoRA, added-token rows).

This package is the only place that knows external names (PEFT's `lora_A`, `r`, `target_modules`, ...).
`save_trained` / `load_trained` pick the format by method name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import nn

from sftlab.config import Config
from sftlab.errors import SftlabError
from sftlab.export.model_dir import (
    chat_template_for,
    fidelity,
    merge_to_dir,
    save_model,
    save_tokenizer,
)
from sftlab.export.peft_lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_lora_settings,
    adapter_token_ids,
    load_adapter,
    save_adapter,
)
from sftlab.methods.base import Method

Saver = Callable[[nn.Module, Method, Config, Any, Path], Path]
Loader = Callable[[nn.Module, Method, Path], None]

SAVERS: dict[str, Saver] = {"lora": save_adapter, "qlora": save_adapter}
"""Method name -> writer of its adapter dir (full fine-tuning writes a plain model dir instead)."""
LOADERS: dict[str, Loader] = {"lora": load_adapter, "qlora": load_adapter}
"""Method name -> reader of that adapter dir into a model the method has been applied to."""


def save_trained(model: nn.Module, method: Method, config: Config, tokenizer: Any, run_dir: Path) -> Path:
    """A run's export: `model/` (a plain HF dir) for full fine-tuning, else `adapter/` in the method's format."""
    if method.name == "full":
        return save_model(model, tokenizer, Path(run_dir) / "model", chat_template=chat_template_for(config, tokenizer))
    if method.name not in SAVERS:
        raise SftlabError(f"method {method.name} has no export format")
    return SAVERS[method.name](model, method, config, tokenizer, Path(run_dir) / "adapter")


def load_trained(model: nn.Module, method: Method, adapter_dir: Path) -> None:
    if method.name not in LOADERS:
        raise SftlabError(f"method {method.name} has no adapter loader")
    LOADERS[method.name](model, method, Path(adapter_dir))


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LOADERS", "SAVERS", "adapter_lora_settings", "adapter_token_ids",
           "chat_template_for", "fidelity", "load_adapter", "load_trained", "merge_to_dir", "save_adapter",
           "save_model", "save_tokenizer", "save_trained"]
