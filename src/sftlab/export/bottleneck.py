"""sftlab's bottleneck-adapter format: the two files of a PEFT adapter dir with sftlab's own schema.

PEFT has no bottleneck adapters, so the config carries no `peft_type` (PEFT must not mistake the dir for
one of its own) but `"sftlab_method": "bottleneck_adapter"`:

    adapter_config.json
      {"sftlab_method": "bottleneck_adapter", "format_version": 1, "base_model_name_or_path": ...,
       "placement": "houlsby" | "pfeiffer", "bottleneck_dim": 64, "activation": "relu" | "gelu" | "silu",
       "dropout": 0.0, "hidden_size": 2048,
       "modules": ["model.layers.0.self_attn", "model.layers.0.mlp", ...],   # the wrapped blocks
       "trainable_token_ids": [...]}                                          # only with added tokens
    adapter_model.safetensors
      <module>.adapter_down.weight (bottleneck_dim, hidden)   <module>.adapter_down.bias (bottleneck_dim,)
      <module>.adapter_up.weight   (hidden, bottleneck_dim)   <module>.adapter_up.bias   (hidden,)
      <input embedding>.rows (n, hidden), and an untied head's `<head>.rows`: rows of the added tokens

Module names are the base model's own (`model.layers.0.mlp`); each adapter computes
h + adapter_up(act(adapter_down(h))) on that block's output h. The tokenizer (with any added tokens and
the chat template the run trained with) is saved beside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import nn

from sftlab.config import Config
from sftlab.errors import SftlabError
from sftlab.export.model_dir import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    chat_template_for,
    read_adapter_config,
    write_adapter_files,
)
from sftlab.methods.base import Method
from sftlab.methods.bottleneck import BottleneckAdapter, bottleneck_modules
from sftlab.models.portable import loadable_base

SCHEMA = "bottleneck_adapter"
FORMAT_VERSION = 1


def save_bottleneck(model: nn.Module, method: Method, config: Config, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write the adapters (and trained token rows) in sftlab's bottleneck format, plus the tokenizer and the
    chat template the run trained with. Returns out_dir."""
    modules = _modules_of(model, method)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {key: tensor.detach().cpu().contiguous() for key, tensor in method.state_dict(model).items()}
    settings = _settings(modules)
    base = loadable_base(config.model)  # an absolute dir (a .gguf base: its converted dir) or a hub id
    document = {"sftlab_method": SCHEMA, "format_version": FORMAT_VERSION, "base_model_name_or_path": base,
                "placement": config.adapter.placement, **settings, "dropout": config.adapter.dropout,
                "modules": list(modules)}  # model order: layer 0 first
    if method.trainable_token_ids:
        document["trainable_token_ids"] = list(method.trainable_token_ids)
    return write_adapter_files(out, state, document, tokenizer, chat_template_for(config, tokenizer))


def load_bottleneck(model: nn.Module, method: Method, adapter_dir: str | Path) -> None:
    """Load a bottleneck adapter dir into `model`, to which `method` has been applied with the placement,
    bottleneck_dim and activation the adapter was trained with (and its trainable_token_ids)."""
    modules = _modules_of(model, method)
    adapter = Path(adapter_dir)
    document = read_config(adapter)
    where = adapter / ADAPTER_CONFIG
    fix = (f"set adapter.placement={document['placement']} adapter.bottleneck_dim={document['bottleneck_dim']} "
           f"adapter.activation={document['activation']} to load this adapter")
    ours = _settings(modules)
    for key, value in ours.items():
        if document[key] != value:
            raise SftlabError(f"{where}: {key} is {document[key]!r}, the model's adapters have {value!r}; {fix}.")
    if sorted(document["modules"]) != sorted(modules):
        only_file = sorted(set(document["modules"]) - set(modules))
        only_model = sorted(set(modules) - set(document["modules"]))
        raise SftlabError(f"{where}: the adapter wraps other blocks than the model's (adapter only: {only_file[:3]}, "
                          f"model only: {only_model[:3]}); was it trained on another base model? Else {fix}.")
    ids = document.get("trainable_token_ids", [])
    if ids != list(method.trainable_token_ids):
        raise SftlabError(f"{where} trains the rows of token ids {ids[:8]}, the model's method those of "
                          f"{list(method.trainable_token_ids)[:8]}; build the method with "
                          "trainable_token_ids=export.adapter_token_ids(adapter_dir).")
    state = load_file(str(adapter / ADAPTER_WEIGHTS))
    params = method.trainable_parameters(model)
    for key, tensor in state.items():
        if key in params and tensor.shape != params[key].shape:
            raise SftlabError(f"{adapter / ADAPTER_WEIGHTS}: {key} has shape {tuple(tensor.shape)}, the model needs "
                              f"{tuple(params[key].shape)}; the adapter was trained on a base model of another size.")
    method.load_state_dict(model, state)


def read_config(adapter_dir: str | Path) -> dict[str, Any]:
    """The checked adapter_config.json of a bottleneck adapter dir."""
    where = Path(adapter_dir) / ADAPTER_CONFIG
    document = read_adapter_config(adapter_dir, "bottleneck")
    if not is_bottleneck_config(document):
        found = document.get("sftlab_method", document.get("peft_type")) if isinstance(document, dict) else document
        raise SftlabError(f"{where}: expected sftlab_method {SCHEMA!r}, found {found!r}; this is not a "
                          "bottleneck adapter dir.")
    if document.get("format_version") != FORMAT_VERSION:
        raise SftlabError(f"{where}: format_version {document.get('format_version')!r}; this sftlab reads "
                          f"version {FORMAT_VERSION}. Use the sftlab release that wrote it.")
    for field, kind in (("placement", str), ("bottleneck_dim", int), ("activation", str), ("hidden_size", int),
                        ("modules", list), ("trainable_token_ids", list)):
        value = document.get(field, [] if field == "trainable_token_ids" else None)  # the one optional field
        if not isinstance(value, kind):
            raise SftlabError(f"{where}: {field} is missing or has the wrong type ({value!r}).")
    return document


def is_bottleneck_config(document: Any) -> bool:
    return isinstance(document, dict) and document.get("sftlab_method") == SCHEMA


def is_bottleneck_dir(adapter_dir: str | Path) -> bool:
    """Whether the dir's adapter_config.json declares this format (an unreadable one: no)."""
    try:
        return is_bottleneck_config(json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError):
        return False


def bottleneck_token_ids(adapter_dir: str | Path) -> list[int]:
    """The token ids whose rows a bottleneck adapter trained, sorted; [] if none."""
    return sorted(read_config(adapter_dir).get("trainable_token_ids", []))


def bottleneck_adapter_settings(adapter_dir: str | Path) -> tuple[str | None, list[str]]:
    """(base model, config overrides) that rebuild the adapters of a bottleneck adapter dir with no run around it."""
    document = read_config(adapter_dir)
    overrides = ["method=adapter", f"adapter.placement={document['placement']}",
                 f"adapter.bottleneck_dim={document['bottleneck_dim']}", f"adapter.activation={document['activation']}"]
    return document.get("base_model_name_or_path"), overrides


def _settings(modules: dict[str, BottleneckAdapter]) -> dict[str, Any]:
    """bottleneck_dim, activation and hidden_size, which every adapter of a model shares."""
    module = next(iter(modules.values()))
    return {"bottleneck_dim": module.bottleneck_dim, "activation": module.activation,
            "hidden_size": module.adapter_down.in_features}


def _modules_of(model: nn.Module, method: Method) -> dict[str, BottleneckAdapter]:
    if method.export_format != "bottleneck":
        raise SftlabError(f"a bottleneck adapter dir holds method=adapter weights, but the method is {method.name!r}.")
    modules = bottleneck_modules(model)
    if not modules:
        raise SftlabError("the model has no bottleneck adapters: apply the method (Bottleneck(config).apply(model)) "
                          "first.")
    return modules
