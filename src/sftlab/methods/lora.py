"""LoRA: h = W0·x + s·B·A·x with W0 frozen, A (rank × in) random, B (out × rank) zero, s = alpha / rank.

`LoRALinear` wraps the frozen base layer (nn.Linear, or GPT-2's Conv1D whose weight is stored transposed)
and adds the low-rank path; it works on every HF architecture without forking model classes.
With `trainable_token_ids` (tokens the data step added), those embedding and output-head rows train too
(`token_rows.py`); all other rows stay the base's. With `lora.dora` the wrapper is `DoRALinear`, which adds a
trained magnitude per output row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sftlab.errors import ConfigError, SftlabError
from sftlab.methods.base import Method
from sftlab.methods.token_rows import add_token_rows, merge_token_rows, token_rows_modules, token_rows_parameters
from sftlab.models.swap import swap_module
from sftlab.models.targets import find_targets

_HALF = (torch.bfloat16, torch.float16)


class LoRALinear(nn.Module):
    """merge()/unmerge() add and subtract s·B·A in the base weight's dtype: exact to fp32 rounding on an
    fp32 base; on a bf16 base W0 comes back only to bf16 precision (about 1e-3 relative)."""

    def __init__(self, base: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False) -> None:
        super().__init__()
        self.base = base
        self.transposed = type(base).__name__ == "Conv1D"  # weight (in, out) instead of (out, in)
        weight = base.weight
        out_features, in_features = weight.shape[::-1] if self.transposed else weight.shape
        # Adapters train in fp32 even over a bf16/fp16 base: optimizer updates to small matrices need it.
        dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
        self.A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=weight.device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.rank = rank
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        # x (..., in) -> (..., rank) -> (..., out): two thin matmuls, never the (out, in) product. The
        # scaling multiplies the thin (..., rank) tensor, and the second matmul accumulates straight into the
        # base output (addmm): no extra pass over the wide (..., out) tensor, forward or backward.
        if self._in_base_dtype(x, out):
            # A bf16/fp16 base (a GPU's, or QLoRA's compute dtype there): both products run in the base's dtype
            # from the fp32 adapter cast down, as autocast's mixed precision does (fp32 accumulation inside the
            # matmuls; A and B keep fp32 values and gradients). Casting x up instead copies every (tokens, in)
            # input to fp32, keeps the copy for the backward and sends the (tokens, out) update through fp32:
            # on an H200 that made a LoRA step slower than a full fine-tuning step (README, GPU rows).
            low = F.linear(self.dropout(x), self.A.to(x.dtype)) * self.scaling
            return torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, low.shape[-1]),
                               self.B.to(out.dtype).t()).view(out.shape)
        low = F.linear(self.dropout(x).to(self.A.dtype), self.A) * self.scaling  # (..., rank)
        if out.dtype != low.dtype:  # a bf16/NF4 base: the fp32 update is added in the base's dtype
            return out + F.linear(low, self.B).to(out.dtype)
        return torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, low.shape[-1]), self.B.t()).view(out.shape)

    def _in_base_dtype(self, x: torch.Tensor, out: torch.Tensor) -> bool:
        """Whether the update runs in the base's half dtype (a bf16/fp16 base under fp32 adapters)."""
        return x.dtype == out.dtype and out.dtype in _HALF and self.A.dtype != out.dtype

    def delta_weight(self) -> torch.Tensor:
        """s·B·A in the base weight's layout."""
        delta = (self.B @ self.A) * self.scaling  # (out, in)
        return delta.t() if self.transposed else delta

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            weight = self.base.weight
            weight.copy_((weight.to(self.A.dtype) + self.delta_weight()).to(weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            weight = self.base.weight
            weight.copy_((weight.to(self.A.dtype) - self.delta_weight()).to(weight.dtype))
            self.merged = False


class DoRALinear(LoRALinear):
    """DoRA (Liu et al. 2024, arXiv:2402.09353): h = m ⊙ (W0 + ΔW)·x / ‖W0 + ΔW‖ + b, with ΔW = s·B·A.

    The magnitude m (out,) trains with A and B and starts at ‖W0‖ (B = 0), so the output is the base's at
    init; ‖·‖ is the norm of each output row over the in dim. As the paper (§4.3) recommends and HF PEFT does
    (`peft/tuners/lora/dora.py`, DoraLinearLayer.forward; checked against PEFT 0.21), the norm is a constant
    for autograd: it tracks ΔW in the forward but passes no gradient. The forward is PEFT's, so logits and
    gradients match it:

        out = base(x) + (m/n − 1)·W0·x' + (m/n)·s·B·A·x',    n = ‖W0 + s·B·A‖ (detached)

    where x' = dropout(x). Without active dropout (eval, or dropout 0), W0·x' = base(x) − b; with it,
    W0·x' = F.linear(x', W0), so the base term keeps the undropped input and only the DoRA correction sees the
    dropped one. The (out, in) matrix W0 + s·B·A is formed on every forward to take its norm.

    merge() writes (m/n)·(W0 + s·B·A) into the base weight (bias unchanged) and keeps m/n; unmerge() inverts it,
    W0 = W/(m/n) − s·B·A (as PEFT does). On an fp32 base W0 comes back to fp32 rounding (about 1e-7 relative;
    worse for a row whose m is near 0); on a bf16 base to bf16 precision.
    """

    def __init__(self, base: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False) -> None:
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora)
        self.magnitude = nn.Parameter(self.weight_norm())  # (out,) = ‖W0‖ per row, as B = 0
        self.register_buffer("merge_factor", None, persistent=False)  # m/n while merged, (out,)

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W0 (or the merged weight) as (out, in), in `dtype` (default: the adapter's); dequantised under QLoRA
        (QDoRA)."""
        weight = self.base.weight
        return (weight.t() if self._base_is_conv1d() else weight).to(dtype or self.A.dtype)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """n = ‖W0 + s·B·A‖ per output row, (out,); computed without autograd: DoRA treats it as a constant."""
        return torch.linalg.vector_norm(self.base_weight() + self.scaling * (self.B @ self.A), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        if self._in_base_dtype(x, out):
            return self._half_forward(x, out)
        x = x.to(self.A.dtype)
        scale = self.magnitude / self.weight_norm()  # (out,) broadcasts over (..., out)
        if self.training and isinstance(self.dropout, nn.Dropout):
            x = self.dropout(x)
            base_out = F.linear(x, self.base_weight())  # W0·x', no bias
        else:
            bias = self.base.bias
            base_out = out.to(x.dtype) if bias is None else out.to(x.dtype) - bias.to(x.dtype)
        lora_out = F.linear(F.linear(x, self.A), self.B)  # (..., out)
        update = (scale - 1) * base_out + scale * lora_out * self.scaling
        return out + update.to(out.dtype)

    def _half_forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The same forward over a bf16/fp16 base, its activations in the base's dtype (as LoRALinear's): the
        (out,) factors m/n − 1 and (m/n)·s are formed in fp32 (m/n is close to 1: its difference from 1 would
        not survive bf16) and cast down with A and B; no activation-sized fp32 tensor is made or kept."""
        scale = self.magnitude / self.weight_norm()
        shift, gain = (scale - 1).to(out.dtype), (scale * self.scaling).to(out.dtype)
        if self.training and isinstance(self.dropout, nn.Dropout):
            x = self.dropout(x)
            base_out = F.linear(x, self.base_weight(x.dtype))
        else:
            bias = self.base.bias
            base_out = out if bias is None else out - bias.to(out.dtype)
        lora_out = F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype))
        return out + shift * base_out + gain * lora_out

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            factor = self.magnitude / self.weight_norm()
            self._write_base_weight(factor[:, None] * (self.base_weight() + self.scaling * (self.B @ self.A)))
            self.merge_factor = factor
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._write_base_weight(self.base_weight() / self.merge_factor[:, None] - self.scaling * (self.B @ self.A))
            self.merge_factor = None
            self.merged = False

    def _write_base_weight(self, weight: torch.Tensor) -> None:
        """Copy an (out, in) weight into the base layer, in its layout and dtype."""
        base = self.base.weight
        base.copy_((weight.t() if self._base_is_conv1d() else weight).to(base.dtype))

    def _base_is_conv1d(self) -> bool:
        """Whether the base layer now stores its weight (in, out). Not `transposed` (the wrapped layer's
        layout, which the export needs): QLoRA's NF4Linear holds (out, in) even in place of a Conv1D."""
        return type(self.base).__name__ == "Conv1D"


def check_rank(model: nn.Module, names: list[str], rank: int) -> None:
    """lora.rank may not exceed the narrowest targeted layer's width: B·A has at most min(in, out)
    independent directions, so a larger rank only adds parameters that cannot learn anything new."""
    widths = {name: _features(model.get_submodule(name)) for name in names}
    name = min(widths, key=lambda n: min(widths[n]))
    out_features, in_features = widths[name]
    if rank > min(out_features, in_features):
        raise ConfigError(f"lora.rank={rank} is larger than the layer {name} ({in_features} in, {out_features} out "
                          f"features): its update can have rank {min(out_features, in_features)} at most. Set "
                          f"lora.rank to {min(out_features, in_features)} or less, or leave that layer out of "
                          "lora.targets.")


def _features(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer, from its weight's shape (GPT-2's Conv1D stores it transposed)."""
    out_features, in_features = layer.weight.shape
    return (in_features, out_features) if type(layer).__name__ == "Conv1D" else (out_features, in_features)


class LoRA(Method):
    name = "lora"
    sections = ("lora",)
    mergeable = True
    export_format = "peft_lora"
    smaller_sibling = "qlora"

    def check_layers(self, model: nn.Module) -> None:
        check_rank(model, find_targets(model, self.config.lora.targets), self.config.lora.rank)

    def apply(self, model: nn.Module) -> None:
        lora = self.config.lora
        if lora_modules(model) or token_rows_modules(model):
            raise SftlabError("LoRA is already applied to this model; load a fresh base model (or merge first).")
        names = find_targets(model, lora.targets)
        check_rank(model, names, lora.rank)
        for param in model.parameters():
            param.requires_grad_(False)
        for name in names:
            wrapper = DoRALinear if lora.dora else LoRALinear
            swap_module(model, name, wrapper(model.get_submodule(name), rank=lora.rank, alpha=lora.alpha,
                                             dropout=lora.dropout, rslora=lora.rslora))
        if self.trainable_token_ids:  # after the targets: the head is never a LoRA target
            add_token_rows(model, self.trainable_token_ids)

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        lora = {f"{name}.{p_name}": p
                for name, module in model.named_modules() if isinstance(module, LoRALinear)
                for p_name, p in module.named_parameters(recurse=False)}  # A, B (+ DoRA's magnitude)
        return {**lora, **token_rows_parameters(model)}

    def wrapped_modules(self, model: nn.Module) -> list[nn.Module]:
        return [*lora_modules(model).values(), *super().wrapped_modules(model)]

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold every adapter (and trained token rows) into its base weight and put the plain base layer
        back in its place."""
        for name, module in list(model.named_modules()):
            if isinstance(module, LoRALinear):
                module.merge()
                swap_module(model, name, module.base)
        merge_token_rows(model)
        return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
