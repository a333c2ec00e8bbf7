"""Trainable embedding rows for chosen token ids: the tokens the data step added to the vocabulary.

A base model never saw the tokens a chat template adds (`<|im_start|>`, `<|im_end|>`): their rows are the
random ones `resize_token_embeddings` made, and LoRA on the linear layers cannot fix them. These wrappers
give exactly those rows their own fp32 parameter, while every other row is the frozen base row, bit for bit:

- `EmbeddingRows` wraps the input embedding: a position holding one of the ids reads `rows` (n, H) instead
  of the base weight.
- `HeadRows` wraps the output head: the logits of the ids come from `rows` (n, H) (and the base bias). A
  head tied to the embedding shares the embedding's `rows` Parameter, so the tie holds while training.

The values are those of HF PEFT's `trainable_token_indices` (TrainableTokensLayer stores the rows
themselves, not differences); export.py translates the names.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sftlab.errors import SftlabError
from sftlab.models.swap import swap_module


class TokenRows(nn.Module):
    """A frozen layer `base` whose weight rows `token_ids` are replaced by the Parameter `rows`."""

    def __init__(self, base: nn.Module, token_ids: Sequence[int], *, rows: nn.Parameter | None = None) -> None:
        super().__init__()
        weight = base.weight  # (V, H) for an embedding and for a linear head alike
        self.base = base
        self.register_buffer("token_ids", torch.tensor(sorted(token_ids), dtype=torch.long, device=weight.device),
                             persistent=False)
        if rows is None:
            # Trained in fp32 even over a bf16/fp16 base, as LoRA's matrices; start from the current rows.
            dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
            rows = nn.Parameter(weight.detach()[self.token_ids].to(dtype).clone())
        self.rows = rows

    @property
    def weight(self) -> torch.Tensor:
        """The weight the layer computes with (a new tensor): the base weight with `rows` in place."""
        base = self.base.weight
        return base.index_copy(0, self.token_ids, self.rows.to(base.dtype))

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """Write `rows` into the base weight and return the base layer (which then needs no wrapper)."""
        base = self.base.weight
        base.index_copy_(0, self.token_ids, self.rows.to(base.dtype))
        return self.base


class EmbeddingRows(TokenRows):
    def __init__(self, base: nn.Module, token_ids: Sequence[int]) -> None:
        super().__init__(base, token_ids)
        # slot[token id] = its row in `rows`, or -1 for a token whose row is the base's: (V,)
        slot = torch.full((base.weight.shape[0],), -1, dtype=torch.long, device=base.weight.device)
        slot[self.token_ids] = torch.arange(len(self.token_ids), device=slot.device)
        self.register_buffer("slot", slot, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)  # (B, T, H)
        slot = self.slot[input_ids]  # (B, T)
        new = F.embedding(slot.clamp(min=0), self.rows).to(out.dtype)  # (B, T, H)
        scale = getattr(self.base, "embed_scale", None)  # Gemma's scaled embedding multiplies in forward
        if scale is not None:
            new = new * torch.as_tensor(scale).to(out.dtype)
        return torch.where((slot >= 0).unsqueeze(-1), new, out)


class HeadRows(TokenRows):
    def __init__(self, base: nn.Module, token_ids: Sequence[int], *, tied_rows: nn.Parameter | None = None) -> None:
        super().__init__(base, token_ids, rows=tied_rows)
        self.tied = tied_rows is not None
        """True when `rows` is the input embedding's Parameter (a tied head): it is listed only there."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base(hidden)  # (..., V)
        bias = getattr(self.base, "bias", None)
        bias = None if bias is None else bias[self.token_ids].to(self.rows.dtype)
        new = F.linear(hidden.to(self.rows.dtype), self.rows, bias)  # (..., n)
        return logits.index_copy(-1, self.token_ids, new.to(logits.dtype))


def add_token_rows(model: nn.Module, token_ids: Sequence[int]) -> None:
    """Wrap the model's input embedding and output head so that the rows of `token_ids` train (the head
    shares the embedding's rows when their weights are tied). The wrappers' base layers stay frozen."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    ids = sorted(set(token_ids))
    if not ids:
        return
    vocab = embedding.weight.shape[0]
    if ids[0] < 0 or ids[-1] >= vocab:
        raise SftlabError(f"token ids {ids[0]}..{ids[-1]} should train, but the model's embedding has {vocab} rows; "
                          "resize the embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer))).")
    if head is not None and (head.weight.dim() != 2 or head.weight.shape[0] != vocab):
        raise SftlabError(f"the output head {type(head).__name__} has a weight of shape {tuple(head.weight.shape)}; "
                          f"trainable token rows need a (vocab={vocab}, hidden) head.")
    rows = EmbeddingRows(embedding, ids)
    _replace(model, embedding, rows)
    if head is not None:
        tied = head.weight is embedding.weight
        _replace(model, head, HeadRows(head, ids, tied_rows=rows.rows if tied else None))


def token_rows_modules(model: nn.Module) -> dict[str, TokenRows]:
    return {name: m for name, m in model.named_modules() if isinstance(m, TokenRows)}


def token_rows_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """`<module>.rows` of each wrapper; a tied head's rows are the embedding's and are listed only there."""
    return {f"{name}.rows": module.rows for name, module in token_rows_modules(model).items()
            if not (isinstance(module, HeadRows) and module.tied)}


def merge_token_rows(model: nn.Module) -> None:
    """Write the trained rows into the base weights and put the plain base layers back in place."""
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, TokenRows):
            swap_module(model, name, module.merged_base())


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` wherever `old` is registered (a shared embedding may sit in several places)."""
    places = [name for name, module in model.named_modules(remove_duplicate=False) if module is old]
    for name in places:
        swap_module(model, name, new)
