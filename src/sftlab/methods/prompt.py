"""Soft prompts: prompt tuning and P-tuning. Trained virtual-token embeddings are prepended to every input.

    input_ids (B, T) ──embed──▶ (B, T, H) ──cat(virtual (B, P, H), ·)──▶ (B, P+T, H) ──decoder──▶ drop the P

- Prompt tuning (`method: prompt`): the P virtual tokens are a trained (P, H) table, initialised from the
  embeddings of `prompt.init_text`'s tokens (repeated, then cut to P) or from P vocabulary rows drawn with
  train.seed.
- P-tuning (`method: ptuning`): the virtual tokens are `encoder(table)`, a trained MLP or bidirectional-LSTM
  prompt encoder (HF PEFT's PromptEncoder) over a trained (P, H) table. Export runs the encoder once and keeps
  only its output; a P-tuning adapter loaded back holds that output as a plain table (`folded`).

The forward is HF PEFT's (`PeftModelForCausalLM.forward` for prompt learning, peft 0.21): the virtual tokens
come first, the attention mask gets P leading ones, and positions run 0..P-1 over the virtual tokens and on
from P over the real ones (PEFT drops position_ids, so the decoder counts from 0 over all P+T inputs). The
virtual positions are cut off the hidden states, so they are never targets and the labels need no change.
Generation's prefill runs the prompt behind the virtual tokens; the cache it returns holds them, so later
single-token steps (positions P+T, P+T+1, ...) continue exactly as PEFT's forward over the whole sequence.
Base weights are frozen; rows of tokens the data step added train too (`token_rows.py`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sftlab.errors import SftlabError
from sftlab.methods.base import MergeError, Method
from sftlab.methods.token_rows import add_token_rows, token_rows_modules, token_rows_parameters

ATTRIBUTE = "soft_prompt"
"""Where the SoftPrompt module sits on the model (model.soft_prompt); its parameters' names start with it."""
ENCODER_LAYERS = 2
"""Layers of P-tuning's LSTM encoder (PEFT's encoder_num_layers default; its MLP always has 3 linears)."""


class PromptEncoder(nn.Module):
    """P-tuning's reparameterisation, layer for layer HF PEFT's PromptEncoder (peft/tuners/p_tuning/model.py):
    mlp: Linear(H, h) ReLU Linear(h, h) ReLU Linear(h, H); lstm: a 2-layer bidirectional LSTM(H, h), then
    Linear(2h, 2h) ReLU Linear(2h, H)."""

    def __init__(self, dim: int, *, kind: str, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, hidden, num_layers=ENCODER_LAYERS, bidirectional=True,
                            batch_first=True) if kind == "lstm" else None
        if kind == "lstm":
            self.mlp = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, dim))

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        x = table.unsqueeze(0)  # (1, P, H): the LSTM reads the P virtual tokens as one sequence
        if self.lstm is not None:
            x = self.lstm(x)[0]  # (1, P, 2h)
        return self.mlp(x)[0]  # (P, H)


class SoftPrompt(nn.Module):
    """The P virtual-token embeddings: `table` (P, H) in fp32, through `encoder` when there is one."""

    def __init__(self, table: torch.Tensor, encoder: PromptEncoder | None = None) -> None:
        super().__init__()
        self.table = nn.Parameter(table)
        self.encoder = encoder

    @property
    def num_virtual_tokens(self) -> int:
        return self.table.shape[0]

    def forward(self) -> torch.Tensor:
        """(P, H) virtual-token embeddings."""
        return self.table if self.encoder is None else self.encoder(self.table)

    @torch.no_grad()
    def fold(self, embeddings: torch.Tensor) -> None:
        """Drop the encoder and hold `embeddings` (P, H), its saved output, as a plain table from now on."""
        if embeddings.shape != self.table.shape:
            raise SftlabError(f"virtual-token embeddings of shape {tuple(embeddings.shape)} do not fit this model's "
                              f"{tuple(self.table.shape)} (num_virtual_tokens, hidden size).")
        self.table = nn.Parameter(embeddings.detach().to(self.table).clone())
        self.encoder = None


class PromptTuning(Method):
    name = "prompt"
    sections = ("prompt",)
    mergeable = False
    export_format = "peft_prompt"
    packing = False
    folds_encoder = False
    """P-tuning trains an encoder over its table; its export holds the table the encoder makes (folded)."""

    def apply(self, model: nn.Module) -> None:
        if soft_prompt(model, required=False) is not None or token_rows_modules(model):
            raise SftlabError("a soft prompt is already applied to this model; load a fresh base model.")
        for param in model.parameters():
            param.requires_grad_(False)
        embedding = model.get_input_embeddings()
        model.add_module(ATTRIBUTE, SoftPrompt(self._initial_table(embedding), self._encoder(embedding)))
        if self.trainable_token_ids:
            add_token_rows(model, self.trainable_token_ids)

    def _initial_table(self, embedding: nn.Module) -> torch.Tensor:
        """(P, H) fp32: the embeddings of init_text's tokens, or of P vocabulary rows drawn with train.seed."""
        count = self.config.prompt.num_virtual_tokens
        weight = embedding.weight
        text = self.config.prompt.init_text
        if text:
            ids = _text_ids(self.config, text)
            ids = (ids * math.ceil(count / len(ids)))[:count]  # repeated, then cut to P (as PEFT does)
            token_ids = torch.tensor(ids, dtype=torch.long)
        else:
            generator = torch.Generator().manual_seed(self.config.train.seed)
            token_ids = torch.randint(0, weight.shape[0], (count,), generator=generator)
        with torch.no_grad():  # through the module: a scaled embedding (Gemma) scales here as in its forward
            rows = embedding(token_ids.to(weight.device))
        return rows.detach().to(_train_dtype(weight)).clone()

    def _encoder(self, embedding: nn.Module) -> PromptEncoder | None:
        return None

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        prompt = {f"{ATTRIBUTE}.{name}": p for name, p in soft_prompt(model).named_parameters()}
        return {**prompt, **token_rows_parameters(model)}

    def merge(self, model: nn.Module) -> nn.Module:
        raise MergeError(f"method {self.name} cannot be merged: its virtual tokens are extra inputs prepended to "
                         "every sequence, not a change of any weight, so no plain model computes the same. Keep the "
                         "adapter (generate/chat load it; HF PEFT loads it as a prompt-learning adapter).")

    def virtual_tokens(self, model: nn.Module, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """(B, P, H) virtual-token embeddings in the decoder's input dtype."""
        return soft_prompt(model)().to(dtype).unsqueeze(0).expand(batch_size, -1, -1)

    def hidden_states(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Hidden states (B, T, H) of the batch's own positions, run behind the virtual tokens."""
        embeds = model.get_input_embeddings()(batch.input_ids)  # (B, T, H)
        batch_size, count = embeds.shape[0], soft_prompt(model).num_virtual_tokens
        virtual = self.virtual_tokens(model, batch_size, embeds.dtype)  # (B, P, H)
        ones = batch.attention_mask.new_ones(batch_size, count)
        first = torch.arange(count, device=embeds.device).expand(batch_size, count)  # (B, P): 0..P-1
        out = model.base_model(inputs_embeds=torch.cat([virtual, embeds], dim=1),
                               attention_mask=torch.cat([ones, batch.attention_mask], dim=1),
                               position_ids=torch.cat([first, batch.position_ids + count], dim=1), use_cache=False)
        return out[0][:, count:]  # (B, T, H): the virtual positions are never targets

    def prefill(self, model: nn.Module, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """The prompt (1, T) behind the virtual tokens; the returned cache holds all P+T positions."""
        embeds = model.get_input_embeddings()(input_ids)  # (1, T, H)
        virtual = self.virtual_tokens(model, embeds.shape[0], embeds.dtype)
        return model(inputs_embeds=torch.cat([virtual, embeds], dim=1), use_cache=True, **kwargs)


class PTuning(PromptTuning):
    name = "ptuning"
    sections = ("ptuning",)
    folds_encoder = True

    def _initial_table(self, embedding: nn.Module) -> torch.Tensor:
        weight = embedding.weight
        count = self.config.ptuning.num_virtual_tokens
        # N(0, 1), nn.Embedding's default, as PEFT's PromptEncoder.embedding starts (drawn from the seeded RNG)
        return torch.randn(count, weight.shape[1], dtype=_train_dtype(weight)).to(weight.device)

    def _encoder(self, embedding: nn.Module) -> PromptEncoder:
        weight = embedding.weight
        ptuning = self.config.ptuning
        encoder = PromptEncoder(weight.shape[1], kind=ptuning.encoder, hidden=ptuning.encoder_hidden)
        return encoder.to(device=weight.device, dtype=_train_dtype(weight))


def soft_prompt(model: nn.Module, *, required: bool = True) -> SoftPrompt | None:
    """The model's SoftPrompt module (found by type), or None / an error when the method was not applied."""
    found = [module for module in model.modules() if isinstance(module, SoftPrompt)]
    if not found and required:
        raise SftlabError("the model has no soft prompt: apply the method (PromptTuning/PTuning(config).apply(model)) "
                          "first.")
    return found[0] if found else None


def _text_ids(config: Any, text: str) -> list[int]:
    """The token ids of `text` alone (no BOS/EOS) under the base model's tokenizer."""
    from sftlab.models.load import load_tokenizer

    tokenizer = load_tokenizer(config.model.path, trust_remote_code=config.model.trust_remote_code)
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise SftlabError(f"prompt.init_text {text!r} has no tokens; give a non-empty text or null (random rows).")
    return ids


def _train_dtype(weight: torch.Tensor) -> torch.dtype:
    """Soft prompts train in fp32 even over a bf16/fp16 base, as LoRA's matrices do."""
    return weight.dtype if weight.dtype == torch.float64 else torch.float32
