"""Batched decoding against a KV cache: the forgetting probe's answers (train/probe.py), `sftlab eval`'s, and any
caller's many prompts at once (the support-agent demo's held-out answers).

    prompts ──common_prefix──▶ shared prefix, run once at batch 1 (its KV cache copied along each batch)
      ──left_padded (each row's own tokens)──▶ prefill (B, T) ──pick (greedy | top-p)──▶ (B,) tokens
      ──step (B, 1) with the cache──▶ ... until every row has stopped or the batch's max_new_tokens

It is a loop over the model's own forward, never HF generate(), so methods that hook the forward decode
through the path they train through (`prefill`: a soft-prompt method's first forward, one prompt at a time).
Model-level (floor 1), so that train/ (the probe) and everything above it share one decoder.

Chat-template prompts share a long token prefix (a template's default system prompt and the user's header):
its keys and values are computed once per pass, and each batch runs only its rows' own tokens, left-padded
between the prefix and each row (the padding masked). The answers are those of whole rows to float rounding.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch

CANDIDATES = 256
"""Tokens kept for a top-p draw when they hold top_p of the mass (else the whole vocabulary is sorted)."""


@dataclass(frozen=True)
class SharedPrefix:
    """The token prefix every row of a pass starts with, and its KV cache at batch 1 (None when empty)."""
    length: int
    cache: Any
    name: str
    """The forward's keyword for a cache (transformers renamed past_key_values to cache)."""

    def copied(self, rows: int) -> dict[str, Any]:
        """The forward's cache keyword: a fresh copy of the prefix's cache for `rows` rows (a forward appends to
        the cache it is given), or nothing without a prefix."""
        if self.cache is None:
            return {}
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(rows)
        return {self.name: cache}

    def masked(self, mask: torch.Tensor) -> torch.Tensor:
        """The attention mask (B, P + T) over the prefix and the rows' own tokens (B, T)."""
        return torch.cat([mask.new_ones(mask.shape[0], self.length), mask], dim=1) if self.length else mask


NO_PREFIX = SharedPrefix(0, None, "")


def shared_prefix(model: Any, rows: list[list[int]], *, device: torch.device) -> SharedPrefix:
    """The rows' shared prefix with its KV cache, computed once at batch 1 by the model's decoder (no output head:
    only its keys and values are kept); empty when the rows share nothing or the model's cache cannot be copied
    along a batch."""
    length = common_prefix(rows)
    if length == 0:
        return NO_PREFIX
    out = model.base_model(input_ids=torch.tensor([rows[0][:length]], device=device), use_cache=True)
    cache = returned_cache(out)
    if not hasattr(cache, "batch_repeat_interleave"):
        return NO_PREFIX
    return SharedPrefix(length, cache, cache_keyword(model))


def common_prefix(rows: list[list[int]]) -> int:
    """The length of the token prefix all rows share, short of the shortest row's last token (every row keeps
    one of its own: decoding starts from its last position); 0 for fewer than two rows (nothing to share)."""
    if len(rows) < 2:
        return 0
    first, shortest, length = rows[0], min(len(r) for r in rows), 0
    while length < shortest - 1 and all(r[length] == first[length] for r in rows):
        length += 1
    return length


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (B, T) padded on the left with pad_id, and their attention mask (0 at the padding)."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(rows):
        ids[row, length - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        mask[row, length - len(tokens):] = 1
    return ids, mask


Pick = Callable[[torch.Tensor], torch.Tensor]
"""Next tokens (B,) on the CPU from the last position's logits (B, V)."""


def decode_batch(model: Any, prompts: list[list[int]], *, stops: Collection[int], max_new_tokens: int, pad_id: int,
                 device: torch.device, pick: Pick, prefix: SharedPrefix = NO_PREFIX,
                 prefill: Callable[..., Any] | None = None) -> list[list[int]]:
    """Each prompt's answer ids, ending with its stop token when one came within max_new_tokens. The prompts (all
    starting with `prefix`'s tokens) run left-padded (B, T) behind a copy of the prefix's cache, then one token a
    step; a row that has stopped is kept (its tokens ignored) until every row has. With `prefill` (a method's
    first forward that prepends virtual tokens or prefixes: one prompt, no prefix) the prompt goes through it and
    the steps through the model as it comes. Call under torch.no_grad() with the model in eval mode."""
    ids, mask = left_padded([p[prefix.length:] for p in prompts], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = prefix.length + (mask.cumsum(-1) - 1).clamp(min=0)
    mask = prefix.masked(mask)
    cache_name = cache_keyword(model)
    keep = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}  # the prompt's last position only
    if prefill is None:
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep,
                    **prefix.copied(len(prompts)))
    else:
        out = prefill(model, ids, **keep)
    answers: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(max_new_tokens):
        tokens = pick(out.logits[:, -1])  # (B,)
        for row, token in enumerate(tokens.tolist()):
            if not done[row]:
                answers[row].append(token)
                done[row] = token in stops
        if all(done) or step == max_new_tokens - 1:  # no forward for a token nobody will read
            break
        cache = returned_cache(out)
        plain = {"attention_mask": (mask := torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)),
                 "position_ids": (positions := positions[:, -1:] + 1)} if prefill is None else {}
        out = model(input_ids=tokens[:, None].to(device), use_cache=True, **{cache_name: cache}, **plain)
    return answers


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): the argmax."""
    return logits.float().argmax(-1).cpu()


def top_p_sampler(*, temperature: float, top_p: float, generator: torch.Generator | None) -> Pick:
    """A Pick that draws each row's next token from the smallest set of its most likely tokens holding top_p of
    the mass at `temperature`, with `generator`."""

    def pick(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        sorted_probs, order = candidates(probs, top_p=top_p)
        sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs >= top_p, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)  # (B, 1)
        return order.gather(1, choice)[:, 0].cpu()

    return pick


def candidates(probs: torch.Tensor, *, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's most likely tokens in order (probs, ids), enough of them to hold top_p of every row's mass: the
    top CANDIDATES when they do (the usual case; a partial sort, several times cheaper than sorting the whole
    vocabulary at every decoding step), else the whole vocabulary sorted. Either way every token that top-p keeps
    is among them, so the draw is from the same distribution."""
    if probs.shape[-1] > CANDIDATES:
        values, order = probs.topk(CANDIDATES, dim=-1)
        if bool((values.sum(-1) >= top_p).all()):  # every token past them comes after top_p of the mass
            return values, order
    return probs.sort(dim=-1, descending=True)


def returned_cache(out: Any) -> Any:
    """The KV cache a forward returned (newer transformers name it `cache`; older ones `past_key_values`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def cache_keyword(model: Any) -> str:
    """The name this model's forward takes its cache under (transformers renamed past_key_values to cache)."""
    return "cache" if accepts(model, "cache") else "past_key_values"


def accepts(model: Any, name: str) -> bool:
    """Whether the model's forward names `name` (wrappers that only pass **kwargs are not sent it)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
