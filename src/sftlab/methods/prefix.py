"""Prefix tuning: trained key/value prefixes in every attention layer, fed through the model's KV cache.

Every attention layer l attends over P extra positions whose keys and values are trained directly:
k_l, v_l of shape (num_kv_heads, P, head_dim). They live in one table (P, num_layers·2·token_dim),
token_dim = num_kv_heads·head_dim, laid out as HF PEFT's PREFIX_TUNING lays it out: per virtual token,
layer 0 key, layer 0 value, layer 1 key, ... each (num_kv_heads, head_dim). With `prefix.reparameterize`
the table is the output of an MLP over P trained embeddings (embedding (P, token_dim) -> Linear -> tanh ->
Linear; PEFT's prefix_projection), which export folds into the plain table.

The prefixes reach attention as PeftModelForCausalLM.forward puts them there:
- the attention mask gets P ones in front: (B, P + T);
- positions are the tokens' own plus P (the prefix holds cache positions 0..P-1);
- the cache holds the prefixes, so each layer's `cache.update` puts them before the tokens' own (RoPE'd)
  keys and values: keys (B, num_kv_heads, P + T, head_dim). A DynamicCache filled through the public
  `update(key, value, layer_idx)` (transformers 4.4x to 5.x).
Generation (`prefill`) is exactly that: the returned cache then holds prefix + prompt and decoding continues.

Training (`hidden_states`) must also survive gradient checkpointing, and HF's checkpointed decoder layers
drop the cache (a recomputed layer would update it a second time). So while a training forward is *armed*,
a forward pre-hook on every attention module hands it a fresh cache holding only its own layer's prefix,
computed from the parameters on the spot: the first forward and the recompute during backward see the
same keys, and the cache the layer was given (or not) does not matter. The model-level cache given to the
backbone still holds all prefixes, so masks and positions are built for P + T keys. The forward stays
armed until the prefix parameters' gradients are accumulated (after every recompute), or to its end when
no backward follows.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sftlab.errors import ConfigError, SftlabError
from sftlab.methods.base import MergeError, Method
from sftlab.methods.token_rows import add_token_rows, token_rows_modules, token_rows_parameters

CACHE_ARGS = ("cache", "past_key_values", "past_key_value")
"""The names transformers has given an attention module's cache argument (5.x, 4.56-4.5x, older)."""
ENCODER_NAME = "prefix_encoder"
"""Where the PrefixEncoder sits on the model (so `.to()`, `.parameters()` and checkpoints see it)."""
MERGE_REFUSAL = ("prefix tuning cannot be merged: its prefixes are extra key/value positions that every attention "
                 "layer attends to, not a change of any weight, so no plain model computes the same thing. Keep the "
                 "adapter attached: `sftlab generate`/`chat` load it from the run dir, HF PEFT from its adapter/ dir.")


class PrefixEncoder(nn.Module):
    """The trained prefixes: a table (P, num_layers·2·token_dim), or an MLP that produces it."""

    def __init__(self, *, num_virtual_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 encoder_hidden: int | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.armed = False
        """True from a training forward's start until its backward has finished: see the module docstring."""
        # fp32 even over a bf16 base, as LoRA's matrices; nn.Embedding / nn.Linear initialise as PEFT's do.
        if encoder_hidden is None:
            self.embedding = nn.Embedding(num_virtual_tokens, self.width, device=device)
            self.transform: nn.Sequential | None = None
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, self.token_dim, device=device)
            self.transform = nn.Sequential(nn.Linear(self.token_dim, encoder_hidden, device=device), nn.Tanh(),
                                           nn.Linear(encoder_hidden, self.width, device=device))

    @property
    def token_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def width(self) -> int:
        return self.num_layers * 2 * self.token_dim

    def table(self) -> torch.Tensor:
        """The prefixes of all layers, (P, num_layers·2·token_dim)."""
        weight = self.embedding.weight
        return weight if self.transform is None else self.transform(weight)

    def key_values(self, *, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key, value), each (B, num_kv_heads, P, head_dim)."""
        table = self.table()
        return [self._split(table[:, 2 * layer * self.token_dim:2 * (layer + 1) * self.token_dim], batch_size, dtype)
                for layer in range(self.num_layers)]

    def layer_key_values(self, layer: int, *, batch_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s (key, value), computing only its columns of the table."""
        columns = slice(2 * layer * self.token_dim, 2 * (layer + 1) * self.token_dim)
        if self.transform is None:
            part = self.embedding.weight[:, columns]
        else:
            first, activation, last = self.transform
            part = F.linear(activation(first(self.embedding.weight)), last.weight[columns], last.bias[columns])
        return self._split(part, batch_size, dtype)

    def _split(self, part: torch.Tensor, batch_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # (P, 2·token_dim) -> (2, num_kv_heads, P, head_dim) -> key, value expanded to (B, num_kv_heads, P, head_dim)
        pair = part.to(dtype).view(self.num_virtual_tokens, 2, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return tuple(x.unsqueeze(0).expand(batch_size, -1, -1, -1) for x in pair)  # type: ignore[return-value]

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP by the table it produces (what export stores; loading an export needs it)."""
        if self.transform is not None:
            table = self.table()
            self.embedding = nn.Embedding(self.num_virtual_tokens, self.width, device=table.device,
                                          dtype=table.dtype)
            self.embedding.weight.copy_(table)
            self.transform = None

    def disarm(self) -> None:
        self.armed = False


class Prefix(Method):
    name = "prefix"
    sections = ("prefix",)
    mergeable = False
    export_format = "peft_prefix"
    packing = False

    def apply(self, model: nn.Module) -> None:
        prefix = self.config.prefix
        if isinstance(getattr(model, ENCODER_NAME, None), PrefixEncoder) or token_rows_modules(model):
            raise SftlabError("prefix tuning is already applied to this model; load a fresh base model.")
        if getattr(self.config.data, "packing", False):
            raise ConfigError("prefix tuning cannot train on packed rows: every example needs the prefix at its own "
                              "positions 0..P-1, but a packed row has one cache. Set data.packing=false.")
        layers = attention_layers(model)
        num_layers, num_kv_heads, head_dim = kv_shape(model)
        if sorted(layers) != list(range(num_layers)):
            raise SftlabError(f"prefix tuning needs one attention module per layer that takes a KV cache; found "
                              f"{len(layers)} for the model's {num_layers} layers ({type(model).__name__}).")
        for param in model.parameters():
            param.requires_grad_(False)
        device = model.get_input_embeddings().weight.device
        encoder = PrefixEncoder(num_virtual_tokens=prefix.num_virtual_tokens, num_layers=num_layers,
                                num_kv_heads=num_kv_heads, head_dim=head_dim, device=device,
                                encoder_hidden=prefix.encoder_hidden if prefix.reparameterize else None)
        model.add_module(ENCODER_NAME, encoder)
        for layer, module in layers.items():
            module.register_forward_pre_hook(_attention_hook(model, layer, cache_arg(module)), with_kwargs=True)
        if self.trainable_token_ids:
            add_token_rows(model, self.trainable_token_ids)

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        encoder = {f"{ENCODER_NAME}.{name}": p for name, p in prefix_encoder(model).named_parameters()}
        return {**encoder, **token_rows_parameters(model)}

    def merge(self, model: nn.Module) -> nn.Module:
        raise MergeError(MERGE_REFUSAL)

    @contextmanager
    def adapters_disabled(self, model: nn.Module) -> Iterator[None]:
        """The base model: no prefixes, even while a training forward that has not run its backward yet keeps
        the attention hooks armed."""
        encoder = prefix_encoder(model)
        armed, encoder.armed = encoder.armed, False
        try:
            with super().adapters_disabled(model):
                yield
        finally:
            encoder.armed = armed

    def hidden_states(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The backbone's last hidden states (B, T, H) at the batch's own positions, every layer attending to
        its prefix first."""
        encoder = prefix_encoder(model)
        backbone = model.base_model
        size = encoder.num_virtual_tokens
        batch_size = batch.input_ids.shape[0]
        mask = torch.cat([batch.attention_mask.new_ones(batch_size, size), batch.attention_mask], dim=1)  # (B, P+T)
        with torch.no_grad():  # sizes masks and positions; the attention hooks supply the keys that train
            cache = prefix_cache(encoder.key_values(batch_size=batch_size, dtype=_dtype(model)))
        encoder.armed = True
        try:
            out = backbone(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids + size,
                           use_cache=True, **{cache_arg(backbone): cache})
        except BaseException:
            encoder.disarm()
            raise
        if torch.is_grad_enabled() and encoder.embedding.weight.requires_grad:
            _disarm_after_backward(encoder)  # checkpointed layers run again during backward, armed
        else:
            encoder.disarm()
        return out[0]

    def prefill(self, model: nn.Module, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """The first forward of generation: the prompt (B, T) after a cache holding the prefixes; the cache
        returned holds prefix + prompt for the single-token steps that follow."""
        encoder = prefix_encoder(model)
        encoder.disarm()
        cache = prefix_cache(encoder.key_values(batch_size=input_ids.shape[0], dtype=_dtype(model)))
        mask = torch.ones(input_ids.shape[0], encoder.num_virtual_tokens + input_ids.shape[1], dtype=torch.long,
                          device=input_ids.device)
        return model(input_ids=input_ids, attention_mask=mask, use_cache=True, **{cache_arg(model): cache}, **kwargs)


def prefix_encoder(model: nn.Module) -> PrefixEncoder:
    encoder = getattr(model, ENCODER_NAME, None)
    if not isinstance(encoder, PrefixEncoder):
        raise SftlabError("the model has no prefix encoder: apply the method (Prefix(config).apply(model)) first.")
    return encoder


def kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of the decoder, from its config; GQA models have fewer key/value
    heads than query heads, and the prefixes are sized per key/value head (as PEFT sizes them)."""
    config = model.config
    config = getattr(config, "get_text_config", lambda: config)()
    num_layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    num_heads = _first(config, "num_attention_heads", "n_head", "num_heads")
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or hidden // num_heads
    return num_layers, num_kv_heads, head_dim


def attention_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Layer index -> the module whose forward takes the cache and calls `cache.update` for that layer: the
    innermost module with an int `layer_idx` and a cache argument (HF attention modules carry both)."""
    found: dict[int, nn.Module] = {}
    for module in model.modules():  # pre-order: an attention inside a decoder layer of the same index wins
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int) and cache_arg(module, required=False) is not None:
            found[index] = module
    return found


def cache_arg(module: nn.Module, *, required: bool = True) -> str | None:
    """The name `module.forward` takes its KV cache by."""
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        parameters = {}
    name = next((n for n in CACHE_ARGS if n in parameters), None)
    if name is None and required:
        raise SftlabError(f"{type(module).__name__}.forward takes no KV cache argument ({', '.join(CACHE_ARGS)}); "
                          "prefix tuning feeds its prefixes through the cache.")
    return name


def prefix_cache(key_values: Sequence[tuple[torch.Tensor, torch.Tensor]], *, first_layer: int = 0) -> Any:
    """A transformers DynamicCache holding `key_values` for layers first_layer, first_layer + 1, ..."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for offset, (key, value) in enumerate(key_values):
        cache.update(key, value, first_layer + offset)
    return cache


def _attention_hook(model: nn.Module, layer: int, name: str) -> Callable[..., Any]:
    """While the prefix encoder is armed, give the attention of `layer` a fresh cache holding its prefix."""
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        encoder = prefix_encoder(model)
        if not encoder.armed:
            return None
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, T, H)
        key_value = encoder.layer_key_values(layer, batch_size=hidden.shape[0], dtype=hidden.dtype)
        kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_ARGS}
        kwargs[name] = prefix_cache([key_value], first_layer=layer)
        return args, kwargs

    return hook


def _disarm_after_backward(encoder: PrefixEncoder) -> None:
    """Disarm when the prefix parameters' gradient is accumulated: autograd runs that once every layer's
    backward (and its recompute) is done."""
    def hook(_: torch.Tensor) -> None:
        encoder.disarm()
        handle.remove()

    handle = encoder.embedding.weight.register_post_accumulate_grad_hook(hook)


def _dtype(model: nn.Module) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def _first(config: Any, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise SftlabError(f"the model config ({type(config).__name__}) has none of {', '.join(names)}; prefix tuning "
                      "needs the number of layers, attention heads and the hidden size.")
