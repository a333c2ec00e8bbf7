"""Streaming load: a model built without its weights, then filled tensor by tensor from safetensors shards.

`from_pretrained` would hold the whole base in the compute dtype on the host before anything else happens
(27 GB for a 7B model in fp32), and QLoRA would only quantise it afterwards. Here the skeleton's parameters
live on the meta device (no memory), its buffers are built for real (rotary `inv_freq` is computed at
init exactly as from_pretrained's model computes it), and each checkpoint tensor is read from its shard
(plain reads: no file pages stay resident; a tensor that changes dtype or device is read in 16 MiB pieces,
each cast into place), cast to the dtype the skeleton gives that parameter, put on the target device and, for
the layers QLoRA keeps in NF4 (`Nf4Spec`), quantised right there — the same `to_nf4` call on
the same tensor as quantising after a full load, so the weights are equal bit for bit.
Peak host memory: what stays resident plus the tensor being placed (and, for an NF4 layer, the quantiser's
working set on it).

A checkpoint this loader cannot map one to one onto the model (names that differ, e.g. an architecture
transformers converts on load, a missing tensor that is not a tied one, a shape that differs) is not
streamed: `stream_plan` says why and load_model falls back to from_pretrained, which handles (or reports)
it as before.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sftlab import libc


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint, from its shard's header (no data read)."""
    shape: tuple[int, ...]
    dtype: str
    """safetensors' dtype name: BF16, F16, F32, ..."""
    file: Path
    start: int
    """Byte offset of its data in `file`; the data ends at `end`."""
    end: int


DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
"""safetensors dtype names -> torch dtypes (the file format stores them little-endian, as torch does here)."""


@dataclass(frozen=True)
class Nf4Spec:
    """Which linear layers go straight to NF4 as they are read (QLoRA's decoder layers) and how."""
    block_size: int
    double_quant: bool


def checkpoint_tensors(files: list[Path]) -> dict[str, TensorInfo]:
    """Every tensor of the safetensors files `files` by name: shape, dtype, the file and byte range holding
    it, read from the headers only (the files are checked whole by models/load.py: check_safetensors).

    The safetensors format: 8 bytes little-endian header length N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}, "__metadata__": {...}}, then the data, offsets counted from its start."""
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        with open(file, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                begin, end = entry["data_offsets"]
                tensors[name] = TensorInfo(tuple(entry["shape"]), entry["dtype"], file, 8 + length + begin,
                                           8 + length + end)
    return tensors


def read_tensor(handle: Any, info: TensorInfo, into: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor `info` read from the open file `handle` with plain reads (unlike a memory map, no page of
    the file stays in this process's resident memory), into the front of the uint8 buffer `into` when given
    (a staging buffer reused for tensors that are cast anyway), else into a fresh tensor."""
    size = info.end - info.start
    data = torch.empty(size, dtype=torch.uint8) if into is None else into[:size]
    view = memoryview(data.numpy())
    handle.seek(info.start)
    done = 0
    while done < size:
        count = handle.readinto(view[done:])
        if not count:
            raise OSError(f"{info.file} ends before the data of a tensor it lists (byte {info.start + done})")
        done += count
    return data.view(DTYPES[info.dtype]).reshape(info.shape)


STAGING_BYTES = 16 * 2**20
"""Bytes of a checkpoint tensor read at a time when it is cast or moved as it is read (read_cast)."""


def read_cast(handle: Any, info: TensorInfo, staging: torch.Tensor, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """The tensor `info` as a new tensor of `dtype` on `device`, read from `handle` through the uint8 buffer
    `staging` a piece at a time, each piece cast into place by copy_ (the conversion .to() makes: the same
    values as reading the whole tensor and casting it)."""
    stored = DTYPES[info.dtype]
    element = torch.empty((), dtype=stored).element_size()
    out = torch.empty(info.shape, dtype=dtype, device=device)
    flat = out.view(-1)
    per = max(1, staging.numel() // element)
    for first in range(0, flat.numel(), per):
        count = min(per, flat.numel() - first)
        piece = TensorInfo((count,), info.dtype, info.file, info.start + first * element,
                           info.start + (first + count) * element)
        flat[first:first + count].copy_(read_tensor(handle, piece, staging))
    return out


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
            if isinstance(model.get_submodule(name), nn.Linear)
            and fits_nf4(model.get_submodule(name), spec.block_size)}


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
    """Read every tensor of `tensors` (checked by stream_plan) into the skeleton `model`, one at a time, each cast
    to its parameter's dtype and placed on `device` (NF4 for `nf4_layers`); then tie the tied weights and move the
    buffers to `device`. Returns `model`."""
    if device.type == "cpu":
        map_large_blocks()
    quantized = nf4_layers(model, nf4) if nf4 is not None else set()
    by_file: dict[Path, list[str]] = {}
    for name, info in tensors.items():
        by_file.setdefault(info.file, []).append(name)
    # A tensor that is cast or moved is read piece by piece through one small staging buffer, each piece cast
    # (or moved) straight into the tensor it becomes: the load never holds a tensor twice, and freed reads of
    # many sizes do not pile up in the allocator's heap.
    params = dict(model.named_parameters(remove_duplicate=False))
    held = {**dict(model.named_buffers(remove_duplicate=False)), **params}
    staged = {n: (held[n].dtype if held[n].is_floating_point() or n not in params else DTYPES[info.dtype])
              for n, info in tensors.items() if _needs_copy(held[n], info, device)}  # name -> dtype it becomes
    staging = torch.empty(min(STAGING_BYTES, max((tensors[n].end - tensors[n].start for n in staged), default=0)),
                          dtype=torch.uint8)
    with torch.no_grad():
        for file, names in by_file.items():
            with open(file, "rb", buffering=0) as handle:
                for name in names:
                    info = tensors[name]
                    value = read_cast(handle, info, staging, staged[name], device) if name in staged else \
                        read_tensor(handle, info)
                    as_nf4 = name.removesuffix(".weight") in quantized and name.endswith(".weight")
                    _place(model, name, value, device=device, nf4=nf4 if as_nf4 else None)
                    if as_nf4 and device.type == "cpu":
                        _release_freed_heap()
        del staging
        model.tie_weights()
        for module in model.modules():
            for key, buffer in module._buffers.items():
                if buffer is not None and buffer.device != device:
                    module._buffers[key] = buffer.to(device)
    left = [name for name, param in model.named_parameters() if param.device.type == "meta"]
    if left:  # stream_plan rules this out; a model whose tying differs from its config would end here
        raise RuntimeError(f"streaming load left {len(left)} parameter(s) unread, e.g. {left[0]}")
    return model


LARGE_BLOCK = 2**20
"""Bytes from which glibc maps each allocation on its own (map_large_blocks)."""


def map_large_blocks() -> None:
    """From now on, every allocation of LARGE_BLOCK bytes or more is mapped on its own (glibc's
    M_MMAP_THRESHOLD), so that freeing it gives its pages back at once. glibc's default threshold rises
    with every block freed, up to 32 MiB: the weights, activations and temporaries of a CPU load and
    training (1-32 MiB each, of ever-changing sizes) then go to the heap, which fragments and keeps the
    freed memory resident — 230 MiB kept after three passes over 28 NF4 layers of the 1B shape, 34 MiB with
    this; 448 and 38 MiB through torchao's dequantisation. Calling mallopt also turns glibc's adjustment of
    the threshold off. Left alone when MALLOC_MMAP_THRESHOLD_ is set (the user's own choice), and off glibc."""
    global _MAPPED
    if _MAPPED or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    mallopt = libc.function("mallopt")
    if mallopt:
        mallopt(-3, LARGE_BLOCK)  # M_MMAP_THRESHOLD
    _MAPPED = True


_MAPPED = False


def _release_freed_heap() -> None:
    """Hand the heap memory freed by the NF4 quantiser's temporaries (torchao works on the whole layer in
    fp32 and in chunks of 1M values × 16 levels) back to the OS. glibc keeps freed blocks of these sizes in
    its heap, where the next layers' differently sized temporaries cannot reuse them: without this, peak RSS
    grows by several times the quantiser's working set over a model's layers. A no-op off glibc."""
    malloc_trim = libc.function("malloc_trim")
    if malloc_trim:
        malloc_trim(0)


def _needs_copy(current: torch.Tensor, info: TensorInfo, device: torch.device) -> bool:
    """Whether placing a checkpoint tensor where the model holds `current` makes a new tensor (a cast, or a
    move off the host)."""
    return device.type != "cpu" or (current.is_floating_point() and current.dtype != DTYPES[info.dtype])


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
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [source / name for name in sorted(set(weight_map.values()))]
    return [source / "model.safetensors"]
