"""Export: what a run writes and reads back, in formats other tools load.

- `model_dir`: plain Hugging Face model dirs (full fine-tuning, merged adapters) and the fidelity check;
- `peft_lora`: HF PEFT's LoRA adapter format (LoRA, QLoRA, added-token rows);
- `bottleneck`: sftlab's own bottleneck-adapter format (PEFT's two files, no `peft_type`);
- `peft_prompt`: HF PEFT's PROMPT_TUNING / P_TUNING formats (prompt tuning, P-tuning folded).

This package is the only place that knows external names (PEFT's `lora_A`, `r`, `target_modules`, ...).
`save_trained` / `load_trained` pick the format by method name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import nn

from sftlab.config import Config
from sftlab.errors import SftlabError
from sftlab.export.bottleneck import (
    bottleneck_adapter_settings,
    bottleneck_token_ids,
    is_bottleneck_dir,
    load_bottleneck,
    save_bottleneck,
)
from sftlab.export.model_dir import (
    NonFiniteWeightsError,
    chat_template_for,
    fidelity,
    merge_to_dir,
    refuse_merge_output,
    save_model,
    save_tokenizer,
)
from sftlab.export.peft_lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_lora_settings,
    load_adapter,
    save_adapter,
)
from sftlab.export.peft_lora import adapter_token_ids as lora_token_ids
from sftlab.export.peft_prefix import (
    is_prefix_dir,
    load_prefix,
    prefix_adapter_settings,
    prefix_token_ids,
    save_prefix,
)
from sftlab.export.peft_prompt import (
    is_prompt_dir,
    load_prompt_adapter,
    prompt_adapter_settings,
    prompt_token_ids,
    save_prompt_adapter,
)
from sftlab.methods.base import Method

Saver = Callable[[nn.Module, Method, Config, Any, Path], Path]
Loader = Callable[[nn.Module, Method, Path], None]

SAVERS: dict[str, Saver] = {"lora": save_adapter, "qlora": save_adapter, "adapter": save_bottleneck,
                           "prompt": save_prompt_adapter, "ptuning": save_prompt_adapter, "prefix": save_prefix}
"""Method name -> writer of its adapter dir (full fine-tuning writes a plain model dir instead)."""
LOADERS: dict[str, Loader] = {"lora": load_adapter, "qlora": load_adapter, "adapter": load_bottleneck,
                            "prompt": load_prompt_adapter, "ptuning": load_prompt_adapter, "prefix": load_prefix}
"""Method name -> reader of that adapter dir into a model the method has been applied to."""


def save_trained(model: nn.Module, method: Method, config: Config, tokenizer: Any, run_dir: Path, *,
                 into: Path | None = None) -> Path:
    """A run's export: `model/` (a plain HF dir) for full fine-tuning, else `adapter/` in the method's format;
    `into` writes those files into another dir instead (the loop's scratch dir, renamed into place after)."""
    if method.name == "full":
        return save_model(model, tokenizer, into or Path(run_dir) / "model",
                          chat_template=chat_template_for(config, tokenizer))
    if method.name not in SAVERS:
        raise SftlabError(f"method {method.name} has no export format")
    return SAVERS[method.name](model, method, config, tokenizer, into or Path(run_dir) / "adapter")


def load_trained(model: nn.Module, method: Method, adapter_dir: Path) -> None:
    if method.name not in LOADERS:
        raise SftlabError(f"method {method.name} has no adapter loader")
    LOADERS[method.name](model, method, Path(adapter_dir))


def adapter_token_ids(adapter_dir: str | Path) -> list[int]:
    """The token ids whose rows an adapter dir (any format) trained, sorted; [] if none. The method that
    loads the adapter must be built with them (trainable_token_ids)."""
    if is_bottleneck_dir(adapter_dir):
        return bottleneck_token_ids(adapter_dir)
    if is_prompt_dir(adapter_dir):
        return prompt_token_ids(adapter_dir)
    if is_prefix_dir(adapter_dir):
        return prefix_token_ids(adapter_dir)
    return lora_token_ids(adapter_dir)


def adapter_settings(adapter_dir: str | Path) -> tuple[str | None, list[str]]:
    """(base model, config overrides) that rebuild the method of a PEFT-format adapter dir with no run around it."""
    if is_bottleneck_dir(adapter_dir):
        return bottleneck_adapter_settings(adapter_dir)
    if is_prompt_dir(adapter_dir):
        return prompt_adapter_settings(adapter_dir)
    if is_prefix_dir(adapter_dir):
        return prefix_adapter_settings(adapter_dir)
    return adapter_lora_settings(adapter_dir)


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LOADERS", "NonFiniteWeightsError", "SAVERS",
           "adapter_lora_settings", "adapter_settings", "adapter_token_ids", "chat_template_for", "fidelity",
           "load_adapter", "load_trained", "merge_to_dir", "refuse_merge_output", "save_adapter", "save_model",
           "save_tokenizer", "save_trained"]
