"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): out + W_up·act(W_down·out) + biases.

Placement. Each decoder layer (the entries of the decoder's layer list: `model.layers` in Llama / Qwen2,
`transformer.h` in GPT-2) has an attention block and an MLP block whose outputs are added back onto the
residual stream. `BottleneckAdapter` wraps such a block and passes its output tensor through the adapter
before the layer adds it back:
- `houlsby`: the attention block and the MLP block of every layer (Llama / Qwen2: `layers.N.self_attn`
  and `layers.N.mlp`; GPT-2: `h.N.attn` and `h.N.mlp`);
- `pfeiffer`: the MLP block of every layer only.
The attention child is the first of ATTENTION_NAMES, the MLP child the first of MLP_NAMES a layer has. An
attention block returns a tuple (output, weights, ...): only its first element goes through the adapter.

W_up and its bias start at zero, so a freshly applied adapter leaves the model's output unchanged. The
non-linearity between the projections is why an adapter cannot be merged into the base weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sftlab.errors import SftlabError
from sftlab.methods.base import MergeError, Method
from sftlab.methods.token_rows import add_token_rows, token_rows_modules, token_rows_parameters
from sftlab.models.swap import swap_module

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
"""Child names of a decoder layer's attention block (Llama/Qwen2/Mistral/Gemma, GPT-2/GPT-J, ...)."""
MLP_NAMES = ("mlp", "feed_forward", "ffn")
"""Child names of a decoder layer's MLP block."""
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}

MERGE_REFUSAL = ("a bottleneck adapter cannot be merged: the non-linearity ({activation}) between its down and "
                 "up projections means W_up·act(W_down·h) is not a matrix that can fold into a frozen weight, "
                 "so the adapter must stay attached. Its export (the run's adapter/ dir) is the deliverable: "
                 "`sftlab generate` and `sftlab chat` load the run dir with the adapter attached.")


class BottleneckAdapter(nn.Module):
    """A frozen block `base` whose output h becomes h + W_up·dropout(act(W_down·h + b_down)) + b_up."""

    def __init__(self, base: nn.Module, *, hidden_size: int, bottleneck_dim: int, activation: str,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        reference = next(base.parameters())
        # Adapters train in fp32 even over a bf16/fp16 base, as LoRA's matrices do.
        dtype = reference.dtype if reference.dtype == torch.float64 else torch.float32
        self.adapter_down = nn.Linear(hidden_size, bottleneck_dim, dtype=dtype, device=reference.device)
        self.adapter_up = nn.Linear(bottleneck_dim, hidden_size, dtype=dtype, device=reference.device)
        nn.init.zeros_(self.adapter_up.weight)  # identity at init: the residual branch adds exactly 0
        nn.init.zeros_(self.adapter_up.bias)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.activation = activation
        self.bottleneck_dim = bottleneck_dim

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # The base block's own signature (attention takes masks, positions, caches...) passes through
        # untouched: a wrapper that named them would tie sftlab to one transformers release.
        out = self.base(*args, **kwargs)
        if isinstance(out, tuple):  # attention: (output (B, T, H), weights, ...)
            return (self.adapt(out[0]), *out[1:])
        return self.adapt(out)

    def adapt(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, H) -> hidden + up(dropout(act(down(hidden)))), in the adapter's dtype."""
        update = self.adapter_up(self.dropout(self.act(self.adapter_down(hidden.to(self.adapter_down.weight.dtype)))))
        return hidden + update.to(hidden.dtype)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """`adapter_down.weight`, `adapter_down.bias`, `adapter_up.weight`, `adapter_up.bias`."""
        return {f"{child}.{p_name}": p for child in ("adapter_down", "adapter_up")
                for p_name, p in getattr(self, child).named_parameters()}

    def __getattr__(self, name: str) -> Any:
        # Model code may read attributes of the block it called (e.g. `self_attn.layer_idx`): the
        # wrapper answers with the base block's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)


class Bottleneck(Method):
    name = "adapter"
    sections = ("adapter",)
    mergeable = False
    export_format = "bottleneck"

    def apply(self, model: nn.Module) -> None:
        adapter = self.config.adapter
        if bottleneck_modules(model) or token_rows_modules(model):
            raise SftlabError("bottleneck adapters are already applied to this model; load a fresh base model.")
        for param in model.parameters():
            param.requires_grad_(False)
        hidden_size = model.config.get_text_config().hidden_size
        for name in adapter_targets(model, adapter.placement):
            swap_module(model, name, BottleneckAdapter(model.get_submodule(name), hidden_size=hidden_size,
                                                       bottleneck_dim=adapter.bottleneck_dim,
                                                       activation=adapter.activation, dropout=adapter.dropout))
        if self.trainable_token_ids:
            add_token_rows(model, self.trainable_token_ids)

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        adapters = {f"{name}.{p_name}": p for name, module in bottleneck_modules(model).items()
                    for p_name, p in module.adapter_parameters().items()}
        return {**adapters, **token_rows_parameters(model)}

    def wrapped_modules(self, model: nn.Module) -> list[nn.Module]:
        return [*bottleneck_modules(model).values(), *super().wrapped_modules(model)]

    def merge(self, model: nn.Module) -> nn.Module:
        raise MergeError(MERGE_REFUSAL.format(activation=self.config.adapter.activation))


def bottleneck_modules(model: nn.Module) -> dict[str, BottleneckAdapter]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BottleneckAdapter)}


def adapter_targets(model: nn.Module, placement: str) -> list[str]:
    """Full names of the blocks an adapter wraps: per decoder layer its attention block (houlsby only)
    and its MLP block, in layer order."""
    layers_name, layers = decoder_layers(model)
    kinds = (ATTENTION_NAMES, MLP_NAMES) if placement == "houlsby" else (MLP_NAMES,)
    names = []
    for index, layer in enumerate(layers):
        for candidates in kinds:
            child = next((c for c in candidates if isinstance(getattr(layer, c, None), nn.Module)), None)
            if child is None:
                raise SftlabError(f"decoder layer {layers_name}.{index} ({type(layer).__name__}) has none of the "
                                  f"children {', '.join(candidates)}; bottleneck adapters do not know where its "
                                  "blocks are. Use method=lora for this architecture.")
            names.append(f"{layers_name}.{index}.{child}")
    return names


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(full name, list) of the decoder's layers: the ModuleList with num_hidden_layers entries."""
    count = model.config.get_text_config().num_hidden_layers
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if not found:
        raise SftlabError(f"{type(model).__name__} has no list of {count} decoder layers (config "
                          "num_hidden_layers); bottleneck adapters cannot be placed. Use method=lora.")
    return found[0]
