"""Attention over a packed row: several examples side by side in one sequence, none attending to another.

A packed batch (data/batching.py `collate_packed`) is one (1, T) row with no padding; its example
boundaries travel to every attention layer as transformers' varlen keyword arguments (`cu_seq_lens_q`,
`max_length_q`, …). The mechanism is chosen per attention backend while the model trains packed
(`packed_attention(model)`):

- `flash_attention_*` (GPU): transformers' own varlen path reads those arguments — unchanged.
- `sdpa`: replaced by `sftlab_packed_sdpa`. On a CUDA device in bf16/fp16 one varlen flash-attention call
  (torch.nn.attention.varlen) covers the row; elsewhere (the CPU) each example runs through
  scaled_dot_product_attention with is_causal on its own [start, end) slice. Either way attention costs
  Σ len² per row, not T², and no (T, T) mask is ever built.
- `eager`: replaced by `sftlab_packed_eager`, the same per-example slices through the explicit
  softmax(q·kᵀ) formula (the reference path; also used for logit soft-capping, which sdpa cannot do).

Every path honours the layer's scaling, grouped-query heads, sliding window and soft-cap. A packed call
without boundaries is an error, never attention across examples.

A row may share prefixes (data/batching.py, `Batch.shared`): an example that left out its first L tokens,
identical to another example's [start, start + L), attends to that example's keys and values there and then
causally to its own (positions from L on). Only the per-example paths read it (`prefix_sharing` says where they
run); the gradient of the shared keys and values is then the sum over every example that reads them, as it is
over their copies in an unshared row.
"""

from __future__ import annotations

import inspect
import itertools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sftlab.data.batching import SHARED_PREFIXES
from sftlab.errors import ConfigError, SftlabError

PACKED_SDPA = "sftlab_packed_sdpa"
PACKED_EAGER = "sftlab_packed_eager"
_REPLACEMENT = {"sdpa": PACKED_SDPA, "eager": PACKED_EAGER}
_VARLEN_NATIVE = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


@contextmanager
def packed_attention(model: nn.Module) -> Iterator[str]:
    """While inside, the model's attention keeps every example of a packed row to itself; yields the
    implementation in use. The model's own attention setting comes back on exit (export, generation)."""
    config = model.config
    original = config._attn_implementation or "eager"
    if original in _VARLEN_NATIVE:
        yield original
        return
    if original not in _REPLACEMENT:
        raise ConfigError(f"data.packing=true needs eager, sdpa or flash-attention attention; this model uses "
                          f"{original!r}. Set model.attn_implementation=sdpa, or data.packing=false.")
    _register()
    config._attn_implementation = _REPLACEMENT[original]
    try:
        yield config._attn_implementation
    finally:
        config._attn_implementation = original


def _register() -> None:
    try:
        from transformers import AttentionInterface
    except ImportError:  # pragma: no cover - transformers too old for pluggable attention
        raise ConfigError("data.packing=true needs transformers with AttentionInterface (>= 4.51); "
                          "upgrade transformers, or set data.packing=false.") from None
    AttentionInterface.register(PACKED_SDPA, packed_sdpa)
    AttentionInterface.register(PACKED_EAGER, packed_eager)


def packed_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature: query (1, H, T, D), key/value (1, Hkv, T, D) ->
    ((1, T, H, D), None)."""
    return _packed(query, key, value, explicit=False, **_options(module, kwargs)), None


def packed_eager(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    return _packed(query, key, value, explicit=True, **_options(module, kwargs)), None


def _options(module: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    if kwargs.get("s_aux") is not None:
        raise SftlabError(f"packed attention does not support attention sinks ({type(module).__name__}); "
                          "set data.packing=false for this model.")
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise SftlabError("packed attention was called without example boundaries (cu_seq_lens_q): this "
                          f"model's code ({type(module).__name__}) does not pass attention arguments through. "
                          "Set data.packing=false for this model.")
    return {"cu": cu, "max_len": int(kwargs.get("max_length_q") or 0), "scale": kwargs.get("scaling"),
            "window": kwargs.get("sliding_window"), "softcap": kwargs.get("softcap"),
            "dropout": float(kwargs.get("dropout") or 0.0), "shared": kwargs.get(SHARED_PREFIXES) or ()}


def prefix_sharing(model: nn.Module) -> bool:
    """Whether packed rows of `model` may share prefixes: its packed attention runs per example (sdpa or eager
    attention, and not the one-call varlen kernel that sdpa uses for half precision on a GPU, which is faster
    there than what sharing saves); flash-attention kernels read no shared prefixes."""
    implementation = model.config._attn_implementation or "eager"
    if implementation not in (*_REPLACEMENT, *_REPLACEMENT.values()):
        return False
    parameter = next(model.parameters(), None)
    one_kernel = (implementation in ("sdpa", PACKED_SDPA) and parameter is not None
                  and parameter.device.type == "cuda" and parameter.dtype in (torch.float16, torch.bfloat16))
    return not one_kernel


def _packed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, explicit: bool, cu: torch.Tensor,
            max_len: int, scale: float | None, window: int | None, softcap: float | None,
            dropout: float, shared: tuple[tuple[int, int], ...] = ()) -> torch.Tensor:
    if query.shape[0] != 1:
        raise SftlabError(f"a packed batch is one row; attention got {query.shape[0]} rows")
    if not shared and not explicit and softcap is None and dropout == 0.0 and _varlen_usable(query):
        out = _varlen(query, key, value, cu, max_len, scale, window)
        if out is not None:
            return out
    bounds = cu.tolist()  # host values: free on the CPU, one sync on a GPU
    if shared and len(shared) != len(bounds) - 1:
        raise SftlabError(f"a packed row of {len(bounds) - 1} examples came with {len(shared)} shared prefixes")
    parts = []
    for (a, b), (start, length) in zip(itertools.pairwise(bounds), shared or itertools.repeat((0, 0))):
        keys, values = key[:, :, a:b], value[:, :, a:b]
        if length:  # the shared beginning's keys and values in front; the queries continue it from position length
            keys = torch.cat([key[:, :, start:start + length], keys], dim=2)
            values = torch.cat([value[:, :, start:start + length], values], dim=2)
        parts.append(_example(query[:, :, a:b], keys, values, explicit=explicit, scale=scale, window=window,
                              softcap=softcap, dropout=dropout, offset=length))
    return torch.cat(parts, dim=2).transpose(1, 2)  # (1, H, T, D) -> (1, T, H, D)


def _example(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, explicit: bool, scale: float | None,
             window: int | None, softcap: float | None, dropout: float, offset: int = 0) -> torch.Tensor:
    """Causal attention of one example: q (1, H, L, D), k/v (1, Hkv, offset + L, D) -> (1, H, L, D). Query i
    stands at position offset + i: with offset > 0 the keys begin with a prompt run earlier, which these
    queries continue (models/shared_prefix.py)."""
    length, groups = q.shape[2], q.shape[1] // k.shape[1]
    banded = window is not None and offset + length > window
    if explicit or softcap is not None:
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * (q.shape[-1] ** -0.5 if scale is None else scale)  # (1, H, L, L)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~_allowed(length, window, q.device, offset), torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, p=dropout, training=dropout > 0)
        return torch.matmul(probs, v)
    mask = _allowed(length, window, q.device, offset) if banded or offset else None  # is_causal: square only
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout,
                                          scale=scale, enable_gqa=groups > 1)


def _allowed(length: int, window: int | None, device: torch.device, offset: int = 0) -> torch.Tensor:
    """(L, offset + L) bool: query i, at position offset + i, sees key j when j <= offset + i (and
    offset + i - j < window for sliding-window layers)."""
    queries = torch.arange(offset, offset + length, device=device)
    keys = torch.arange(offset + length, device=device)
    allowed = keys[None, :] <= queries[:, None]
    if window is not None:
        allowed &= (queries[:, None] - keys[None, :]) < window
    return allowed


# --- one varlen kernel call per row on CUDA (torch.nn.attention.varlen), checked once against the slices ---

_varlen_state: dict[str, Any] = {"checked": False, "ok": False}


def _varlen_usable(query: torch.Tensor) -> bool:
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    if not _varlen_state["checked"]:
        return True
    return _varlen_state["ok"]


def _varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor, max_len: int,
            scale: float | None, window: int | None) -> torch.Tensor | None:
    """The whole row through one flash-attention varlen call, or None where this torch has no usable one.
    The first call is compared with the per-example path; a mismatch turns the kernel off for the process."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        _varlen_state.update(checked=True, ok=False)
        return None
    params = inspect.signature(varlen_attn).parameters
    groups = query.shape[1] // key.shape[1]
    if groups > 1 and "enable_gqa" not in params:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    options: dict[str, Any] = {"scale": scale}
    if groups > 1 and "enable_gqa" in params:
        options["enable_gqa"] = True
    if "window_size" in params:
        options["window_size"] = (-1 if window is None else window - 1, 0)  # causal (+ sliding window)
    elif "is_causal" in params and window is None:
        options["is_causal"] = True
    else:
        _varlen_state.update(checked=True, ok=False)
        return None
    cu32 = cu.to(torch.int32)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, D)
    out = varlen_attn(q, k, v, cu32, cu32, max_len, max_len, **options).unsqueeze(0)  # (1, T, H, D)
    if not _varlen_state["checked"]:
        _varlen_state["checked"] = True
        with torch.no_grad():
            reference = _packed(query.detach(), key.detach(), value.detach(), explicit=False, cu=cu, max_len=max_len,
                                scale=scale, window=window, softcap=None, dropout=0.0)
        _varlen_state["ok"] = bool(torch.allclose(out.detach().float(), reference.float(), atol=3e-2, rtol=3e-2))
        if not _varlen_state["ok"]:
            warnings.warn("torch's varlen attention disagreed with per-example attention on the first packed "
                          "batch; sftlab uses per-example attention from now on.", stacklevel=2)
            return None
    return out
