"""Batched decoding against a KV cache, sftlab's one decoder: the forgetting probe's answers (train/probe.py) and
`sftlab eval`'s, `sftlab chat` / `generate` (generate.py: a batch of one), and many prompts at once at the least
work (decode_rows: the probe's plain-forward answers, the support-agent demo's held-out answers; decode_batch where
a method's prefill takes one prompt at a time).

    prompts ──common_prefix──▶ shared prefix, run once at batch 1 (its KV cache copied along each batch)
      ──left_padded (each row's own tokens)──▶ prefill (B, T) ──pick (greedy | top-p)──▶ (B,) tokens
      ──step (B, 1) with the cache──▶ ... until every row has stopped or the batch's max_new_tokens

It is a loop over the model's own forward, never HF generate(), so methods that hook the forward decode
through the path they train through (`prefill`: a soft-prompt method's first forward, one prompt at a time).
Model-level (floor 1), so that train/ (the probe) and everything above it share one decoder.

Chat-template prompts share a long token prefix (a template's default system prompt and the user's header):
its keys and values are computed once per pass, and each batch runs only its rows' own tokens, left-padded
between the prefix and each row (the padding masked). The answers are those of whole rows to float rounding.

For the forgetting probe, decode_rows also follows given answers (`forced`) while a `watch` sees the logits
along them, and answers some prompts a second time in the same batch with another pick (`Forks`: the sampled
answers beside the greedy ones). A step writes its keys and values in place, into room made after the prefill,
and finished rows leave once they are an eighth of the batch: both spare copying the whole cache.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

CANDIDATES = 256
"""Tokens kept for a top-p draw when they hold top_p of the mass (else the whole vocabulary is sorted)."""
PRUNE_SHARE = 8
"""Finished rows leave the batch once they are 1/PRUNE_SHARE of it (or all of it): dropping rows copies the
whole cache, and until then each only costs its share of a step."""


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
Watch = Callable[[list[int], list[int], torch.Tensor, torch.Tensor], None]
"""Called at every step with the rows still answering: their prompts' indices, the position in its answer of the
token each row is about to take, their logits (n, V) and the tokens taken (n,) — what a decode of known answers
(`forced`) measures along them (the forgetting probe's log-probs)."""


@dataclass(frozen=True)
class _Rows:
    """Rows being decoded: their last position's logits (B, V), the KV cache, the attention mask over it (B, L)
    and each row's last position (B, 1) (both None after a method's prefill: its steps take neither), and the
    index of the prompt each row answers."""
    logits: torch.Tensor
    cache: Any
    mask: torch.Tensor | None
    positions: torch.Tensor | None
    rows: list[int]


def decode_batch(model: Any, prompts: list[list[int]], *, stops: Collection[int], max_new_tokens: int, pad_id: int,
                 device: torch.device, pick: Pick, prefix: SharedPrefix = NO_PREFIX,
                 prefill: Callable[..., Any] | None = None, forced: Sequence[Sequence[int]] | None = None,
                 watch: Watch | None = None) -> list[list[int]]:
    """Each prompt's answer ids, ending with its stop token when one came within max_new_tokens. The prompts (all
    starting with `prefix`'s tokens) run left-padded (B, T) behind a copy of the prefix's cache, then one token a
    step; a row that has stopped is kept (its tokens ignored) until every row has. With `prefill` (a method's
    first forward that prepends virtual tokens or prefixes: one prompt, no prefix) the prompt goes through it and
    the steps through the model as it comes. `forced` and `watch`: as decode_rows. Call under torch.no_grad() with
    the model in eval mode."""
    rows = _prefilled(model, prompts, range(len(prompts)), pad_id=pad_id, device=device, prefix=prefix,
                      prefill=prefill)
    answers = _steps(model, rows, caps=_caps([max_new_tokens] * len(prompts), forced), stops=stops, pick=pick,
                     device=device, prune=False, forced=forced, watch=watch)
    return [answers[i] for i in range(len(prompts))]


@dataclass(frozen=True)
class Forks:
    """More rows in decode_rows' batch: prompt `of[j]` answered once more, from its own prefill (its cache rows
    copied, not run again), picked by `pick`, up to `cap` tokens or a stop token — the probe's sampled answers
    beside its greedy ones. Their answers follow the prompts' in the list returned, in `of` order."""
    of: Sequence[int]
    pick: Pick
    cap: int


def decode_rows(model: Any, prompts: list[list[int]], *, caps: list[int], stops: Collection[int], pad_id: int,
                device: torch.device, pick: Pick, prefix: SharedPrefix = NO_PREFIX, prefill_rows: int = 16,
                forced: Sequence[Sequence[int]] | None = None, watch: Watch | None = None,
                forks: Forks | None = None) -> list[list[int]]:
    """Each prompt's answer ids (ending with its stop token when one came within its own cap), in prompt order,
    for many prompts at once at the least work: the prompts run shortest first in left-padded groups of
    `prefill_rows` (each padded only to its own longest), then all decode as ONE batch, so that each step (whose
    cost on a CPU is mostly per step, not per row) serves every row; a row leaves the batch when it stops or
    reaches its cap. The groups' caches are joined by left-padding them to one length (masked); a cache that
    cannot be joined (other than plain per-layer keys and values: sliding windows, quantised caches) decodes
    group by group instead. Memory: every prompt's cache at once. Call under torch.no_grad(), model in eval.

    `forced`: each prompt's answer given (a row takes its tokens instead of picking, and leaves where it ends),
    so that `watch` sees the model's logits along known answers. Given the answers this decoder picked, the same
    model computes the very same numbers: same rows, same batches, same steps, so a measure taken along them at
    the start of training is exactly the one taken while picking them (given the same `forks`: other rows in a
    batch may change a step's rounding). `forks`: more rows, see Forks; `watch` does not see them."""
    if not prompts:
        return []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    groups = [_prefilled(model, [prompts[i] for i in chosen], chosen, pad_id=pad_id, device=device, prefix=prefix)
              for chosen in (order[start:start + prefill_rows] for start in range(0, len(order), prefill_rows))]
    caps = _caps(caps, forced)
    if forks is not None:
        groups += [g for g in (_forked(group, forks, len(prompts)) for group in groups) if g is not None]
        caps = caps + [forks.cap] * len(forks.of)
    joined = _joined(groups)
    answers: dict[int, list[int]] = {}
    for rows in [joined] if joined is not None else groups:
        answers.update(_steps(model, rows, caps=caps, stops=stops, pick=pick, device=device, prune=True,
                              forced=forced, watch=watch, forks=None if forks is None else (len(prompts), forks.pick)))
    return [answers[i] for i in range(len(caps))]


def _forked(group: _Rows, forks: Forks, first: int) -> _Rows | None:
    """The forks of this group's prompts as rows of their own (indices first + j): a copy of the group's cache
    rows, last logits, mask and positions; None when none of its prompts is forked."""
    chosen = [(group.rows.index(i), first + j) for j, i in enumerate(forks.of) if i in group.rows]
    if not chosen:
        return None
    index = torch.tensor([at for at, _ in chosen], device=group.logits.device)
    cache = copy.deepcopy(group.cache)
    cache.batch_select_indices(index)
    return _Rows(group.logits[index], cache, None if group.mask is None else group.mask[index],
                 None if group.positions is None else group.positions[index], [j for _, j in chosen])


def _caps(caps: list[int], forced: Sequence[Sequence[int]] | None) -> list[int]:
    """Each row's cap: its forced answer's length when answers are given."""
    if forced is None:
        return caps
    if len(forced) != len(caps):
        raise ValueError(f"{len(forced)} forced answers for {len(caps)} prompts")
    return [len(answer) for answer in forced]


def _prefilled(model: Any, prompts: list[list[int]], rows: Sequence[int], *, pad_id: int, device: torch.device,
               prefix: SharedPrefix, prefill: Callable[..., Any] | None = None) -> _Rows:
    """The prompts' first forward: left-padded behind a copy of the prefix's cache (or through `prefill`)."""
    ids, mask = left_padded([p[prefix.length:] for p in prompts], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = prefix.length + (mask.cumsum(-1) - 1).clamp(min=0)
    mask = prefix.masked(mask)
    keep = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}  # the prompt's last position only
    if prefill is not None:
        out = prefill(model, ids, **keep)
        return _Rows(out.logits[:, -1], returned_cache(out), None, None, list(rows))
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep,
                **prefix.copied(len(prompts)))
    return _Rows(out.logits[:, -1], returned_cache(out), mask, positions[:, -1:], list(rows))


def _steps(model: Any, rows: _Rows, *, caps: list[int], stops: Collection[int], pick: Pick, device: torch.device,
           prune: bool, forced: Sequence[Sequence[int]] | None = None, watch: Watch | None = None,
           forks: tuple[int, Pick] | None = None) -> dict[int, list[int]]:
    """The rows decoded one token a step until each has stopped or reached its cap (prompt index -> answer).
    `prune`: a finished row leaves the batch (its cache rows dropped); else it stays, its tokens ignored.
    `forced`: the rows take these answers' tokens instead of picking; `watch`: sees each step's answering rows.
    `forks` (first, pick): rows numbered from `first` on are forks, picked by their own pick, never forced or
    watched."""
    first = forks[0] if forks is not None else None
    answers: dict[int, list[int]] = {i: [] for i in rows.rows}
    done = {i: caps[i] <= 0 for i in rows.rows}
    cache_name = cache_keyword(model)
    _make_room(rows.cache, max((caps[i] for i in rows.rows), default=0))
    while not all(done[i] for i in rows.rows):
        tokens = _picked(rows, answers, pick, forced, forks)  # (B,)
        if watch is not None:
            _watched(watch, rows, answers, done, first, tokens)
        for i, token in zip(rows.rows, tokens.tolist()):
            if not done[i]:
                answers[i].append(token)
                picked = forced is None or (first is not None and i >= first)
                done[i] = (picked and token in stops) or len(answers[i]) >= caps[i]
        live = [r for r, i in enumerate(rows.rows) if not done[i]]
        if not live:  # no forward for a token nobody will read
            break
        if prune and (len(rows.rows) - len(live)) * PRUNE_SHARE >= len(rows.rows):
            rows, tokens = _selected(rows, live, device), tokens[live]
        mask = positions = None
        if rows.mask is not None:
            mask = torch.cat([rows.mask, rows.mask.new_ones(len(rows.rows), 1)], dim=1)
            positions = rows.positions + 1
        plain = {"attention_mask": mask, "position_ids": positions} if mask is not None else {}
        out = model(input_ids=tokens[:, None].to(device), use_cache=True, **{cache_name: rows.cache}, **plain)
        rows = _Rows(out.logits[:, -1], returned_cache(out), mask, positions, rows.rows)
    return answers


def _watched(watch: Watch, rows: _Rows, answers: dict[int, list[int]], done: dict[int, bool], first: int | None,
             tokens: torch.Tensor) -> None:
    """`watch` called with the rows still answering (forks, numbered from `first` on, left out)."""
    answering = [r for r, i in enumerate(rows.rows) if not done[i] and (first is None or i < first)]
    if answering:
        index = torch.tensor(answering, dtype=torch.long, device=rows.logits.device)
        watch([rows.rows[r] for r in answering], [len(answers[rows.rows[r]]) for r in answering],
              rows.logits.index_select(0, index), tokens[answering])


def _picked(rows: _Rows, answers: dict[int, list[int]], pick: Pick, forced: Sequence[Sequence[int]] | None,
            forks: tuple[int, Pick] | None) -> torch.Tensor:
    """Each row's next token (B,): picked from its logits, or its forced answer's next token (a finished row, kept
    when not pruned, takes its last token again: nobody reads it); forks by their own pick."""
    def given(i: int) -> int:
        return forced[i][min(len(answers[i]), len(forced[i]) - 1)] if forced[i] else 0

    if forks is None:
        if forced is None:
            return pick(rows.logits)
        return torch.tensor([given(i) for i in rows.rows], dtype=torch.long)
    first, fork_pick = forks
    tokens = torch.zeros(len(rows.rows), dtype=torch.long)
    main = [r for r, i in enumerate(rows.rows) if i < first]
    side = [r for r, i in enumerate(rows.rows) if i >= first]
    if main:
        tokens[main] = (pick(rows.logits[main]) if forced is None
                        else torch.tensor([given(rows.rows[r]) for r in main], dtype=torch.long))
    if side:
        tokens[side] = fork_pick(rows.logits[side])
    return tokens


def _make_room(cache: Any, steps: int) -> None:
    """Each plain layer of the cache (DynamicLayer: keys and values grown by concatenation, the whole cache copied
    at every step) turned into a _RoomyLayer with room for `steps` more positions, written in place."""
    from transformers.cache_utils import DynamicLayer

    for layer in getattr(cache, "layers", ()):
        if type(layer) is DynamicLayer and layer.get_seq_length() > 0 and steps > 0:
            layer.__class__ = _roomy_layer()
            layer.make_room(steps)


@functools.cache
def _roomy_layer() -> type:
    """The _RoomyLayer class (made once, on first use: transformers is imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class _RoomyLayer(DynamicLayer):
        """A DynamicLayer whose keys and values are views of longer buffers: a step's token is written in place
        (the numbers are a DynamicLayer's; only the copying is saved); past the room it concatenates again."""

        def make_room(self, steps: int) -> None:
            self._length = self.keys.shape[-2]
            self._buffers = [torch.nn.functional.pad(t, (0, 0, 0, steps)) for t in (self.keys, self.values)]
            self._view()

        def _view(self) -> None:
            self.keys, self.values = (b[..., :self._length, :] for b in self._buffers)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            end = self._length + key_states.shape[-2]
            if end > self._buffers[0].shape[-2] or self.keys.shape[-2] != self._length:  # out of room, or cropped
                self.__class__ = DynamicLayer
                return DynamicLayer.update(self, key_states, value_states, *args, **kwargs)
            for buffer, states in zip(self._buffers, (key_states, value_states)):
                buffer[..., self._length:end, :] = states
            self._length = end
            self._view()
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._buffers = [b[indices, ...] for b in self._buffers]
            self._view()

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._buffers = [b.repeat_interleave(repeats, dim=0) for b in self._buffers]
            self._view()

    return _RoomyLayer


def _selected(rows: _Rows, live: list[int], device: torch.device) -> _Rows:
    """The rows at batch positions `live` (the cache's rows selected in place)."""
    index = torch.tensor(live, device=device)
    rows.cache.batch_select_indices(index)
    return _Rows(rows.logits[index], rows.cache, None if rows.mask is None else rows.mask[index],
                 None if rows.positions is None else rows.positions[index], [rows.rows[r] for r in live])


def _joined(groups: list[_Rows]) -> _Rows | None:
    """The groups as one batch: each layer's keys and values (B, H, L, D) and the masks (B, L) left-padded to the
    longest group's L (the padding masked) and stacked; None when a cache holds anything else than plain
    per-layer keys and values."""
    from transformers.cache_utils import DynamicLayer

    if len(groups) == 1:
        return groups[0]
    if any(g.mask is None or not all(type(layer) is DynamicLayer and layer.get_seq_length() == g.mask.shape[1]
                                     for layer in getattr(g.cache, "layers", [None])) for g in groups):
        return None
    width = max(g.mask.shape[1] for g in groups)
    cache = groups[0].cache
    for j, layer in enumerate(cache.layers):
        for name in ("keys", "values"):
            setattr(layer, name, torch.cat([torch.nn.functional.pad(getattr(g.cache.layers[j], name),
                                                                    (0, 0, width - g.mask.shape[1], 0))
                                            for g in groups]))
    mask = torch.cat([torch.nn.functional.pad(g.mask, (width - g.mask.shape[1], 0)) for g in groups])
    return _Rows(torch.cat([g.logits for g in groups]), cache, mask, torch.cat([g.positions for g in groups]),
                 [i for g in groups for i in g.rows])


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
