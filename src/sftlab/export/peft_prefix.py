"""HF PEFT's PREFIX_TUNING adapter format: save and load.

Checked against peft 0.21.2's source and a `save_pretrained` of its own prefix-tuning model:
- adapter_config.json (peft/config.py PromptLearningConfig, peft/tuners/prefix_tuning/config.py):
  `peft_type: PREFIX_TUNING`, `task_type: CAUSAL_LM`, `num_virtual_tokens`, `token_dim`,
  `num_transformer_submodules` (1: a decoder-only model), `num_attention_heads`, `num_layers`,
  `encoder_hidden_size`, `prefix_projection`, `modules_to_save`, `base_model_name_or_path`, `revision`, and
  `inference_mode: true` (PeftModel.save_pretrained always writes true);
- GQA: PEFT sizes the prefix per key/value head, `token_dim = head_dim * num_key_value_heads` and
  `num_attention_heads = num_key_value_heads` (`_prepare_prompt_learning_config`, peft/utils/other.py,
  huggingface/peft#1901) — sftlab's prefixes have exactly that shape;
- adapter_model.safetensors holds `prompt_embeddings` (P, num_layers * 2 * token_dim): the prefix table
  *after* the projection MLP (BasePromptEncoder._get_adapter_state_dict -> get_prompt_embedding_to_save).
  PEFT loads it in inference mode as the PrefixEncoder's embedding and get_prompt uses it directly (the MLP
  is never built), viewing it as (P, num_layers * 2, num_attention_heads, token_dim / num_attention_heads):
  key then value per layer — sftlab's PrefixEncoder layout. So with `prefix.reparameterize` the MLP is
  folded away here, and `prefix_projection` / `encoder_hidden_size` only record how it was trained
  (PEFT's own save writes the same; it loads prompt-learning adapters for inference only).

Rows of tokens the data step added: PEFT's prompt-learning configs have no `trainable_token_indices`, so they
go out as PEFT's `modules_to_save`: the input embedding's and output head's whole weights with the trained
rows in place (keys `base_model.<module>.weight`, a head tied to the embedding saved too so PEFT's copy of it
agrees). Which rows trained is recorded in the safetensors metadata (`sftlab_trainable_token_ids`), which
PEFT ignores. As with LoRA, PEFT needs the base resized to the tokenizer first (README.md in the dir).
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
from sftlab.methods.prefix import PrefixEncoder, prefix_encoder
from sftlab.methods.token_rows import HeadRows, TokenRows, token_rows_modules
from sftlab.models.portable import loadable_base

PEFT_TYPE = "PREFIX_TUNING"
PROMPT_KEY = "prompt_embeddings"
TOKEN_IDS_METADATA = "sftlab_trainable_token_ids"
PEFT_MODULE_PREFIX = "base_model."
"""PeftModelForCausalLM.base_model is the HF model itself for prompt learning: `base_model.<module>.weight`."""


def save_prefix(model: nn.Module, method: Method, config: Config, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write the prefixes as HF PEFT does (`PeftModel.from_pretrained(base, out_dir)` loads them), plus the
    tokenizer and the chat template the run trained with. Returns out_dir."""
    encoder = _encoder_of(model, method)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        state = {PROMPT_KEY: encoder.table().detach().cpu().contiguous()}  # (P, num_layers·2·token_dim)
    rows = token_rows_modules(model)
    state.update({_peft_key(name): module.weight.detach().cpu().contiguous() for name, module in rows.items()})
    metadata = {TOKEN_IDS_METADATA: json.dumps(list(method.trainable_token_ids))} if method.trainable_token_ids else {}
    peft_config = _peft_config(encoder, config, sorted(rows))
    readme = None
    if rows:
        readme = resize_note("Prefix-tuning adapter", "the adapter holds the embedding (and output head) weights "
                             "with their trained rows (`modules_to_save` in adapter_config.json)",
                             peft_config.get("base_model_name_or_path"))
    return write_adapter_files(out, state, peft_config, tokenizer, chat_template_for(config, tokenizer),
                               metadata=metadata, readme=readme)


def load_prefix(model: nn.Module, method: Method, adapter_dir: str | Path) -> None:
    """Load a PEFT-format prefix-tuning adapter (sftlab's or PEFT's own) into `model`, to which `method`
    (Prefix, with the adapter's num_virtual_tokens) has been applied. A reparameterising MLP is folded
    first: the adapter holds the prefix table it produced."""
    encoder = _encoder_of(model, method)
    adapter = Path(adapter_dir)
    peft_config = read_config(adapter)
    _check_shape(peft_config, encoder, adapter)
    state = load_file(str(adapter / ADAPTER_WEIGHTS))
    table = state.pop(PROMPT_KEY, None)
    if table is None or tuple(table.shape) != (encoder.num_virtual_tokens, encoder.width):
        found = None if table is None else tuple(table.shape)
        raise SftlabError(f"{adapter / ADAPTER_WEIGHTS}: {PROMPT_KEY} has shape {found}, the model needs "
                          f"{(encoder.num_virtual_tokens, encoder.width)}; was it trained on another base model?")
    encoder.fold()
    rows = _token_rows(model, method, state, adapter)
    with torch.no_grad():
        encoder.embedding.weight.copy_(table.to(encoder.embedding.weight.dtype))
        for module, weight in rows:
            module.rows.copy_(weight[module.token_ids.cpu()].to(module.rows.dtype))


def read_config(adapter_dir: str | Path) -> dict[str, Any]:
    document = read_adapter_config(adapter_dir, "PEFT-format prefix-tuning")
    adapter = Path(adapter_dir)
    if not is_prefix_config(document):
        found = document.get("peft_type") if isinstance(document, dict) else type(document).__name__
        raise SftlabError(f"{adapter / ADAPTER_CONFIG}: peft_type is {found!r}; expected {PEFT_TYPE}.")
    return document


def is_prefix_config(document: Any) -> bool:
    return isinstance(document, dict) and document.get("peft_type") == PEFT_TYPE


def is_prefix_dir(adapter_dir: str | Path) -> bool:
    try:
        return is_prefix_config(json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError):
        return False


def prefix_token_ids(adapter_dir: str | Path) -> list[int]:
    """The token ids whose rows the adapter trained (from the weights' metadata), sorted; [] if none."""
    read_config(adapter_dir)
    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), framework="pt") as weights:
        recorded = (weights.metadata() or {}).get(TOKEN_IDS_METADATA)
    return sorted(json.loads(recorded)) if recorded else []


def _peft_config(encoder: PrefixEncoder, config: Config, row_modules: list[str]) -> dict[str, Any]:
    prefix = config.prefix
    base = loadable_base(config.model)  # an absolute dir (a .gguf base: its converted dir) or a hub id
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": encoder.num_virtual_tokens,
        "token_dim": encoder.token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": encoder.num_kv_heads,
        "num_layers": encoder.num_layers,
        "encoder_hidden_size": prefix.encoder_hidden if prefix.reparameterize else encoder.token_dim,
        "prefix_projection": prefix.reparameterize,
        "modules_to_save": row_modules or None,
    }


def _check_shape(peft_config: dict[str, Any], encoder: PrefixEncoder, adapter: Path) -> None:
    expected = {"num_virtual_tokens": encoder.num_virtual_tokens, "num_layers": encoder.num_layers,
                "token_dim": encoder.token_dim, "num_attention_heads": encoder.num_kv_heads,
                "num_transformer_submodules": 1}
    wrong = {key: peft_config.get(key) for key, value in expected.items() if peft_config.get(key) != value}
    if wrong:
        hint = (f" Set prefix.num_virtual_tokens={peft_config['num_virtual_tokens']}."
                if "num_virtual_tokens" in wrong and len(wrong) == 1 else " Was it trained on another base model?")
        raise SftlabError(f"{adapter / ADAPTER_CONFIG} has {wrong}, the model's prefixes need "
                          f"{ {k: expected[k] for k in wrong} }.{hint}")


def _token_rows(model: nn.Module, method: Method, state: dict[str, torch.Tensor],
                adapter: Path) -> list[tuple[TokenRows, torch.Tensor]]:
    """(token-row wrapper with its own rows, the adapter's whole weight for that layer), checking that the
    adapter trained the same token ids and that nothing else is in it."""
    ids = prefix_token_ids(adapter)
    if ids != list(method.trainable_token_ids):
        raise SftlabError(f"{adapter / ADAPTER_WEIGHTS} trains the rows of token ids {ids[:8]}, the model's method "
                          f"those of {list(method.trainable_token_ids)[:8]}; build the method with "
                          "trainable_token_ids=export.adapter_token_ids(adapter_dir).")
    modules = token_rows_modules(model)
    expected = {_peft_key(name) for name in modules}
    if set(state) != expected:
        raise SftlabError(f"{adapter / ADAPTER_WEIGHTS} holds {sorted(state)[:4]} besides {PROMPT_KEY}, the model "
                          f"expects {sorted(expected)[:4]}: whole modules trained with PEFT's modules_to_save "
                          "(other than sftlab's added-token rows) cannot load into sftlab.")
    rows = []
    for name, module in modules.items():
        weight = state[_peft_key(name)]
        if weight.shape != module.base.weight.shape:
            raise SftlabError(f"{adapter / ADAPTER_WEIGHTS}: {_peft_key(name)} has shape {tuple(weight.shape)}, "
                              f"the model's {name} {tuple(module.base.weight.shape)}; resize the base model's "
                              "embeddings to the adapter's tokenizer.")
        if not (isinstance(module, HeadRows) and module.tied):  # a tied head reads the embedding's rows
            rows.append((module, weight))
    return rows


def _peft_key(module_name: str) -> str:
    return f"{PEFT_MODULE_PREFIX}{module_name}.weight"


def _encoder_of(model: nn.Module, method: Method) -> PrefixEncoder:
    if method.export_format != "peft_prefix":
        raise SftlabError(f"a PEFT prefix-tuning adapter holds key/value prefixes, but the method is {method.name!r}.")
    return prefix_encoder(model)


def prefix_adapter_settings(adapter_dir: str | Path) -> tuple[str | None, list[str]]:
    """(base model, config overrides) that rebuild the method of a PREFIX_TUNING adapter dir with no run
    around it: the adapter holds the plain prefix table, so no reparameterising MLP is built."""
    peft_config = read_config(adapter_dir)
    count = peft_config.get("num_virtual_tokens")
    if not isinstance(count, int) or count <= 0:
        raise SftlabError(f"{Path(adapter_dir) / ADAPTER_CONFIG}: num_virtual_tokens is {count!r}; expected a "
                          "positive integer.")
    return peft_config.get("base_model_name_or_path"), ["method=prefix", f"prefix.num_virtual_tokens={count}",
                                                        "prefix.reparameterize=false"]
