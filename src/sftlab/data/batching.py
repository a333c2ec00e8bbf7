"""Examples -> Batch tensors: right-padded rows, or one padding-free packed row (`collate_packed`), in which
examples that begin like another (a shared system prompt) may read that one's copy of the beginning instead of
carrying their own (`share_prefixes`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from sftlab.data.encode import IGNORE_INDEX, Example


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor              # (B, T)
    labels: torch.Tensor                 # (B, T), IGNORE_INDEX at padding and untrained tokens
    attention_mask: torch.Tensor | None  # (B, T), 0 at padding; None for a packed row (no padding)
    position_ids: torch.Tensor           # (B, T); in a packed row they restart at 0 for each example
    loss_index: torch.Tensor             # (N,) flat indices into B*T of supervised hidden positions
    loss_targets: torch.Tensor           # (N,) the token each of them predicts
    where: tuple[str, ...] = ()
    cu_seqlens: torch.Tensor | None = None
    """Packed rows only: (examples + 1,) int32 boundaries, example i spans [cu[i], cu[i+1]) of the row."""
    max_seqlen: int = 0
    """Packed rows only: the longest example's length."""
    shared: tuple[tuple[int, int], ...] = ()
    """Packed rows with shared prefixes only: per example (start, length): its first `length` tokens are not
    in the row; its tokens attend to the row's [start, start + length) instead, another example's identical
    beginning (length 0: none). Empty when no example shares."""

    @property
    def num_supervised(self) -> int:
        return int(self.loss_index.numel())

    @property
    def num_tokens(self) -> int:
        """The examples' tokens, shared beginnings included (what the batch trains on; `computed_tokens`: what
        the decoder runs)."""
        return self.computed_tokens + self.shared_tokens

    @property
    def computed_tokens(self) -> int:
        return int(self.input_ids.numel()) if self.attention_mask is None else int(self.attention_mask.sum())

    @property
    def shared_tokens(self) -> int:
        """Tokens of the examples that are read from another example's identical beginning, not run again."""
        return sum(length for _, length in self.shared)

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def model_inputs(self) -> dict[str, object]:
        """Keyword arguments of the decoder's forward. A packed row passes its example boundaries under the
        names transformers' varlen attention reads (flash-attention kernels, and sftlab's own packed attention)."""
        if self.cu_seqlens is None:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                    "position_ids": self.position_ids}
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids,
                  "cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                  "max_length_q": self.max_seqlen, "max_length_k": self.max_seqlen}
        if self.shared:  # read by sftlab's packed attention only: see collate_packed
            inputs[SHARED_PREFIXES] = self.shared
        return inputs

    def to(self, device: torch.device | str) -> Batch:
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=True)
                 for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)


def collate(examples: Sequence[Example], *, pad_id: int) -> Batch:
    from sftlab.data.shift import supervised_positions

    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    index, targets = supervised_positions(labels)
    return Batch(input_ids, labels, attention_mask, position_ids, index, targets,
                 tuple(e.where for e in examples))


def collate_packed(examples: Sequence[Example], *, share_prefixes: bool = False) -> Batch:
    """All examples side by side in one (1, T) row, T = their total length: no padding at all.

    Positions restart at 0 with each example, and the label of each example's first token is ignored, so no
    example's last token is trained to predict the next example's first — as unpacked, where a first token
    is never a target. Attention is kept inside each example by the packed attention (models/attention.py).

    With `share_prefixes`, an example whose first tokens (at least MIN_SHARED_PREFIX of them) equal an earlier
    example's in the row, and are none of them trained, leaves them out: its remaining tokens keep their
    positions and attend to the earlier example's copy (`Batch.shared`). In a causal model a token's keys and
    values depend only on the tokens before it, so the copy's are the ones the example would compute itself,
    and the loss and its gradients are those of the unshared row (up to floating-point reassociation). Only
    untrained tokens are shared, and never the one that predicts the first trained token: every supervised
    position stays in the row. A system prompt repeated on every conversation then runs once per row.
    """
    from sftlab.data.shift import supervised_positions

    cuts = _shared_prefixes(examples) if share_prefixes else [(0, 0)] * len(examples)
    kept = [e.input_ids[length:] for e, (_, length) in zip(examples, cuts)]
    lengths = [len(ids) for ids in kept]
    input_ids = torch.tensor([t for ids in kept for t in ids], dtype=torch.long).unsqueeze(0)
    labels = torch.tensor([t for e, (_, length) in zip(examples, cuts) for t in e.labels[length:]],
                          dtype=torch.long).unsqueeze(0)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    labels[0, bounds[:-1]] = IGNORE_INDEX
    offsets = np.repeat(np.array([length for _, length in cuts]) - bounds[:-1], lengths)
    position_ids = torch.from_numpy(np.arange(bounds[-1]) + offsets).unsqueeze(0)
    index, targets = supervised_positions(labels)
    shared = tuple((int(bounds[source]), length) for source, length in cuts) if any(n for _, n in cuts) else ()
    return Batch(input_ids, labels, None, position_ids, index, targets, tuple(e.where for e in examples),
                 cu_seqlens=torch.from_numpy(bounds.astype(np.int32)), max_seqlen=max(lengths), shared=shared)


SHARED_PREFIXES = "sftlab_shared_prefixes"
"""The keyword argument that carries `Batch.shared` to the attention layers (models/attention.py)."""

MIN_SHARED_PREFIX = 8
"""Fewer identical first tokens than this are not worth a masked attention call: such an example runs whole."""


def _shared_prefixes(examples: Sequence[Example]) -> list[tuple[int, int]]:
    """Per example, (the index of the earlier example whose beginning it reads, how many tokens); (0, 0) for
    an example that runs whole. Candidates are the examples that run whole, keyed by their first tokens."""
    roots: dict[tuple[int, ...], list[int]] = {}
    arrays = [np.asarray(e.input_ids) for e in examples]
    cuts = []
    for i, (example, ids) in enumerate(zip(examples, arrays)):
        key = tuple(example.input_ids[:MIN_SHARED_PREFIX])
        limit = _first_trained(example.labels) - 1  # positions [0, limit) predict no trained label; >= 1 token kept
        best = (0, 0)
        if limit >= MIN_SHARED_PREFIX:
            for root in roots.get(key, ()):
                other = arrays[root]
                n = min(limit, len(other))
                same = int(np.argmin(np.append(ids[:n] == other[:n], False)))  # length of the common prefix
                if same > best[1]:
                    best = (root, same)
        if best[1] < MIN_SHARED_PREFIX:
            best = (0, 0)
            if len(key) == MIN_SHARED_PREFIX:
                roots.setdefault(key, []).append(i)
        cuts.append(best)
    return cuts


def _first_trained(labels: Sequence[int]) -> int:
    """The smallest t >= 1 whose label is trained (predicted from position t - 1), len(labels) if none. Tokens
    [0, t - 1) may be shared: their positions predict labels 1..t-1, none trained, and position t - 1 stays."""
    trained = np.flatnonzero(np.asarray(labels[1:]) != IGNORE_INDEX)
    return int(trained[0]) + 1 if len(trained) else len(labels)
