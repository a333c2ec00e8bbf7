"""Export: what a run writes and reads back, in formats other tools load.

- `model_dir`: plain Hugging Face model dirs (full fine-tuning, merged adapters) and the fidelity check;
- `peft_lora`: HF PEFT's LoRA adapter format (LoRA, QLoRA, added-token rows);
- `bottleneck`: sftlab's own bottleneck-adapter format (PEFT's two files, no `peft_type`);
- `peft_prompt`: HF PEFT's PROMPT_TUNING / P_TUNING formats (prompt tuning, P-tuning folded).

This package is the only place that knows external names (PEFT's `lora_A`, `r`, `target_modules`, ...).
`registry` holds one entry per format; `save_trained` / `load_trained` use the one the method's registry entry
names (`Method.export_format`), `adapter_token_ids` / `adapter_settings` the one an adapter dir's files show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from sftlab.config import Config
from sftlab.errors import ConfigError, SftlabError
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
from sftlab.export.registry import FORMATS, ExportFormat, adapter_format, format_of
from sftlab.methods.base import Method
from sftlab.models.load import PICKLED_WEIGHTS, check_safetensors


def save_trained(model: nn.Module, method: Method, config: Config, tokenizer: Any, run_dir: Path, *,
                 into: Path | None = None) -> Path:
    """A run's export, in the method's format (its registry entry names it): `model/` (a plain HF dir) for a
    method that trains the whole model, else `adapter/`; `into` writes those files into another dir instead
    (a scratch dir, renamed into place after)."""
    return format_of(method).save(model, method, config, tokenizer, into or Path(run_dir) / method.export_dir())


def load_trained(model: nn.Module, method: Method, adapter_dir: Path) -> None:
    loader = format_of(method).load
    if loader is None:
        raise SftlabError(f"method {method.name} exports a plain model dir, not an adapter: load that dir as the model")
    loader(model, method, Path(adapter_dir))


def adapter_token_ids(adapter_dir: str | Path) -> list[int]:
    """The token ids whose rows an adapter dir (any format) trained, sorted; [] if none. The method that
    loads the adapter must be built with them (trainable_token_ids)."""
    return adapter_format(adapter_dir).token_ids(adapter_dir)


def adapter_settings(adapter_dir: str | Path) -> tuple[str | None, list[str]]:
    """(base model, config overrides) that rebuild the method of a PEFT-format adapter dir with no run around it."""
    return adapter_format(adapter_dir).settings(adapter_dir)


def check_adapter_weights(adapter: Path) -> None:
    """An adapter dir's weights must be a whole adapter_model.safetensors; pickled ones are refused."""
    weights = adapter / ADAPTER_WEIGHTS
    if weights.is_file():
        check_safetensors(weights)
        return
    pickled = sorted({p.name for pattern in PICKLED_WEIGHTS for p in adapter.glob(pattern)})
    if pickled:
        source = adapter / pickled[0]
        raise ConfigError(f"{adapter} holds its adapter weights as pickles ({', '.join(pickled)}), not "
                          f"{ADAPTER_WEIGHTS}; sftlab never unpickles weights (a pickle can run any code when "
                          "loaded). If you trust where it came from, convert it once: python -c \"import torch; "
                          "from safetensors.torch import save_file; "
                          f"save_file(torch.load('{source}', weights_only=True), '{weights}')\"")
    raise ConfigError(f"{adapter} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; the adapter was not saved "
                      "completely. Export it again, or point at a run dir's adapter/.")


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "FORMATS", "ExportFormat", "NonFiniteWeightsError",
           "adapter_lora_settings", "adapter_settings", "adapter_token_ids", "chat_template_for",
           "check_adapter_weights", "fidelity",
           "load_adapter", "load_trained", "merge_to_dir", "refuse_merge_output", "save_adapter", "save_model",
           "save_tokenizer", "save_trained"]
