"""Sequences that continue the prompts of a packed row, without running those prompts again.

KTO's reference-KL estimate scores, for each example, its own prompt followed by another example's completion
(data/feedback.py). That sequence's prompt tokens are the example's: in a causal model their keys, values and
hidden states are the same in both sequences. So the examples' packed row runs once while its attention layers
keep their keys and values (`capture`), and the KL completions then run as a second packed row of their own
(`branch`): each segment continues its example's prompt (positions from the prompt's length on) and attends to
that prompt's kept keys and values and, causally, to itself — never to the example's own completion. Per KL
sequence that saves a forward of its prompt (in chat data most of its tokens), with the same result up to
floating-point reassociation.

Both work through transformers' AttentionInterface, as packed attention does (models/attention.py), for models
whose attention is sdpa or eager; `usable` says whether a model qualifies.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from sftlab.models.attention import _example, _options, packed_eager, packed_sdpa

CAPTURE, BRANCH = "sftlab_prefix_capture", "sftlab_prefix_branch"
_PACKED = {"sdpa": packed_sdpa, "eager": packed_eager}


class _Prefixes:
    """What one shared-prefix pass holds: the packed attention the model uses, each attention layer's keys and
    values of the examples' row, and each example's prompt span [start, start + length) in that row."""

    def __init__(self, packed: Any, spans: list[tuple[int, int]]) -> None:
        self.packed, self.spans = packed, spans
        self.kept: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}


_CURRENT: ContextVar[_Prefixes | None] = ContextVar("sftlab_shared_prefix", default=None)


def usable(model: nn.Module) -> bool:
    """Whether `model`'s attention can run the two passes (sdpa or eager; not a flash-attention kernel)."""
    return (model.config._attn_implementation or "eager") in _PACKED


@contextmanager
def shared_prefixes(model: nn.Module, spans: list[tuple[int, int]]) -> Iterator[_Prefixes]:
    """While inside, `capture(model)` and `branch(model)` run the two passes; the kept keys and values go at exit."""
    from transformers import AttentionInterface

    AttentionInterface.register(CAPTURE, _capture)
    AttentionInterface.register(BRANCH, _branch)
    prefixes = _Prefixes(_PACKED[model.config._attn_implementation or "eager"], spans)
    token = _CURRENT.set(prefixes)
    try:
        yield prefixes
    finally:
        _CURRENT.reset(token)
        prefixes.kept.clear()


@contextmanager
def attention(model: nn.Module, kind: str) -> Iterator[None]:
    """The model's attention as `kind` (CAPTURE: the examples' packed row; BRANCH: the continuations' row)."""
    original = model.config._attn_implementation
    model.config._attn_implementation = kind
    try:
        yield
    finally:
        model.config._attn_implementation = original


def _capture(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Packed attention over the examples' row, keeping this layer's keys and values (detached: the
    continuations run without gradients)."""
    prefixes = _current()
    prefixes.kept[module] = (key.detach(), value.detach())
    return prefixes.packed(module, query, key, value, attention_mask, **kwargs)


def _branch(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
            **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of the continuations' row: segment i attends to prompt i's kept keys and values, then causally
    to itself. query (1, H, S, D), key/value (1, Hkv, S, D) -> ((1, S, H, D), None)."""
    prefixes = _current()
    kept_key, kept_value = prefixes.kept[module]
    options = _options(module, kwargs)
    bounds = options["cu"].tolist()
    parts = []
    for (a, b), (start, length) in zip(itertools.pairwise(bounds), prefixes.spans):
        if b > a:
            keys = torch.cat([kept_key[:, :, start:start + length], key[:, :, a:b]], dim=2)
            values = torch.cat([kept_value[:, :, start:start + length], value[:, :, a:b]], dim=2)
            parts.append(_example(query[:, :, a:b], keys, values, explicit=False, scale=options["scale"],
                                  window=options["window"], softcap=options["softcap"],
                                  dropout=options["dropout"], offset=length))
    return torch.cat(parts, dim=2).transpose(1, 2), None


def _current() -> _Prefixes:
    prefixes = _CURRENT.get()
    if prefixes is None:
        raise RuntimeError("shared-prefix attention ran outside shared_prefixes(): nothing to continue")
    return prefixes
