"""The Method protocol: every method differs only in what it inserts, what trains and what it saves."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from sftlab.errors import SftlabError


class MergeError(SftlabError):
    """The method's trained parts cannot be folded into the base weights; the message says why."""


class Method(ABC):
    name: ClassVar[str]
    mergeable: ClassVar[bool]

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
        from sftlab.train.loss import hidden_states

        return hidden_states(model, batch)

    def prefill(self, model: nn.Module, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """Generation's first forward over the prompt (1, T), returning logits and the KV cache that later
        single-token steps continue. Soft-prompt methods put their virtual tokens / prefixes in here."""
        return model(input_ids=input_ids, use_cache=True, **kwargs)
