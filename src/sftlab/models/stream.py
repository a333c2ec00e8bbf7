"""Streaming load: a model built without its weights, then filled tensor by tensor from safetensors shards.

`from_pretrained` would hold the whole base in the compute dtype on the host before anything else happens
(27 GB for a 7B model in fp32), and QLoRA would only quantise it afterwards. Here the skeleton's parameters
live on the meta device (no memory), its buffers are built for real (rotary `inv_freq` is computed at
init exactly as from_pretrained's model computes it), and each checkpoint tensor is read from its shard
(memory-mapped: one shard's pages at a time), cast to the dtype the skeleton gives that parameter, put on
the target device and, for the layers QLoRA keeps in NF4 (`Nf4Spec`), quantised right there — the same
`to_nf4` call on the same tensor as quantising after a full load, so the weights are equal bit for bit.
Peak host memory: what stays resident plus one shard.

A checkpoint this loader cannot map one to one onto the model (names that differ, e.g. an architecture
transformers converts on load, a missing tensor that is not a tied one, a shape that differs) is not
streamed: `stream_plan` says why and load_model falls back to from_pretrained, which handles (or reports)
it as before.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint, from its shard's header (no data read)."""
    shape: tuple[int, ...]
    dtype: str
    """safetensors' dtype name: BF16, F16, F32, ..."""
    file: Path


@dataclass(frozen=True)
class Nf4Spec:
    """Which linear layers go straight to NF4 as they are read (QLoRA's decoder layers) and how."""
    block_size: int
    double_quant: bool


def checkpoint_tensors(files: list[Path]) -> dict[str, TensorInfo]:
    """Every tensor of the safetensors files `files` by name: shape, dtype and the file holding it, read
    from the headers only."""
    from safetensors import safe_open

    tensors: dict[str, TensorInfo] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                tensors[name] = TensorInfo(tuple(piece.get_shape()), piece.get_dtype(), file)
    return tensors


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every nn.Parameter registered inside the block lives on the meta device (shape and dtype, no data);
    buffers stay real, so those computed at init (rotary frequencies) are right without the weights."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def skeleton(source: Path, *, dtype: torch.dtype, trust_remote_code: bool, attn_implementation: str) -> nn.Module:
    """The causal LM that `source`'s config.json describes, its parameters on the meta device (in the dtype
    from_pretrained would give each), its buffers real, in eval mode as from_pretrained returns it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if attn_implementation != "auto":
        kwargs["attn_implementation"] = attn_implementation
    with parameters_on_meta():  # from_config builds in `dtype` (and keeps any fp32-only modules fp32)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    return model.eval()


def nf4_layers(model: nn.Module, spec: Nf4Spec) -> set[str]:
    """Names of the decoder's nn.Linear layers (QLoRA's, the head excluded) whose weight splits into whole
    NF4 blocks. GPT-2's Conv1D layers are left out: they load in the compute dtype and QLoRA quantises them
    after the load, as before."""
    from sftlab.models.quant import fits_nf4
    from sftlab.models.targets import find_targets

    return {name for name in find_targets(model, "all-linear", key="qlora")
            if isinstance(model.get_submodule(name), nn.Linear) and fits_nf4(model.get_submodule(name), spec.block_size)}


def stream_plan(model: nn.Module, tensors: dict[str, TensorInfo]) -> str | None:
    """Why the checkpoint `tensors` cannot be streamed into the skeleton `model` (None: it can): every
    parameter must be in the checkpoint under its own name and shape, or be the tied copy of one that is;
    every checkpoint tensor must be a parameter or a buffer of the model."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    tied = set(_tied_targets(model))
    missing = [name for name in params if name not in tensors and name not in tied]
    if missing:
        return f"{len(missing)} parameter(s) not in the checkpoint under the model's names (e.g. {missing[0]})"
    unknown = [name for name in tensors if name not in params and name not in buffers]
    if unknown:
        return f"{len(unknown)} checkpoint tensor(s) the model has no place for (e.g. {unknown[0]})"
    for name, info in tensors.items():
        expected = tuple((params.get(name) if name in params else buffers[name]).shape)
        if info.shape != expected:
            return f"{name} has shape {info.shape} in the checkpoint, {expected} in the model"
    return None


def fill(model: nn.Module, tensors: dict[str, TensorInfo], *, device: torch.device,
         nf4: Nf4Spec | None = None) -> nn.Module:
    """Read every tensor of `tensors` (checked by stream_plan) into the skeleton `model`, one shard open at a
    time, each cast to its parameter's dtype and placed on `device` (NF4 for `nf4_layers`); then tie the
    tied weights and move the buffers to `device`. Returns `model`."""
    from safetensors import safe_open

    quantized = nf4_layers(model, nf4) if nf4 is not None else set()
    by_file: dict[Path, list[str]] = {}
    for name, info in tensors.items():
        by_file.setdefault(info.file, []).append(name)
    with torch.no_grad():
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                for name in names:
                    _place(model, name, handle.get_tensor(name), device=device, nf4=nf4 if
                           name.removesuffix(".weight") in quantized and name.endswith(".weight") else None)
        model.tie_weights()
        for module in model.modules():
            for key, buffer in module._buffers.items():
                if buffer is not None and buffer.device != device:
                    module._buffers[key] = buffer.to(device)
    left = [name for name, param in model.named_parameters() if param.device.type == "meta"]
    if left:  # stream_plan rules this out; a model whose tying differs from its config would end here
        raise RuntimeError(f"streaming load left {len(left)} parameter(s) unread, e.g. {left[0]}")
    return model


def _place(model: nn.Module, name: str, tensor: torch.Tensor, *, device: torch.device, nf4: Nf4Spec | None) -> None:
    """Put the checkpoint tensor `name` into the model: cast to the dtype the skeleton holds for it, on
    `device`, NF4-quantised when `nf4` is given (the weight of an nn.Linear that QLoRA keeps in NF4)."""
    owner_name, _, key = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if key in owner._parameters:
        current = owner._parameters[key]
        value = tensor.to(device=device, dtype=current.dtype if current.is_floating_point() else tensor.dtype)
        if nf4 is not None:
            from sftlab.models.quant import to_nf4

            value = to_nf4(value.contiguous(), block_size=nf4.block_size, double_quant=nf4.double_quant)
        owner._parameters[key] = nn.Parameter(value, requires_grad=current.requires_grad and nf4 is None)
    else:  # a persistent buffer stored with the weights
        current = owner._buffers[key]
        owner._buffers[key] = tensor.to(device=device, dtype=current.dtype)


def _tied_targets(model: nn.Module) -> list[str]:
    """Parameter names that are tied copies of another (e.g. lm_head.weight with tie_word_embeddings)."""
    keys = getattr(model, "all_tied_weights_keys", None)
    if keys is None and hasattr(model, "get_expanded_tied_weights_keys"):
        keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    if keys:
        return list(keys)
    # Older transformers: a parameter that is the same object as an earlier one is a tied copy.
    seen: dict[int, str] = {}
    tied = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.append(name)
        seen.setdefault(id(param), name)
    return tied


def weight_files(source: Path) -> list[Path]:
    """The safetensors files of a checked model dir: the index's shards, or model.safetensors."""
    index = source / "model.safetensors.index.json"
    if index.is_file():
        return [source / name for name in sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))]
    return [source / "model.safetensors"]
