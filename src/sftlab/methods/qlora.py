"""QLoRA: LoRA over a base whose decoder linear layers are stored as NF4 (Dettmers et al. 2023).

`apply` wraps the LoRA targets exactly as LoRA does (same `lora.*` settings, same parameter names, so
checkpoints and the PEFT-format export are LoRA's), then replaces every base linear layer of the decoder
— targets or not; never the output head nor the embeddings — by a frozen `NF4Linear`
(`qlora.block_size`, `qlora.double_quant`). With `lora.dora` (QDoRA) each magnitude starts at the row
norms of the dequantised weight, so the model is the NF4 base's at init. The adapters keep LoRALinear's
dtype rule (fp32 matrices, output cast to the base's compute dtype); the base computes in the dtype the
model was loaded in (fp32 on CPU, bf16 on a GPU).

Merging gives a plain model (nn.Linear everywhere) in one of two ways:
- `onto="dequantized"` (default): W = dequant(NF4) + s·B·A — the function the adapter was trained
  against; the merged model's logits equal the QLoRA model's to fp32 rounding.
- `onto="original"`: W = W_original + s·B·A, with the base's original-precision weights (reloaded from
  `model.path`, or given as `original_state_dict`); it differs from the trained model by the NF4 error
  (see models/quant.py) but keeps the base's full precision where the adapter did not move it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from sftlab.errors import ConfigError, SftlabError
from sftlab.methods.lora import DoRALinear, LoRA, LoRALinear, lora_modules
from sftlab.models.quant import dequantize, fits_nf4, nf4_modules, quantize
from sftlab.models.targets import find_targets

MergeOnto = Literal["dequantized", "original"]


class QLoRA(LoRA):
    name = "qlora"
    mergeable = True
    nf4_base = True

    def apply(self, model: nn.Module) -> None:
        if nf4_modules(model) or lora_modules(model):
            raise SftlabError("QLoRA is already applied to this model; load a fresh base model (or merge first).")
        qlora = self.config.qlora
        # Every linear layer of the decoder, found before LoRA wraps some of them (the head is excluded).
        decoder = find_targets(model, "all-linear", key="qlora")
        if not any(fits_nf4(model.get_submodule(name), qlora.block_size) for name in decoder):
            raise ConfigError(f"no linear layer of this model splits into whole NF4 blocks of qlora.block_size="
                              f"{qlora.block_size} weights (e.g. {decoder[0]}); set qlora.block_size to a divisor "
                              "of the layers' sizes (64 fits nearly every model).")
        super().apply(model)
        names = [f"{name}.base" if isinstance(model.get_submodule(name), LoRALinear) else name for name in decoder]
        quantize(model, names, block_size=qlora.block_size, double_quant=qlora.double_quant)
        for module in lora_modules(model).values():
            if isinstance(module, DoRALinear):  # QDoRA: the magnitude starts at the norm of W0 as it now is
                with torch.no_grad():
                    module.magnitude.copy_(module.weight_norm())

    def merge(self, model: nn.Module, *, onto: MergeOnto = "dequantized",
              original_state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """Fold the adapters (and trained token rows) into plain layers, in place, and return the plain
        model (nn.Linear everywhere). `onto="dequantized"`: onto dequant(NF4). `onto="original"`: onto the
        base's original-precision weights — from `original_state_dict` (the unquantised base model's
        state dict, HF names) or, if None, reloaded from `model.path`."""
        if onto == "dequantized":
            dequantize(model)
        elif onto == "original":
            state = self._original_state_dict() if original_state_dict is None else original_state_dict
            dequantize(model, original_weights(model, state))
        else:
            raise SftlabError(f"merge onto {onto!r}: expected 'dequantized' or 'original'.")
        return super().merge(model)

    def _original_state_dict(self) -> dict[str, torch.Tensor]:
        from sftlab.models.load import load_model

        return load_model(self.config.model, device=torch.device("cpu")).state_dict()


def original_weights(model: nn.Module, original_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NF4 layer name (e.g. `model.layers.0.self_attn.q_proj.base`) -> that layer's weight in the
    unquantised base model's state dict (`model.layers.0.self_attn.q_proj.weight`), shapes checked."""
    weights = {}
    for name, module in nf4_modules(model).items():
        plain_name = name.removesuffix(".base") if isinstance(_parent(model, name), LoRALinear) else name
        key = f"{plain_name}.weight"
        expected = (module.in_features, module.out_features) if module.conv1d else \
            (module.out_features, module.in_features)
        weight = original_state_dict.get(key)
        if weight is None or tuple(weight.shape) != expected:
            found = "no such weight" if weight is None else f"shape {tuple(weight.shape)}"
            raise SftlabError(f"the original base weights hold {found} for {key}, the QLoRA model's layer has "
                              f"shape {expected}; merge onto the base model this QLoRA model was built from.")
        weights[name] = weight
    return weights


def _parent(model: nn.Module, name: str) -> nn.Module:
    parent_name = name.rpartition(".")[0]
    return model.get_submodule(parent_name) if parent_name else model
