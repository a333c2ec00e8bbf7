"""The Method protocol: every method differs only in what it inserts, what trains and what it saves."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from sftlab.errors import SftlabError
from sftlab.models.swap import parent_of


class MergeError(SftlabError):
    """The method's trained parts cannot be folded into the base weights; the message says why."""


class Method(ABC):
    """A method class is its registry entry (methods/registry.py): what it is called, what it reads, needs and
    writes are class attributes, so that the rest of sftlab asks the entry instead of comparing names."""

    name: ClassVar[str]
    """`method` in the config."""
    sections: ClassVar[tuple[str, ...]]
    """The config sections it reads (config.METHOD_SECTIONS says the same: config.py cannot import methods)."""
    mergeable: ClassVar[bool]
    """`merge` folds it into plain base weights; when False, `merge` raises MergeError saying why it cannot."""
    export_format: ClassVar[str]
    """The export/registry.py format its run writes and reads back (FORMATS key)."""
    whole_model: ClassVar[bool] = False
    """It trains every weight: the run exports model/ (a plain model dir), not adapter/; a preference stage's
    reference is a frozen copy (it has no adapter to disable); a later stage starts from that model/."""
    packing: ClassVar[bool] = True
    """data.packing may be used (soft prompts prepend to each sequence: a packed row is one sequence)."""
    quantized_base: ClassVar[bool] = False
    """The base is quantised to NF4 as it loads (`nf4`), and merge can fold onto either precision."""
    smaller_sibling: ClassVar[str | None] = None
    """A method that trains the same parts with less memory (LoRA -> QLoRA): the memory plan suggests it."""

    @classmethod
    def nf4(cls, config: Any) -> Any:
        """The NF4 settings the base model loads with (models/stream.Nf4Spec), None: loaded as stored."""
        return None

    @classmethod
    def export_dir(cls) -> str:
        """The run dir's entry its export is written to."""
        return "model" if cls.whole_model else "adapter"

    def __init__(self, config: Any, *, trainable_token_ids: Sequence[int] = ()) -> None:
        self.config = config
        """The whole sftlab Config (a method reads its own section)."""
        self.trainable_token_ids = tuple(sorted(set(trainable_token_ids)))
        """Token ids whose embedding rows (and output-head rows) must train besides the method's own
        parameters: the tokens the data step added to the vocabulary, whose rows the base never learned.
        A method that trains every weight already trains them."""

    @abstractmethod
    def apply(self, model: nn.Module) -> None:
        """Insert the method's modules and set requires_grad: after this only the method's parameters train."""

    def check_layers(self, model: nn.Module) -> None:
        """Refuse settings that do not fit the model's layers (e.g. a rank wider than a layer). Called on a
        skeleton built on the meta device (no weights read) before the model loads, so a mistake costs
        seconds, not a model load."""
        return  # an optional hook, not an abstract one: by default every layer fits

    @abstractmethod
    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters the optimizer updates, by stable name (also the checkpoint keys)."""

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint or export stores: the trainable tensors, detached."""
        return {name: p.detach() for name, p in self.trainable_parameters(model).items()}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        params = self.trainable_parameters(model)
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise SftlabError(f"saved {self.name} weights do not fit the model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}; was it trained with another model or method config?")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name].to(param.dtype))

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the trained parts into plain base weights and return a plain model (no sftlab modules)."""
        raise MergeError(f"method {self.name} cannot be merged")

    def hidden_states(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The decoder's last hidden states (B, T, H) at the batch's own token positions. Soft-prompt
        methods override this to run with their virtual tokens / prefixes and drop those positions."""
        from sftlab.models.forward import hidden_states

        return hidden_states(model, batch)

    @contextmanager
    def adapters_disabled(self, model: nn.Module) -> Iterator[None]:
        """Within the block the model's plain forward computes the base model the method was applied to: every
        module the method wrapped (`wrapped_modules`) is swapped back for the base module it holds as `.base`, and
        restored afterwards. Virtual tokens and prefixes never enter a plain forward (only `hidden_states`). This
        is the reference model of preference training, with no second copy of the weights."""
        with base_modules_in_place(model, self.wrapped_modules(model)):
            yield

    def wrapped_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules the method put in place of base modules, each holding the original as `.base`: here the
        trainable token rows (token_rows.py); methods that wrap more add theirs."""
        from sftlab.methods.token_rows import token_rows_modules

        return list(token_rows_modules(model).values())

    def prefill(self, model: nn.Module, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """Generation's first forward over the prompt (1, T), returning logits and the KV cache that later
        single-token steps continue. Soft-prompt methods put their virtual tokens / prefixes in here."""
        return model(input_ids=input_ids, use_cache=True, **kwargs)


@contextmanager
def base_modules_in_place(model: nn.Module, wrappers: Iterable[nn.Module]) -> Iterator[None]:
    """Put each wrapper's `.base` module wherever the wrapper is registered (a shared module may sit in several
    places) for the block, then the wrappers back. Parameters are untouched: nothing is copied."""
    wanted = {id(module) for module in wrappers}
    places = []
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in wanted:
            places.append((*parent_of(model, name), module))
    for parent, child, module in places:
        setattr(parent, child, module.base)
    try:
        yield
    finally:
        for parent, child, module in reversed(places):
            setattr(parent, child, module)
