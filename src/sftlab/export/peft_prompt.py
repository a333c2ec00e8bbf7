"""HF PEFT's PROMPT_TUNING and P_TUNING adapter formats (prompt tuning, P-tuning): save and load.

Names and fields taken from PEFT's own source (checked against peft 0.21.2, and against the files its
`save_pretrained` writes for a PromptTuningConfig / PromptEncoderConfig):
- `adapter_config.json`: the fields of PeftConfig (`peft/config.py`: base_model_name_or_path, revision,
  peft_type, task_type, inference_mode) and PromptLearningConfig (num_virtual_tokens, token_dim,
  num_transformer_submodules — 1 for a decoder-only model, `_setup_prompt_encoder` —, num_attention_heads,
  num_layers — filled from the model config by `_prepare_prompt_learning_config` —, modules_to_save); plus
  PromptTuningConfig's prompt_tuning_init (TEXT | SAMPLE_VOCAB | RANDOM), prompt_tuning_init_text,
  tokenizer_name_or_path (required with TEXT) (`peft/tuners/prompt_tuning/config.py`), or
  PromptEncoderConfig's encoder_reparameterization_type (MLP | LSTM), encoder_hidden_size,
  encoder_num_layers, encoder_dropout (`peft/tuners/p_tuning/config.py`).
- `adapter_model.safetensors`: one key `prompt_embeddings`, (num_virtual_tokens, token_dim)
  (`BasePromptEncoder._get_adapter_state_dict` in `peft/tuners/tuners_utils.py`). For P_TUNING PEFT saves
  the prompt encoder's *output* (`get_prompt_embedding_to_save`), and in inference mode (the default of
  `PeftModel.from_pretrained`) it builds no encoder and prepends that table as is (`get_prompt`) — so the
  encoder folds away at export.
- A vocabulary resized for added tokens: PEFT saves the whole input embedding and output head
  (`save_embedding_layers`, "auto" when the vocab size differs from the base's), keys
  `base_model.<module>.weight` (PeftModel.base_model is the HF model itself for prompt learning), and
  loads them with `load_state_dict(strict=False)`. sftlab writes the same keys (the base rows with the
  trained rows in place) and lists the trained token ids in the safetensors metadata, which PEFT ignores.
  As with LoRA's token rows, PEFT users resize the base to the adapter dir's tokenizer first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from sftlab.config import Config
from sftlab.errors import SftlabError
from sftlab.export.model_dir import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    chat_template_for,
    read_adapter_config,
    resize_note,
    write_adapter_files,
)
from sftlab.methods.base import Method
from sftlab.methods.prompt import PromptTuning, soft_prompt
from sftlab.methods.token_rows import TokenRows, token_rows_modules
from sftlab.models.portable import loadable_base

PEFT_TYPES = {"prompt": "PROMPT_TUNING", "ptuning": "P_TUNING"}
"""sftlab method -> PEFT's peft_type."""
EMBEDDINGS_KEY = "prompt_embeddings"
TOKEN_IDS_METADATA = "sftlab_trainable_token_ids"
"""Safetensors metadata: JSON list of the token ids whose rows trained (the full matrices hold them)."""
ENCODER_TYPES = {"mlp": "MLP", "lstm": "LSTM"}


def save_prompt_adapter(model: nn.Module, method: Method, config: Config, tokenizer: Any,
                        out_dir: str | Path) -> Path:
    """Write a prompt-tuning or P-tuning adapter as HF PEFT does (`PeftModel.from_pretrained(base, out_dir)`
    loads it), plus the tokenizer (None: none is written) and the chat template the run trained with."""
    _check_method(method)
    prompt = soft_prompt(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        state = {EMBEDDINGS_KEY: prompt().detach().cpu().contiguous()}  # P-tuning: the encoder's output
    rows = token_rows_modules(model)
    for name, module in rows.items():
        state[f"base_model.{name}.weight"] = module.weight.detach().cpu().contiguous()
    metadata = {TOKEN_IDS_METADATA: json.dumps(list(method.trainable_token_ids))} if rows else {}
    peft_config = _peft_config(model, method, config, prompt.num_virtual_tokens)
    readme = None
    if rows:
        readme = resize_note("Soft-prompt adapter", "adapter_model.safetensors holds the whole input embedding "
                             "(and output head) with their trained rows, as HF PEFT saves a resized vocabulary",
                             peft_config.get("base_model_name_or_path"))
    return write_adapter_files(out, state, peft_config, tokenizer, chat_template_for(config, tokenizer),
                               metadata=metadata, readme=readme)


def load_prompt_adapter(model: nn.Module, method: Method, adapter_dir: str | Path) -> None:
    """Load a PEFT-format PROMPT_TUNING / P_TUNING adapter (sftlab's or PEFT's own) into `model`, to which
    `method` (of the same kind) has been applied. A P-tuning model's encoder is folded: it holds the saved
    virtual tokens as a plain table afterwards."""
    _check_method(method)
    adapter = Path(adapter_dir)
    peft_config = read_peft_config(adapter)
    where = adapter / ADAPTER_CONFIG
    if peft_config["peft_type"] != PEFT_TYPES[method.name]:
        raise SftlabError(f"{where}: peft_type is {peft_config['peft_type']}, but the method is {method.name} "
                          f"({PEFT_TYPES[method.name]}); set method to the adapter's kind.")
    prompt = soft_prompt(model)
    count, dim = prompt.table.shape
    if peft_config.get("num_transformer_submodules") not in (None, 1):
        raise SftlabError(f"{where}: num_transformer_submodules is {peft_config['num_transformer_submodules']}; "
                          "sftlab's soft prompts are for decoder-only models (1).")
    saved = peft_config["num_virtual_tokens"]
    if saved != count:
        raise SftlabError(f"{where}: num_virtual_tokens is {saved}, the model's soft prompt has {count}; set "
                          f"{method.name}.num_virtual_tokens={saved}.")
    state = load_file(str(adapter / ADAPTER_WEIGHTS))
    embeddings = state.pop(EMBEDDINGS_KEY, None)
    if embeddings is None or tuple(embeddings.shape) != (count, dim):
        found = "no such key" if embeddings is None else f"shape {tuple(embeddings.shape)}"
        raise SftlabError(f"{adapter / ADAPTER_WEIGHTS}: expected {EMBEDDINGS_KEY} of shape ({count}, {dim}), found "
                          f"{found}; was it trained on another base model?")
    if method.folds_encoder:  # P-tuning: the saved table is what its encoder made
        prompt.fold(embeddings)
    else:
        with torch.no_grad():
            prompt.table.copy_(embeddings.to(prompt.table.dtype))
    _load_vocab_matrices(model, state, adapter)


def is_prompt_dir(adapter_dir: str | Path) -> bool:
    """Whether the dir holds a PROMPT_TUNING / P_TUNING adapter (by its adapter_config.json's peft_type)."""
    try:
        peft_config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(peft_config, dict) and peft_config.get("peft_type") in PEFT_TYPES.values()


def prompt_token_ids(adapter_dir: str | Path) -> list[int]:
    """The token ids whose rows the adapter trained (sftlab's metadata), sorted; [] if none."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as handle:
            listed = (handle.metadata() or {}).get(TOKEN_IDS_METADATA)
    except (OSError, RuntimeError, ValueError) as exc:  # safetensors reports a bad file as SafetensorError
        raise SftlabError(f"{path} cannot be read ({exc}); expected a PEFT-format adapter dir.") from None
    return sorted(json.loads(listed)) if listed else []


def prompt_adapter_settings(adapter_dir: str | Path) -> tuple[str | None, list[str]]:
    """(base model, config overrides) that rebuild the method of a PROMPT_TUNING / P_TUNING adapter dir."""
    peft_config = read_peft_config(Path(adapter_dir))
    count = peft_config["num_virtual_tokens"]
    base = peft_config.get("base_model_name_or_path")
    if peft_config["peft_type"] == "PROMPT_TUNING":
        return base, ["method=prompt", f"prompt.num_virtual_tokens={count}", "prompt.init_text=null"]
    encoder = str(peft_config.get("encoder_reparameterization_type") or "MLP").lower()
    hidden = peft_config.get("encoder_hidden_size") or 1  # the encoder is folded away on load
    return base, ["method=ptuning", f"ptuning.num_virtual_tokens={count}", f"ptuning.encoder={encoder}",
                  f"ptuning.encoder_hidden={hidden}"]


def read_peft_config(adapter: Path) -> dict[str, Any]:
    """adapter_config.json of a PROMPT_TUNING / P_TUNING adapter dir, checked."""
    where = adapter / ADAPTER_CONFIG
    peft_config = read_adapter_config(adapter, "PEFT-format prompt-tuning / P-tuning")
    if not isinstance(peft_config, dict) or peft_config.get("peft_type") not in PEFT_TYPES.values():
        found = peft_config.get("peft_type") if isinstance(peft_config, dict) else type(peft_config).__name__
        raise SftlabError(f"{where}: peft_type is {found!r}; expected one of {', '.join(PEFT_TYPES.values())}.")
    count = peft_config.get("num_virtual_tokens")
    if type(count) is not int or count <= 0:
        raise SftlabError(f"{where}: num_virtual_tokens should be a positive integer, found {count!r}.")
    return peft_config


def _peft_config(model: nn.Module, method: Method, config: Config, count: int) -> dict[str, Any]:
    base = loadable_base(config.model)  # an absolute dir (a .gguf base: its converted dir) or a hub id
    text = getattr(model.config, "get_text_config", lambda: model.config)()
    common = {
        "peft_type": PEFT_TYPES[method.name],
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": count,
        "token_dim": int(soft_prompt(model).table.shape[1]),
        "num_transformer_submodules": 1,
        "num_attention_heads": _first(text, "num_attention_heads", "n_head", "num_heads"),
        "num_layers": _first(text, "num_hidden_layers", "num_layers", "n_layer"),
        "modules_to_save": None,
    }
    if not method.folds_encoder:  # prompt tuning: PROMPT_TUNING's own fields
        init_text = config.prompt.init_text
        return {**common, "prompt_tuning_init": "TEXT" if init_text else "SAMPLE_VOCAB",
                "prompt_tuning_init_text": init_text or None, "tokenizer_name_or_path": base if init_text else None}
    return {**common, "encoder_reparameterization_type": ENCODER_TYPES[config.ptuning.encoder],
            "encoder_hidden_size": config.ptuning.encoder_hidden, "encoder_num_layers": 2, "encoder_dropout": 0.0}


def _first(config: Any, *names: str) -> int | None:
    return next((getattr(config, name) for name in names if isinstance(getattr(config, name, None), int)), None)


def _load_vocab_matrices(model: nn.Module, state: dict[str, torch.Tensor], adapter: Path) -> None:
    """Full input-embedding / output-head matrices (a resized vocabulary) into the model's layers; trained
    token rows (sftlab's wrappers) take their rows from them."""
    layers = {name: module for name, module in model.named_modules(remove_duplicate=False)
              if module is model.get_input_embeddings() or module is model.get_output_embeddings()}
    unknown = sorted(key for key in state if key.removeprefix("base_model.").removesuffix(".weight") not in layers)
    if unknown:
        raise SftlabError(f"{adapter / ADAPTER_WEIGHTS} holds {unknown[:3]}, which are neither prompt_embeddings nor "
                          f"the model's input embedding or output head ({sorted(layers)}).")
    with torch.no_grad():
        for key, matrix in state.items():
            layer = layers[key.removeprefix("base_model.").removesuffix(".weight")]
            base = layer.base if isinstance(layer, TokenRows) else layer
            if matrix.shape != base.weight.shape:
                raise SftlabError(f"{adapter / ADAPTER_WEIGHTS}: {key} has shape {tuple(matrix.shape)}, the model's "
                                  f"{tuple(base.weight.shape)}; resize the base model's embeddings to the adapter "
                                  "dir's tokenizer (model.resize_token_embeddings(len(tokenizer))).")
            base.weight.copy_(matrix.to(base.weight.dtype))
            if isinstance(layer, TokenRows):
                layer.rows.copy_(matrix[layer.token_ids.cpu()].to(layer.rows.dtype))


def _check_method(method: Method) -> None:
    if not isinstance(method, PromptTuning) or method.name not in PEFT_TYPES:
        raise SftlabError(f"a PROMPT_TUNING / P_TUNING adapter holds soft-prompt weights, but the method is "
                          f"{method.name!r}.")
