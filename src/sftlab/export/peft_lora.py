"""HF PEFT's LoRA adapter format (also QLoRA's, and added-token rows): save and load.

This is the only module that knows HF PEFT's external names (`lora_A`, `r`, `lora_alpha`,
`target_modules`, ...). They were taken from PEFT's own source (peft ≥ 0.13):
- file names `adapter_config.json`, `adapter_model.safetensors`: `peft/utils/constants.py`
  (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME);
- weight keys `base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r): the
  PeftModel -> LoraModel -> HF model nesting (`peft/tuners/tuners_utils.py`, "base_model.model."),
  `LoraLayer.update_layer` (`lora_A = nn.Linear(in_features, r)`, `lora_B = nn.Linear(r, out_features)`)
  and the adapter name removed on save (`_remove_adapter_name_from_state_dict_key`);
- scaling lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (`LoraLayer.update_layer`);
- `target_modules`: a string is `re.fullmatch`ed against full module names, a list matches a name equal
  to an entry or ending in `.entry` (`check_target_module_exists`) — the rules of `models/targets.py`;
- GPT-2's Conv1D needs `fan_in_fan_out: true` (`peft/tuners/lora/layer.py`, dispatch_default);
- DoRA (`use_dora: true`, PEFT ≥ 0.9; checked against 0.21): the magnitude (out,) is saved under
  `base_model.model.<module>.lora_magnitude_vector`, without `.weight` (`LoraModel._get_adapter_state_dict`
  strips it, `_remap_adapter_state_dict_for_load` adds it back; `peft/tuners/lora/model.py`); PEFT applies
  DoRA to Conv1D too (DoraLinearLayer transposes by fan_in_fan_out).
Only fields that PEFT 0.13's LoraConfig already knows are written: older PEFT rejects unknown keys.

Trained rows of tokens the data step added are PEFT's `trainable_token_indices` (PEFT ≥ 0.15,
huggingface/peft#2376; checked against 0.21): `peft/utils/other.py` set_additional_trainable_modules and
TrainableTokensWrapper, `peft/tuners/trainable_tokens/layer.py` TrainableTokensLayer:
- key `base_model.model.<embedding>.token_adapter.trainable_tokens_delta`, (n, H), holding the rows
  themselves (forward index_copies them into the weight), in the order the ids are listed (sftlab: sorted);
- `trainable_token_indices: [ids]` names the input embedding; a head tied to it (config
  tie_word_embeddings) follows it and is not saved. An untied head that trains is listed too:
  `{"<embedding>": [ids], "<head>": [ids]}` (a name matches modules whose name ends with it), its key
  `base_model.model.<head>.token_adapter.trainable_tokens_delta`.
PEFT does not resize: users load the base, `resize_token_embeddings(len(tokenizer))` with the adapter
dir's tokenizer, then `PeftModel.from_pretrained` (the adapter dir's README.md says so).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
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
from sftlab.methods.lora import DoRALinear, LoRA, LoRALinear, lora_modules
from sftlab.methods.token_rows import EmbeddingRows, HeadRows, token_rows_modules
from sftlab.models.portable import loadable_base

PEFT_PREFIX = "base_model.model."
"""PeftModelForCausalLM.base_model (LoraModel).model (the HF model): the prefix of every saved key."""
PEFT_PARAMS = {"A": "lora_A.weight", "B": "lora_B.weight", "magnitude": "lora_magnitude_vector",
               "rows": "token_adapter.trainable_tokens_delta"}
"""sftlab parameter -> PEFT's key suffix; A is (rank, in), B (out, rank), DoRA's magnitude (out,) and token
rows (n, H) in both."""
UNSUPPORTED = {"bias": "none", "lora_bias": False, "modules_to_save": None,
               "layers_to_transform": None, "layer_replication": None, "rank_pattern": {}, "alpha_pattern": {},
               "exclude_modules": None, "target_parameters": None}
"""PEFT LoRA features sftlab does not implement, with the value a loadable adapter must have."""


def save_adapter(model: nn.Module, method: Method, config: Config, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write a LoRA adapter as HF PEFT does (`PeftModel.from_pretrained(base, out_dir)` loads it), plus the
    tokenizer (None: none is written) and the chat template the run trained with. Returns out_dir.
    With trained token rows PEFT needs the base resized to the tokenizer first; README.md says so."""
    modules = _lora_modules_of(model, method)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {_peft_key(key): tensor.detach().cpu().contiguous()
             for key, tensor in method.state_dict(model).items()}
    peft_config = _peft_config(model, modules, config)
    readme = None
    if "trainable_token_indices" in peft_config:
        readme = resize_note("LoRA adapter", "the adapter holds their trained embedding rows "
                             "(`trainable_token_indices` in adapter_config.json; HF PEFT >= 0.15)",
                             peft_config.get("base_model_name_or_path"))
    return write_adapter_files(out, state, peft_config, tokenizer, chat_template_for(config, tokenizer),
                               readme=readme)


def load_adapter(model: nn.Module, method: Method, adapter_dir: str | Path) -> None:
    """Load a PEFT-format LoRA adapter (sftlab's or PEFT's own) into `model`, to which `method` (LoRA) has
    been applied; its rank, scaling and target modules must be those the adapter was trained with."""
    modules = _lora_modules_of(model, method)
    adapter = Path(adapter_dir)
    peft_config = _checked_config(adapter)
    _check_scaling(peft_config, modules, adapter)
    _check_dora(peft_config, modules, adapter)
    _check_targets(peft_config["target_modules"], model, modules, adapter)
    token_rows = _adapter_token_rows(peft_config, model, method, adapter)
    state = _from_peft_state(load_file(str(adapter / ADAPTER_WEIGHTS)), method.trainable_parameters(model),
                             adapter, keep=[name for name, ids in token_rows.items() if ids is None])
    for name, ids in token_rows.items():
        if ids is not None:  # PEFT stores the rows in the order the ids were listed; ours are sorted
            state[name] = state[name][torch.tensor(ids).argsort()]
    method.load_state_dict(model, state)


def adapter_token_ids(adapter_dir: str | Path) -> list[int]:
    """The token ids whose rows a PEFT-format adapter trained (`trainable_token_indices`), sorted; [] if none.
    The method that loads the adapter must be built with them (trainable_token_ids)."""
    adapter = Path(adapter_dir)
    peft_config = _checked_config(adapter)
    return _token_indices(peft_config, adapter)[1]


def adapter_lora_settings(adapter_dir: str | Path) -> tuple[str | None, list[str]]:
    """(base model, config overrides) that rebuild the LoRA a PEFT-format adapter dir was trained with,
    for loading an adapter dir that has no sftlab run around it."""
    adapter = Path(adapter_dir)
    peft_config = _checked_config(adapter)
    targets = peft_config["target_modules"]
    overrides = ["method=lora", f"lora.rank={peft_config['r']}", f"lora.alpha={peft_config['lora_alpha']}",
                 f"lora.rslora={str(bool(peft_config.get('use_rslora'))).lower()}",
                 f"lora.dora={str(bool(peft_config.get('use_dora'))).lower()}",
                 f"lora.targets={json.dumps(targets)}"]
    return peft_config.get("base_model_name_or_path"), overrides


def _peft_key(key: str) -> str:
    """`model.layers.0.self_attn.q_proj.A` -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    module, _, param = key.rpartition(".")
    return f"{PEFT_PREFIX}{module}.{PEFT_PARAMS[param]}"


def _from_peft_state(state: Mapping[str, torch.Tensor], params: Mapping[str, nn.Parameter], adapter: Path, *,
                     keep: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """sftlab's state from PEFT's keys; the parameters named in `keep` (absent from the adapter) keep
    their current values."""
    ours = {_peft_key(name): (name, param.shape) for name, param in params.items()}
    kept = {name: params[name].detach() for name in keep}
    unknown = sorted(set(state) - set(ours))
    missing = sorted(set(ours) - set(state) - {_peft_key(name) for name in kept})
    if unknown or missing:
        raise SftlabError(f"{adapter / ADAPTER_WEIGHTS} does not fit the model's LoRA layers: "
                          f"unexpected {unknown[:3]}, missing {missing[:3]}; was it trained on another "
                          "base model or with other lora.targets?")
    translated = {}
    for key, tensor in state.items():
        name, shape = ours[key]
        if tensor.shape != shape:
            raise SftlabError(f"{adapter / ADAPTER_WEIGHTS}: {key} has shape {tuple(tensor.shape)}, the model "
                              f"needs {tuple(shape)}; the adapter was trained on a base model of another size.")
        translated[name] = tensor
    return {**kept, **translated}


def _peft_config(model: nn.Module, modules: Mapping[str, LoRALinear], config: Config) -> dict[str, Any]:
    lora = config.lora
    base = loadable_base(config.model)  # an absolute dir (a .gguf base: its converted dir) or a hub id
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "revision": None,
        "inference_mode": True,
        "r": lora.rank,
        "lora_alpha": int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": _peft_targets(model, modules, lora.targets),
        "use_rslora": lora.rslora,
        "fan_in_fan_out": any(module.transposed for module in modules.values()),
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": any(isinstance(module, DoRALinear) for module in modules.values()),
        "layer_replication": None,
        **_peft_token_indices(model),
    }


def _peft_token_indices(model: nn.Module) -> dict[str, Any]:
    """`trainable_token_indices` for trained token rows (none: the field is left out for PEFT < 0.15)."""
    rows = {name: module for name, module in token_rows_modules(model).items()
            if not (isinstance(module, HeadRows) and module.tied)}
    if not rows:
        return {}
    ids = next(iter(rows.values())).token_ids.tolist()
    if len(rows) == 1:  # the input embedding alone, or with a tied head that PEFT ties to it
        return {"trainable_token_indices": ids}
    return {"trainable_token_indices": {name: ids for name in rows}}


def _peft_targets(model: nn.Module, modules: Mapping[str, LoRALinear],
                  spec: str | Sequence[str]) -> str | list[str]:
    """PEFT's target_modules selecting exactly the wrapped layers: the config's regex, the suffixes that
    matched, or (when PEFT's rule would select more, e.g. a regex that also matches an embedding) an
    anchored regex of the exact names."""
    wrapped = set(modules)
    if spec == "all-linear":
        candidate: str | list[str] = sorted({name.rsplit(".", 1)[-1] for name in wrapped})
    elif isinstance(spec, str):
        candidate = spec
    else:
        candidate = [s for s in spec if any(_suffix_match(name, s) for name in wrapped)]
    if _peft_selection(candidate, _base_module_names(model, modules)) == wrapped:
        return candidate
    return "|".join(re.escape(name) for name in sorted(wrapped))


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _peft_selection(target_modules: str | Sequence[str], names: Iterable[str]) -> set[str]:
    """The module names PEFT's target_modules rule selects."""
    if isinstance(target_modules, str):
        return {name for name in names if re.fullmatch(target_modules, name)}
    return {name for name in names if any(_suffix_match(name, t) for t in target_modules)}


def _base_module_names(model: nn.Module, modules: Mapping[str, LoRALinear]) -> list[str]:
    """Module names as in the base model: a LoRALinear or token-rows wrapper stands for its base layer,
    its insides do not exist."""
    wrappers = {**modules, **token_rows_modules(model)}
    inside = {f"{name}.{child}" for name, module in wrappers.items() for child, _ in module.named_modules() if child}
    return [name for name, _ in model.named_modules() if name not in inside]


# --- load-time checks ---------------------------------------------------------------------------------

def _checked_config(adapter: Path) -> dict[str, Any]:
    """adapter_config.json of a PEFT-format LoRA adapter dir, read and checked."""
    peft_config = read_adapter_config(adapter, "PEFT-format LoRA")
    _check_peft_config(peft_config, adapter)
    return peft_config


def _check_peft_config(peft_config: Any, adapter: Path) -> None:
    where = adapter / ADAPTER_CONFIG
    if not isinstance(peft_config, dict) or peft_config.get("peft_type") != "LORA":
        found = peft_config.get("peft_type") if isinstance(peft_config, dict) else type(peft_config).__name__
        raise SftlabError(f"{where}: peft_type is {found!r}; sftlab loads LORA adapters here.")
    for field, kind in (("r", int), ("lora_alpha", (int, float)), ("target_modules", (str, list))):
        if not isinstance(peft_config.get(field), kind):
            raise SftlabError(f"{where}: {field} is missing or has the wrong type ({peft_config.get(field)!r}).")
    for field, plain in UNSUPPORTED.items():
        if peft_config.get(field, plain) not in (plain, None, {}, [], False):
            raise SftlabError(f"{where}: {field}={peft_config[field]!r} is a PEFT feature sftlab does not "
                              f"support (expected {plain!r}); merge that adapter with PEFT instead.")
    _token_indices(peft_config, adapter)


def _token_indices(peft_config: Mapping[str, Any], adapter: Path) -> tuple[dict[str, list[int]] | None, list[int]]:
    """(PEFT's layer name -> ids, or None for the plain-list form naming the input embedding; the ids).
    sftlab trains one set of token rows, so every listed layer must list the same ids."""
    where = adapter / ADAPTER_CONFIG
    indices = peft_config.get("trainable_token_indices")
    if indices is None:
        return None, []
    layers = indices if isinstance(indices, dict) else None
    lists = list(indices.values()) if isinstance(indices, dict) else [indices]
    if not lists or not all(isinstance(ids, list) and ids and all(type(i) is int for i in ids) for ids in lists):
        raise SftlabError(f"{where}: trainable_token_indices={indices!r} should be a list of token ids or a map "
                          "from layer name to such a list.")
    if any(len(set(ids)) != len(ids) or sorted(ids) != sorted(lists[0]) for ids in lists):
        raise SftlabError(f"{where}: trainable_token_indices lists repeated ids or different ids per layer "
                          f"({indices!r}); sftlab trains the same token rows in the embedding and the output "
                          "head. Merge that adapter with PEFT instead.")
    return layers, sorted(lists[0])


def _adapter_token_rows(peft_config: Mapping[str, Any], model: nn.Module, method: Method,
                        adapter: Path) -> dict[str, list[int] | None]:
    """Check the adapter's token rows against the model's: each token-row parameter of the model -> the ids
    in the order the adapter stores their rows, or None where the adapter has no rows for that layer (an
    untied head PEFT was not told to train: it keeps its base rows)."""
    layers, ids = _token_indices(peft_config, adapter)
    if ids != list(method.trainable_token_ids):
        raise SftlabError(f"{adapter / ADAPTER_CONFIG} trains the rows of token ids {ids[:8]}, the model's method "
                          f"those of {list(method.trainable_token_ids)[:8]}; build the method with "
                          "trainable_token_ids=export.adapter_token_ids(adapter_dir).")
    modules = {name: m for name, m in token_rows_modules(model).items() if not (isinstance(m, HeadRows) and m.tied)}
    if layers is None:  # the plain list names the input embedding
        indices = peft_config.get("trainable_token_indices")
        return {f"{name}.rows": indices if isinstance(m, EmbeddingRows) else None for name, m in modules.items()}
    unknown = [layer for layer in layers if not any(name.endswith(layer) for name in modules)]
    if unknown:
        raise SftlabError(f"{adapter / ADAPTER_CONFIG}: trainable_token_indices names {unknown}, which is "
                          f"neither the model's input embedding nor its output head ({sorted(modules)}).")
    # PEFT's rule: a layer name matches the modules whose name ends with it
    return {f"{name}.rows": next((ids for layer, ids in layers.items() if name.endswith(layer)), None)
            for name in modules}


def _check_scaling(peft_config: Mapping[str, Any], modules: Mapping[str, LoRALinear], adapter: Path) -> None:
    rank, alpha, rslora = peft_config["r"], peft_config["lora_alpha"], bool(peft_config.get("use_rslora"))
    scaling = alpha / (math.sqrt(rank) if rslora else rank)
    name, module = next(iter(modules.items()))
    if module.rank != rank or not math.isclose(module.scaling, scaling, rel_tol=1e-9):
        raise SftlabError(f"{adapter / ADAPTER_CONFIG} has rank {rank}, alpha {alpha}, rslora {rslora} "
                          f"(scaling {scaling:g}), but the model's LoRA layers (e.g. {name}) have rank "
                          f"{module.rank}, scaling {module.scaling:g}. Set lora.rank={rank} lora.alpha={alpha} "
                          f"lora.rslora={str(rslora).lower()} to load this adapter.")


def _check_dora(peft_config: Mapping[str, Any], modules: Mapping[str, LoRALinear], adapter: Path) -> None:
    use_dora = bool(peft_config.get("use_dora"))
    name, module = next(iter(modules.items()))
    if isinstance(module, DoRALinear) != use_dora:
        raise SftlabError(f"{adapter / ADAPTER_CONFIG} has use_dora={str(use_dora).lower()}, but the model's LoRA "
                          f"layers (e.g. {name}) are {'DoRA' if isinstance(module, DoRALinear) else 'plain LoRA'}. "
                          f"Set lora.dora={str(use_dora).lower()} to load this adapter.")


def _check_targets(target_modules: str | list[str], model: nn.Module, modules: Mapping[str, LoRALinear],
                   adapter: Path) -> None:
    selected = _peft_selection(target_modules, _base_module_names(model, modules))
    wrapped = set(modules)
    if selected != wrapped:
        only_adapter, only_model = sorted(selected - wrapped), sorted(wrapped - selected)
        raise SftlabError(f"{adapter / ADAPTER_CONFIG} targets {target_modules!r}, which selects other layers "
                          f"than the model's LoRA layers (adapter only: {only_adapter[:3]}, model only: "
                          f"{only_model[:3]}). Set lora.targets to the adapter's target_modules.")


def _lora_modules_of(model: nn.Module, method: Method) -> dict[str, LoRALinear]:
    if not isinstance(method, LoRA):  # QLoRA and DoRA are LoRA too
        raise SftlabError(f"a PEFT-format adapter holds LoRA weights, but the method is {method.name!r}; "
                          "save a full fine-tune with save_model.")
    modules = lora_modules(model)
    if not modules:
        raise SftlabError("the model has no LoRA layers: apply the method (LoRA(config).apply(model)) first.")
    if any(module.merged for module in modules.values()):
        raise SftlabError("the model's LoRA layers are merged into the base weights; unmerge them before "
                          "saving or loading an adapter.")
    return modules
