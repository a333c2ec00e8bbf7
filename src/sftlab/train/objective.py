"""What the training loop minimises, per stage (`stage: sft | dpo | orpo | simpo | kto`); the loop is the same for all.

An objective says what a micro-batch is, which module computes its summed loss (the engine: what DDP and FSDP
wrap), and what the step's summed loss is divided by:

- sft: micro-batches of examples; Σ token losses / the supervised tokens of the whole step (all micro-batches,
  all ranks): the mean over the step's tokens (DESIGN invariant 7).
- dpo: micro-batches of preference pairs; Σ pair losses / the pairs of the step; and the pair metrics, each
  Σ over pairs / pairs: rewards_chosen, rewards_rejected, margin, accuracy (train/preference.py).
- simpo, orpo: as dpo, without a reference; orpo also logs log_odds_ratio and its nll term.
- kto: micro-batches of feedback examples; Σ example losses / the examples of the step; metrics desirable (share),
  rewards_chosen / rewards_rejected (over the desirable / undesirable examples), margin, kl.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn

from sftlab.config import Config
from sftlab.data.batching import collate, collate_packed
from sftlab.data.encode import IGNORE_INDEX, Example
from sftlab.data.feedback import collate_feedback
from sftlab.data.preference import PairBatch, collate_pairs, with_chosen_context
from sftlab.methods import METHODS
from sftlab.train.distributed import TrainingForward
from sftlab.train.preference import (
    KTO_SUMS,
    METRICS,
    ORPO_METRICS,
    KTOForward,
    PreferenceForward,
    ReferenceFreeForward,
    kto_metrics,
)


class Objective(ABC):
    stage: ClassVar[str]
    unit: ClassVar[str]
    """What a step's summed loss is divided by, under the name metrics.jsonl gives its count."""
    metrics: ClassVar[tuple[str, ...]] = ()
    """Sums the engine returns besides the loss, logged per unit (and per unit of the eval data as eval_*)."""
    sequences_per_item: ClassVar[int] = 1
    """Sequences per dataset item: a pair is two, so a packed row of pairs holds 2 x data.max_seq_len tokens."""

    def __init__(self, config: Config, *, share_prefixes: bool = False) -> None:
        self.config = config
        self.share_prefixes = share_prefixes
        """Packed SFT rows share their examples' identical untrained beginnings (data/batching.py); the caller
        says whether the model's attention reads them (models/attention.py prefix_sharing)."""

    @property
    def capacity(self) -> int | None:
        """Tokens of a packed row of items."""
        length = self.config.data.max_seq_len
        return None if length is None else length * self.sequences_per_item

    @abstractmethod
    def engine(self, model: nn.Module, method: Any, *, reference_model: nn.Module | None = None) -> nn.Module:
        """The module whose forward(batch) computes the batch's summed loss (see `split`)."""

    @abstractmethod
    def batch(self, data: Any, indices: Sequence[int], pad_id: int) -> Any:
        """The micro-batch of the dataset items `indices`."""

    @abstractmethod
    def empty_batch(self, pad_id: int) -> Any:
        """A batch that adds nothing to any loss or metric: what a rank runs when the eval batches ran out before
        its turn, so the other ranks' collectives still meet."""

    @abstractmethod
    def count(self, batch: Any) -> int:
        """The batch's units (supervised tokens, pairs)."""

    def split(self, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, metric sums (len(metrics),)) of an engine's output: an engine with metrics returns that
        pair, one without returns the summed loss alone."""
        return output if self.metrics else (output, output.new_zeros(0))

    def present(self, means: dict[str, float]) -> dict[str, float]:
        """The metrics to log from the per-unit means of `metrics` (the same, unless an objective derives others)."""
        return means


class SFT(Objective):
    stage = "sft"
    unit = "supervised_tokens"

    def engine(self, model: nn.Module, method: Any, *, reference_model: nn.Module | None = None) -> nn.Module:
        return TrainingForward(model, method)

    def batch(self, data: Any, indices: Sequence[int], pad_id: int) -> Any:
        examples = [data[int(i)] for i in indices]
        if self.config.data.packing:
            return collate_packed(examples, share_prefixes=self.share_prefixes)
        return collate(examples, pad_id=pad_id)

    def empty_batch(self, pad_id: int) -> Any:
        example = Example([pad_id, pad_id], [IGNORE_INDEX, IGNORE_INDEX], "")  # two untrained pad tokens
        return collate_packed([example]) if self.config.data.packing else collate([example], pad_id=pad_id)

    def count(self, batch: Any) -> int:
        return batch.num_supervised


class DPO(Objective):
    stage = "dpo"
    unit = "pairs"
    metrics = METRICS
    sequences_per_item = 2

    def engine(self, model: nn.Module, method: Any, *, reference_model: nn.Module | None = None) -> nn.Module:
        dpo = self.config.dpo
        return PreferenceForward(model, method, beta=dpo.beta, loss=dpo.loss, label_smoothing=dpo.label_smoothing,
                                 reference_model=reference_model)

    def batch(self, data: Any, indices: Sequence[int], pad_id: int) -> PairBatch:
        return data.collate(indices, pad_id=pad_id, packed=self.config.data.packing)

    def empty_batch(self, pad_id: int) -> PairBatch:
        example = stand_in(pad_id)
        reference = None if not self.config.dpo.precompute_reference else [[0.0, 0.0]]
        batch = collate_pairs([(example, example)], pad_id=pad_id, packed=self.config.data.packing,
                              reference_logps=reference)
        return replace(batch, padding=True)

    def count(self, batch: PairBatch) -> int:
        return 0 if batch.padding else batch.num_pairs


class SimPO(DPO):
    """Stage simpo: DPO's pairs, batches and metrics; the loss reference-free (train/preference.py). Its stand-in
    batch is DPO's: dpo.precompute_reference is never set outside stage dpo (the config refuses it)."""
    stage = "simpo"

    def engine(self, model: nn.Module, method: Any, *, reference_model: nn.Module | None = None) -> nn.Module:
        simpo = self.config.simpo
        return ReferenceFreeForward(model, method, loss="simpo", beta=simpo.beta, gamma=simpo.gamma)


class ORPO(SimPO):
    """Stage orpo: SFT and preference in one loss, no reference; with orpo.nll=sequence each batch also carries
    its chosen prompts' positions."""
    stage = "orpo"
    metrics = ORPO_METRICS

    def engine(self, model: nn.Module, method: Any, *, reference_model: nn.Module | None = None) -> nn.Module:
        return ReferenceFreeForward(model, method, loss="orpo", lambda_=self.config.orpo.lambda_)

    def batch(self, data: Any, indices: Sequence[int], pad_id: int) -> PairBatch:
        batch = super().batch(data, indices, pad_id)
        return self._context(batch, [data.pair(int(i))[0] for i in indices])

    def empty_batch(self, pad_id: int) -> PairBatch:
        batch = super().empty_batch(pad_id)
        return self._context(batch, [stand_in(pad_id)])

    def _context(self, batch: PairBatch, chosen: list[Example]) -> PairBatch:
        return with_chosen_context(batch, chosen) if self.config.orpo.nll == "sequence" else batch


class KTO(Objective):
    """Stage kto: micro-batches of feedback examples (each with its mismatched KL sequence); Σ example losses / the
    examples of the step."""
    stage = "kto"
    unit = "examples"
    metrics = KTO_SUMS
    sequences_per_item = 2

    def engine(self, model: nn.Module, method: Any, *, reference_model: nn.Module | None = None) -> nn.Module:
        kto = self.config.kto
        return KTOForward(model, method, beta=kto.beta, desirable_weight=kto.desirable_weight,
                          undesirable_weight=kto.undesirable_weight, reference_model=reference_model)

    def batch(self, data: Any, indices: Sequence[int], pad_id: int) -> Any:
        return data.collate(indices, pad_id=pad_id, packed=self._packed)

    def empty_batch(self, pad_id: int) -> Any:
        example = stand_in(pad_id)
        return replace(collate_feedback([example, example], [True, False], pad_id=pad_id, max_seq_len=None,
                                        packed=self._packed), padding=True)

    @property
    def _packed(self) -> bool:
        """The policy's rows padding-free, unless the method cannot run packed rows (soft prompts, prefixes)."""
        return METHODS[self.config.method].packing

    def count(self, batch: Any) -> int:
        return 0 if batch.padding else batch.num_examples

    def present(self, means: dict[str, float]) -> dict[str, float]:
        return kto_metrics(means)


def stand_in(pad_id: int) -> Example:
    """Two pad tokens, the second scored: the sequence of an `empty_batch` of the preference stages (a scored token
    keeps every log-prob defined; the batch's padding flag zeroes what it adds)."""
    return Example([pad_id, pad_id], [IGNORE_INDEX, pad_id], "")


OBJECTIVES: dict[str, type[Objective]] = {"sft": SFT, "dpo": DPO, "orpo": ORPO, "simpo": SimPO, "kto": KTO}


def objective_for(config: Config, *, share_prefixes: bool = False) -> Objective:
    """The stage's objective; `share_prefixes` (stage sft with packing only) where the model can read them."""
    sharing = share_prefixes and config.stage == "sft" and config.data.packing and config.data.share_prefixes
    return OBJECTIVES[config.stage](config, share_prefixes=sharing)
