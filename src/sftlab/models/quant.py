"""NF4 base weights for QLoRA (torchao's `NF4Tensor`), their resident size, and dequantisation for merge.

NF4 (Dettmers et al. 2023, "QLoRA", §3): each block of `block_size` (64) consecutive weights is divided
by its absolute maximum and every value is stored as the 4-bit index of the nearest of 16 NormalFloat
levels (the quantiles of N(0, 1), rescaled to [-1, 1], with an exact 0). Double quantisation stores the
per-block absmax scales themselves as int8 (minus their mean, one fp scale per 256 of them), saving
about 0.37 bits per weight. torchao implements both in `NF4Tensor` (pure PyTorch: it runs on CPU and
CUDA); its linear dequantises the weight to the input's dtype and multiplies.

Resident size of an NF4 weight (out × in, in the compute dtype): out·in/2 bytes of codes + out·in/64
bytes of int8 scales (double-quantised; 4 bytes per 64 weights in fp32 without) + a few bytes per 256
blocks — 0.26× the same weights in bf16 (0.28× without double quantisation). The tests measure it.

Error (tests/methods/test_qlora.py checks the bounds below): a Gaussian weight comes back from NF4 with a
relative RMS error of 9.2% (WEIGHT_REL_RMS_ERROR); on 2-layer random Llamas (hidden 64) the logits of the
quantised model differ from the fp32 model's by at most FORWARD_MAX_REL_ERROR (max |Δlogit| / max |logit|)
and FORWARD_MEAN_REL_ERROR on average (mean |Δlogit| / mean |logit|). Errors of the layers compound: the
same measure gives 0.15-0.30 / 0.15-0.19 on 4-layer random models, whose logits are tiny. Pretrained
models fare better (QLoRA §4: NF4 with double quantisation matches 16-bit fine-tuning), but a QLoRA
model's logits differ from the unquantised base's by percents, never by 1e-5 as a merge does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sftlab.models.swap import swap_module

WEIGHT_REL_RMS_ERROR = 0.10
"""Bound on ‖dequant(NF4(W)) - W‖ / ‖W‖ for a Gaussian weight (measured: 0.092, block size 64)."""
FORWARD_MAX_REL_ERROR = 0.20
"""Bound on max |logit(NF4) - logit(fp32)| / max |logit(fp32)| for the test models: random 2-layer Llamas,
hidden 64, init std 0.02 (measured over 6 seeds: 0.09-0.17)."""
FORWARD_MEAN_REL_ERROR = 0.15
"""Bound on mean |logit(NF4) - logit(fp32)| / mean |logit(fp32)|, same models (measured: 0.09-0.12)."""
SCALER_BLOCK_SIZE = 256
"""Double quantisation: per-block scales share one fp scale per this many blocks (QLoRA §3)."""


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is an NF4Tensor: forward(x) = x·dequant(W)ᵀ + b.

    The weight is held (out, in) even for GPT-2's Conv1D (stored (in, out)); `plain()` rebuilds the
    original kind of layer. The bias stays in its original precision."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, conv1d: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.conv1d = conv1d
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    @torch.no_grad()
    def from_layer(cls, layer: nn.Module, *, block_size: int, double_quant: bool) -> NF4Linear | None:
        """The NF4 form of an nn.Linear or Conv1D; None if its weight does not split into whole blocks."""
        if not fits_nf4(layer, block_size):
            return None
        conv1d = type(layer).__name__ == "Conv1D"
        weight = layer.weight.detach()
        if _is_nf4(weight):  # quantised as it was loaded (models/stream.py): the same NF4Tensor, kept as is
            return cls(weight, layer.bias)
        weight = (weight.t() if conv1d else weight).contiguous()  # (out, in)
        return cls(to_nf4(weight, block_size=block_size, double_quant=double_quant), layer.bias, conv1d=conv1d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torchao's own route (F.linear on an NF4Tensor -> its LinearNF4) computes the same products from the
        # same dequantised weight; _NF4Linear dequantises with a twentieth of the temporaries (see dequant).
        out = _NF4Linear.apply(x, self.weight)
        return out if self.bias is None else out + self.bias

    def dequantized_weight(self) -> torch.Tensor:
        """dequant(W), (out, in), in the weight's compute dtype."""
        return dequant(self.weight)

    @torch.no_grad()
    def plain(self, weight: torch.Tensor | None = None) -> nn.Module:
        """An nn.Linear (or Conv1D) holding `weight` in the original layer's layout — dequant(W) if None —
        and this layer's bias."""
        dense = self.dequantized_weight() if weight is None else weight
        dtype, device = self.weight.dtype, self.weight.device
        if self.conv1d:
            from transformers.pytorch_utils import Conv1D

            layer: nn.Module = Conv1D(self.out_features, self.in_features)
            if weight is None:
                dense = dense.t()
        else:
            layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        layer.weight = nn.Parameter(dense.to(device=device, dtype=dtype).contiguous(), requires_grad=False)
        layer.bias = None if self.bias is None else nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return layer

    def extra_repr(self) -> str:
        w = self.weight
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, nf4 block {w.block_size}, dtype {str(w.dtype).removeprefix('torch.')}"


def to_nf4(weight: torch.Tensor, *, block_size: int, double_quant: bool) -> torch.Tensor:
    """torchao's NF4Tensor of a 2-D weight whose numel is a multiple of block_size.

    torchao always double-quantises; without `double_quant` the per-block absmax scales are kept as
    plain fp32 (as bitsandbytes does), put into the same NF4Tensor so that its dequantise path reads them
    unchanged: scales / 1 + 0."""
    nf4_tensor = _torchao_nf4()
    n_blocks = weight.numel() // block_size
    # torchao needs the scaler block to divide the number of blocks; small layers get a smaller one.
    scaler_block = max(d for d in range(1, min(SCALER_BLOCK_SIZE, n_blocks) + 1) if n_blocks % d == 0)
    with _quantizer_chunk(QUANTIZER_CHUNK), _nearest_search(nf4_tensor):
        quantized = nf4_tensor.from_tensor(weight, block_size, scaler_block)
    if double_quant:
        # torchao's quantization_factor (n_scaler_blocks,) may be a view into a (n_scaler_blocks,
        # scaler_block) tensor it computed on the way: a copy keeps only what is needed resident.
        scales, factor, mean = quantized.quantized_scalers, quantized.quantization_factor.clone(), quantized.scaler_mean
    else:
        scaler_block = n_blocks
        scales = weight.flatten().view(n_blocks, block_size).abs().amax(dim=1).float()  # (n_blocks,)
        factor, mean = torch.ones(1, device=weight.device), torch.zeros((), device=weight.device)
    meta = quantized.__tensor_flatten__()[1]["tensor_meta"]
    return nf4_tensor(meta, block_size, n_blocks, scaler_block, scales, factor, mean, quantized.quantized_data,
                      quantized.nf4)


QUANTIZER_CHUNK = 2**18
"""Values torchao compares with the 16 NF4 levels at once (its default is 2**20): each chunk needs two
(chunk, 16) fp32 temporaries, 32 MiB here instead of 128 MiB. The search is per value, so the codes do not
depend on it."""


@contextmanager
def _quantizer_chunk(size: int) -> Iterator[None]:
    """torchao's NF4 nearest-level search runs in chunks of `size` values inside the block."""
    import sys

    module = sys.modules.get(_torchao_nf4().__module__)
    previous = getattr(module, "CHUNK_SIZE", None)
    if previous is None:  # a torchao without the knob: its own chunking
        yield
        return
    module.CHUNK_SIZE = size
    try:
        yield
    finally:
        module.CHUNK_SIZE = previous


@contextmanager
def _nearest_search(nf4_tensor: Any) -> Iterator[None]:
    """torchao's nearest-level search replaced by `nearest_level` (the same codes, several times faster) for
    the block."""
    previous = nf4_tensor.__dict__.get("quantize_tensor_nearest")
    if previous is None:  # a torchao without this step: its own search
        yield
        return
    original = previous.__func__

    def search(value: torch.Tensor, nf4: torch.Tensor) -> torch.Tensor:
        found = nearest_level(value, nf4)
        return original(value, nf4) if found is None else found

    nf4_tensor.quantize_tensor_nearest = staticmethod(search)
    try:
        yield
    finally:
        nf4_tensor.quantize_tensor_nearest = previous


def nearest_level(value: torch.Tensor, levels: torch.Tensor) -> torch.Tensor | None:
    """For each value of the 1-D `value`, the index of its nearest entry of the sorted `levels`, the first on a
    tie: what torchao's search gives (`(value[:, None] - levels).abs().min(-1).indices`, 16 differences per
    value), computed as the bucket between midpoints and the same |value - level| differences for that
    bucket and its two neighbours only. In floating point |v - l_i| is unimodal in i and rounding moves the
    minimum by at most one place from the bucket, so the three candidates always hold it: the indices are
    equal (tests/methods/test_nf4_kernels.py checks them on every level, midpoint and its float neighbours). None
    when a value is NaN (an all-zero block divides 0/0): torchao's own search handles those."""
    if torch.isnan(value).any():
        return None
    last = levels.numel() - 1
    middle = torch.zeros(value.shape, dtype=torch.uint8, device=value.device)
    for midpoint in ((levels[1:] + levels[:-1]) / 2).tolist():  # the bucket: midpoints below the value
        middle += value > midpoint  # (15 vectorised compares beat torch.bucketize's search per value)
    middle = middle.long()
    best = middle
    distance = (value - levels[middle]).abs()
    below = (middle - 1).clamp_(min=0)
    closer = (value - levels[below]).abs()
    take = closer <= distance  # a tie goes to the lower index, as torch.min's first minimum
    best = torch.where(take, below, best)
    distance = torch.where(take, closer, distance)
    above = (middle + 1).clamp_(max=last)
    take = (value - levels[above]).abs() < distance
    return torch.where(take, above, best)


DEQUANT_CHUNK = 2**18
"""Weights `dequant` decodes at once: its temporaries are 1 MiB blocks (the chunk's int64 indices and its
values), not the weight's size. Bigger chunks (16 MiB blocks at 2**22) fragment glibc's heap: +1.1 GiB of
RSS kept after one step of the 1B shape's QLoRA run."""


def dequant(weight: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """dequant(W) of the NF4Tensor `weight`, in `dtype` (default the weight's): bit for bit what torchao's
    `get_original_weight()` gives (the same level table times the same block scale, per value), but decoded
    in chunks straight into the result. torchao's holds two int64 index tensors and six half-size float
    ones at once — about 5x the result (0.9 GiB for a 7B model's 11008x4096 layer in fp32) — where this
    needs the result plus DEQUANT_CHUNK-sized temporaries."""
    block = weight.block_size
    scales = weight.dequantize_scalers(weight.quantized_scalers, weight.quantization_factor,
                                       weight.scaler_block_size)  # (n_blocks,), in the weight's dtype
    levels = weight.nf4
    codes = torch.arange(256, device=levels.device)
    pairs = torch.stack([levels[codes >> 4], levels[codes & 0b1111]], dim=-1)  # byte -> (first, second) value
    n_blocks = weight.numel() // block
    packed = weight.quantized_data.view(n_blocks, block // 2)
    out = torch.empty(n_blocks, block // 2, 2, dtype=levels.dtype, device=levels.device)
    step = max(1, DEQUANT_CHUNK // block)
    for start in range(0, n_blocks, step):
        end = min(start + step, n_blocks)
        torch.mul(pairs[packed[start:end].long()], scales[start:end, None, None], out=out[start:end])
    dense = out.view(weight.shape)
    return dense if dtype is None or dtype == dense.dtype else dense.to(dtype)


class _NF4Linear(torch.autograd.Function):
    """x·dequant(W)ᵀ with the NF4 weight frozen: torchao's LinearNF4 (the same two products on the same
    dequantised weight, so the same numbers), dequantising with `dequant`. Nothing is saved for backward
    but the NF4 weight itself: backward dequantises it again."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.nf4 = weight
        return F.linear(x, dequant(weight, x.dtype))

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output @ dequant(ctx.nf4, grad_output.dtype), None


def fits_nf4(layer: nn.Module, block_size: int) -> bool:
    """Whether the layer's weight splits into whole NF4 blocks (of whole bytes: two 4-bit codes each)."""
    numel = layer.weight.numel()
    return numel % block_size == 0 and numel % 2 == 0


def nf4_modules(model: nn.Module) -> dict[str, NF4Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, NF4Linear)}


def quantize(model: nn.Module, names: list[str], *, block_size: int, double_quant: bool) -> list[str]:
    """Replace each named linear layer by its NF4Linear, in place; returns the names of layers left in
    their original precision because their weight does not split into whole blocks (`fits_nf4`)."""
    skipped = []
    for name in names:
        quantized = NF4Linear.from_layer(model.get_submodule(name), block_size=block_size, double_quant=double_quant)
        if quantized is None:
            skipped.append(name)
        else:
            _replace(model, name, quantized)
    return skipped


def dequantize(model: nn.Module, weights: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Replace every NF4Linear by a plain nn.Linear (or Conv1D), in place: with dequant(W), or with
    `weights[module name]` (the original weight, in the original layer's layout) where given."""
    for name, module in nf4_modules(model).items():
        _replace(model, name, module.plain(None if weights is None else weights[name]))
    return model


def base_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Resident bytes of the frozen base: `nf4` (every storage of the NF4 weights: codes, scales, their
    scales, the level table), `nf4_as_bf16` (the same weights at 2 bytes each), `other` (every other frozen
    parameter, e.g. embeddings, norms, head, biases) and `total`. Shared storages count once."""
    seen: set[int] = set()
    nf4, nf4_as_bf16, other = 0, 0, 0
    for param in model.parameters():
        if param.requires_grad:
            continue
        if _is_nf4(param):
            nf4 += sum(_storage_bytes(t, seen) for t in _inner_tensors(param))
            nf4_as_bf16 += 2 * param.numel()
        else:
            other += _storage_bytes(param, seen)
    return {"nf4": nf4, "nf4_as_bf16": nf4_as_bf16, "other": other, "total": nf4 + other}


def base_memory_line(model: nn.Module) -> str:
    """One line for the run log, e.g. `base weights: 1.23 MB (linear layers 0.26 MB NF4, 0.26x of bf16;
    other weights 0.97 MB)`; the other weights are the embeddings, norms, head, biases and any linear layer
    that does not split into whole blocks."""
    size = base_weight_bytes(model)
    ratio = size["nf4"] / size["nf4_as_bf16"] if size["nf4_as_bf16"] else float("nan")
    return (f"base weights: {_mb(size['total'])} (linear layers {_mb(size['nf4'])} NF4, {ratio:.2f}x of bf16; "
            f"other weights {_mb(size['other'])})")


def _mb(count: int) -> str:
    return f"{count / 1e6:.2f} MB" if count < 1e9 else f"{count / 1e9:.2f} GB"


def _is_nf4(tensor: torch.Tensor) -> bool:
    return type(tensor.data if isinstance(tensor, nn.Parameter) else tensor).__name__ == "NF4Tensor"


def _inner_tensors(param: torch.Tensor) -> Iterator[torch.Tensor]:
    tensor = param.data if isinstance(param, nn.Parameter) else param
    names, _ = tensor.__tensor_flatten__()
    return (getattr(tensor, name) for name in names)


def _storage_bytes(tensor: torch.Tensor, seen: set[int]) -> int:
    storage = tensor.untyped_storage()
    if storage.data_ptr() in seen:
        return 0
    seen.add(storage.data_ptr())
    return storage.nbytes()


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    swap_module(model, name, module)


TORCHAO_LOGGERS = ("torchao", "torch.utils._pytree")
"""What importing torchao logs on a CPU machine (its CUDA-only extensions that fail to load, and enum
registrations torch deprecates): noise that says nothing about the run. torchao is imported by sftlab's NF4 code
and by transformers when it builds its first model, so every place that may be first quiets these."""


def _torchao_nf4() -> Any:
    """torchao's NF4Tensor class. Importing torchao logs warnings about its CUDA-only extensions on a CPU
    machine; they say nothing about NF4 (pure PyTorch), so they are silenced for the import."""
    try:
        with quiet_loggers(*TORCHAO_LOGGERS):
            from torchao.quantization import NF4Tensor
    except ImportError as exc:
        from sftlab.errors import ConfigError

        raise ConfigError(f"method qlora needs torchao (NF4 weights): pip install 'torchao>=0.18' ({exc})") from None
    return NF4Tensor


@contextmanager
def quiet_loggers(*logger_names: str) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
