"""Preference training over answer log-probabilities, summed through the supervised-positions head: DPO and IPO
(stage dpo, below), ORPO and SimPO (stages orpo and simpo: reference-free, further down) and KTO (stage kto:
unpaired feedback, at the end).

For a pair — prompt x, chosen answer y_w, rejected answer y_l — with log π(y|x) summed over the answer's scored
tokens (its content and end-of-turn marker: data/preference.py):

    Δ_w = log π(y_w|x) − log π_ref(y_w|x),   Δ_l likewise,   h = β·(Δ_w − Δ_l)
    sigmoid (DPO, Rafailov et al. 2023):  −(1 − ε)·log σ(h) − ε·log σ(−h)
        ε = label_smoothing: each label taken as flipped with probability ε (conservative DPO); 0 is plain DPO.
    ipo (Azar et al. 2023, eq. 17):       (Δ_w/|y_w| − Δ_l/|y_l| − 1/(2β))²
        the log-ratios averaged over each answer's tokens (|y| scored tokens), as TRL computes IPO: the IPO
        authors confirmed to TRL that the paper's results use this form. β is the paper's τ.

Metrics, summed over pairs (the loop divides by the pairs of the step): rewards β·Δ_w and β·Δ_l, margin
β·(Δ_w − Δ_l), accuracy [margin > 0].

The log-probs come from `head_logprobs` (train/loss.py): the output head runs only on scored positions, one
chunk at a time; full (B, T, V) logits never exist. The reference log-probs are, in order of preference:
precomputed ones riding in the batch; a frozen reference model (full fine-tuning); the trained model itself with
the method's adapters disabled (`Method.adapters_disabled`: no second copy of the base weights).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sftlab.data.preference import PairBatch, PairDataset
from sftlab.errors import ConfigError
from sftlab.models import shared_prefix
from sftlab.models.attention import PACKED_EAGER, PACKED_SDPA, packed_attention
from sftlab.train.loss import head_logprobs, hidden_states

LOSSES = ("sigmoid", "ipo")
METRICS = ("rewards_chosen", "rewards_rejected", "margin", "accuracy")
"""The per-pair metrics `pair_metrics` sums, in its order."""


def sequence_logps(model: nn.Module, batch: PairBatch, method: Any = None) -> torch.Tensor:
    """log π(answer | prompt) of each of the batch's 2P sequences, (2P,) fp32: the chosen sides, then the
    rejected ones. `method` supplies the hidden states when it changes the forward (soft prompts, prefixes)."""
    inner = batch.batch
    hidden = method.hidden_states(model, inner) if method is not None else hidden_states(model, inner)
    tokens = head_logprobs(model, hidden, inner.loss_index, inner.loss_targets)  # (N,)
    return tokens.new_zeros(2 * batch.num_pairs).index_add(0, batch.sequence_index, tokens)


def reference_logps(model: nn.Module, batch: PairBatch, method: Any = None, *,
                    reference_model: nn.Module | None = None) -> torch.Tensor:
    """The reference's log-probs of the batch's sequences, (2P,), without gradients: precomputed, from
    `reference_model`, or from `model` with `method`'s adapters disabled."""
    if batch.reference_logps is not None:
        return batch.reference_logps
    with torch.no_grad():
        if reference_model is not None:
            return sequence_logps(reference_model, batch)
        if method is None:
            raise ValueError("no reference: give precomputed log-probs, a reference model or the method")
        with method.adapters_disabled(model):
            return sequence_logps(model, batch)  # the plain forward: no virtual tokens or prefixes either


def pair_losses(policy: torch.Tensor, reference: torch.Tensor, sequence_tokens: torch.Tensor, *, beta: float,
                loss: str = "sigmoid", label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair losses (P,), rewards β·Δ (2P,)) from policy and reference log-probs of [chosen…, rejected…]
    (2P,) and each sequence's scored-token count (2P,)."""
    ratios = policy - reference.to(policy)  # Δ (2P,)
    chosen, rejected = ratios.chunk(2)
    if loss == "sigmoid":
        h = beta * (chosen - rejected)
        losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    elif loss == "ipo":
        per_token = ratios / sequence_tokens.to(ratios).clamp(min=1)
        chosen_mean, rejected_mean = per_token.chunk(2)
        losses = (chosen_mean - rejected_mean - 1 / (2 * beta)) ** 2
    else:
        raise ConfigError(f"dpo.loss must be one of {', '.join(LOSSES)}; found {loss!r}")
    return losses, beta * ratios


def pair_metrics(rewards: torch.Tensor) -> torch.Tensor:
    """Sums over the pairs of METRICS, (4,), from the rewards (2P,) of [chosen…, rejected…]."""
    chosen, rejected = rewards.detach().float().chunk(2)
    margin = chosen - rejected
    return torch.stack([chosen.sum(), rejected.sum(), margin.sum(), (margin > 0).float().sum()])


class ReferenceForward(nn.Module):
    """The frozen reference copy's log-probs as one module call, so that under FSDP the copy is sharded like the
    policy and its root gathers the parameters only for this call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: PairBatch) -> torch.Tensor:
        return sequence_logps(self.model, batch)


class PreferenceForward(nn.Module):
    """A PairBatch's summed pair loss and its metric sums as one module call, so DDP's and FSDP's hooks see the
    whole computation (as TrainingForward does for the supervised loss)."""

    def __init__(self, model: nn.Module, method: Any, *, beta: float, loss: str = "sigmoid",
                 label_smoothing: float = 0.0, reference_model: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.method = method
        self.beta, self.loss, self.label_smoothing = beta, loss, label_smoothing
        # A plain attribute, not a submodule: the frozen copy trains nothing and must stay out of the trained
        # model's state dict and its DDP wrapping (FSDP shards it as a root of its own: train/distributed.py).
        self.__dict__["reference"] = ReferenceForward(reference_model) if reference_model is not None else None

    def forward(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ pair losses, Σ METRICS (4,))."""
        # The reference first: prefix tuning's training forward keeps its hooks armed until its backward.
        if batch.reference_logps is None and self.reference is not None:
            with torch.no_grad():
                reference = self.reference(batch)
            if hasattr(self.reference, "reshard"):  # FSDP: a forward without backward leaves the root gathered
                self.reference.reshard()
        else:
            reference = reference_logps(self.model, batch, self.method)
        policy = sequence_logps(self.model, batch, self.method)
        losses, rewards = pair_losses(policy, reference, batch.sequence_tokens, beta=self.beta, loss=self.loss,
                                      label_smoothing=self.label_smoothing)
        if batch.padding:
            return losses.sum() * 0, pair_metrics(rewards) * 0
        return losses.sum(), pair_metrics(rewards)


def precompute_reference(data: PairDataset, logps: Callable[[PairBatch], torch.Tensor], *, pad_id: int,
                         device: torch.device, batch_pairs: int = 8, packed: bool = False) -> np.ndarray:
    """The log-probs `logps` gives every pair, (pairs, 2) float32 [chosen, rejected], in one pass without
    gradients, longest pairs first (similar lengths pad little)."""
    out = np.zeros((len(data), 2), dtype=np.float32)
    order = np.argsort(-data.lengths, kind="stable")
    with torch.no_grad():
        for start in range(0, len(order), batch_pairs):
            chunk = order[start:start + batch_pairs]
            batch = data.collate(chunk, pad_id=pad_id, packed=packed)
            batch = replace(batch, reference_logps=None).to(device)
            out[chunk] = logps(batch).float().cpu().numpy().reshape(2, -1).T
    return out


# Reference-free objectives (stages orpo and simpo): the same pairs and log-probs, no reference model at all.
#
# With ā = log π(y|x) averaged over the answer's scored tokens (its length-normalised log-probability):
#     simpo (Meng et al. 2024):  −log σ(β·(ā_w − ā_l) − γ)
#     orpo (Hong et al. 2024):   NLL + λ·(−log σ(lo_w − lo_l)),  lo = log(p/(1−p)) of p = exp(ā), the log-odds
# ORPO's NLL is a token mean over the micro-batch: of the chosen answers' scored tokens (orpo.nll=answer), or of
# every token after the first of the chosen prompt and answer (orpo.nll=sequence, TRL's ORPOTrainer). The loop
# divides a step's sums by its pairs, so the engine returns pairs × that mean: with one micro-batch per step the
# step loss is exactly NLL + λ·mean over pairs; with several, each micro-batch's token mean weighs by its pairs.

ORPO_METRICS = METRICS + ("log_odds_ratio", "nll")
"""ORPO's per-pair sums: the rewards (λ·ā), margin and accuracy as for DPO, the log-odds ratio lo_w − lo_l, and the
NLL term (its micro-batch mean, per pair)."""


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate on both sides of −log 2 (log1p near −∞, expm1 near 0)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def simpo_losses(average: torch.Tensor, *, beta: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair losses (P,), rewards β·ā (2P,)) from the length-averaged log-probs ā of [chosen…, rejected…]."""
    chosen, rejected = average.chunk(2)
    return -F.logsigmoid(beta * (chosen - rejected) - gamma), beta * average


def orpo_losses(average: torch.Tensor, *, lambda_: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair odds-ratio losses −log σ(lo_w − lo_l) (P,), unweighted, rewards λ·ā (2P,), log-odds ratios (P,))."""
    chosen, rejected = average.chunk(2)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return -F.logsigmoid(log_odds), lambda_ * average, log_odds


class ReferenceFreeForward(nn.Module):
    """A PairBatch's summed ORPO or SimPO loss and its metric sums as one module call (see PreferenceForward): one
    forward of the policy, its head on the scored positions (and, for orpo.nll=sequence, the chosen prompts')."""

    def __init__(self, model: nn.Module, method: Any, *, loss: str, beta: float = 2.0, gamma: float = 1.0,
                 lambda_: float = 0.1) -> None:
        super().__init__()
        if loss not in ("orpo", "simpo"):
            raise ConfigError(f"a reference-free loss is orpo or simpo; found {loss!r}")
        self.model, self.method = model, method
        self.loss, self.beta, self.gamma, self.lambda_ = loss, beta, gamma, lambda_

    def forward(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ pair losses, Σ metrics per pair: METRICS for simpo, ORPO_METRICS for orpo)."""
        inner = batch.batch
        hidden = self.method.hidden_states(self.model, inner) if self.method is not None \
            else hidden_states(self.model, inner)
        index, targets, scored = inner.loss_index, inner.loss_targets, inner.loss_index.shape[0]
        if batch.context_index is not None:  # one head pass over the scored and the context positions
            index, targets = torch.cat([index, batch.context_index]), torch.cat([targets, batch.context_targets])
        tokens = head_logprobs(self.model, hidden, index, targets)
        answer, context = tokens[:scored], tokens[scored:]
        sums = answer.new_zeros(2 * batch.num_pairs).index_add(0, batch.sequence_index, answer)
        average = sums / batch.sequence_tokens.to(sums).clamp(min=1)
        if self.loss == "simpo":
            losses, rewards = simpo_losses(average, beta=self.beta, gamma=self.gamma)
            total, metrics = losses.sum(), pair_metrics(rewards)
        else:
            odds, rewards, log_odds = orpo_losses(average, lambda_=self.lambda_)
            chosen_tokens = batch.sequence_tokens[:batch.num_pairs].sum().to(sums) + context.shape[0]
            nll = -(sums[:batch.num_pairs].sum() + context.sum()) / chosen_tokens.clamp(min=1)
            total = batch.num_pairs * nll + self.lambda_ * odds.sum()
            metrics = torch.cat([pair_metrics(rewards), torch.stack([log_odds.detach().sum(),
                                                                     batch.num_pairs * nll.detach()])])
        if batch.padding:
            return total * 0, metrics * 0
        return total, metrics


# KTO (Ethayarajh et al. 2024), stage kto: unpaired examples x, y labelled desirable or undesirable.
#
#     Δ = log π(y|x) − log π_ref(y|x)        (summed over the answer's scored tokens)
#     z = max(0, mean over the batch of log π(y'|x) − log π_ref(y'|x)), detached: the reference-KL estimate from
#         mismatched sequences, each prompt with another example's completion (data/feedback.py)
#     desirable:   λ_D·(1 − σ(β·(Δ − z)))      undesirable:   λ_U·(1 − σ(β·(z − Δ)))
# summed over the examples (the loop divides by the step's examples), as TRL's KTOTrainer computes it.

KTO_SUMS = ("desirable", "rewards_chosen", "rewards_rejected", "kl")
"""What the KTO engine sums per micro-batch: desirable examples, β·Δ over the desirable ones and over the
undesirable ones, and the KL estimate times the batch's examples; `kto_metrics` turns their per-example means into
the logged metrics."""


def kto_losses(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, *, beta: float,
               desirable_weight: float, undesirable_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-example losses (B,), rewards β·Δ (B,), the KL estimate z ()) from the policy and reference log-probs of
    [the B examples…, their B mismatched sequences…] (2B,) and the examples' labels (B,) bool."""
    ratios, mismatched = (policy - reference.to(policy)).chunk(2)
    kl = mismatched.detach().mean().clamp(min=0)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratios - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratios))))
    return losses, beta * ratios, kl


def kto_metrics(means: dict[str, float]) -> dict[str, float]:
    """Per-example means of KTO_SUMS -> desirable share, the mean reward of desirable and of undesirable examples
    (each over its own examples; absent when the step has none), their margin, and the KL estimate."""
    share = means["desirable"]
    out = {"desirable": share, "kl": means["kl"]}
    if share > 0:
        out["rewards_chosen"] = means["rewards_chosen"] / share
    if share < 1:
        out["rewards_rejected"] = means["rewards_rejected"] / (1 - share)
    if 0 < share < 1:
        out["margin"] = out["rewards_chosen"] - out["rewards_rejected"]
    return out


def batch_logps(model: nn.Module, inner: Any, sequence: torch.Tensor, count: int, method: Any = None) -> torch.Tensor:
    """log π(answer | prompt) of each of the `count` sequences of a Batch, `sequence` naming the sequence of each
    supervised position, (count,) fp32."""
    hidden = method.hidden_states(model, inner) if method is not None else hidden_states(model, inner)
    tokens = head_logprobs(model, hidden, inner.loss_index, inner.loss_targets)
    return tokens.new_zeros(count).index_add(0, sequence, tokens)


def packed_rows(model: nn.Module, batch: Any) -> contextlib.AbstractContextManager:
    """Packed attention for `model` while it runs `batch`, when that is a packed row and the attention is not
    packed already (the loop turns it on for data.packing; stage kto packs its rows without it)."""
    if not batch.packed or model.config._attn_implementation in (PACKED_SDPA, PACKED_EAGER):
        return contextlib.nullcontext()
    return packed_attention(model)


def kto_reference_logps(model: nn.Module, batch: Any) -> torch.Tensor:
    """A plain model's log-probs of a FeedbackBatch's examples and KL sequences, (2B,): the examples' packed row,
    its prompts continued by the KL completions (`shared_logps`), or one forward of the packed row of all 2B."""
    if shares_prefixes(model, batch):
        examples, mismatched = shared_logps(model, batch)
        return torch.cat([examples, mismatched])
    with packed_rows(model, batch.sequences):
        return batch_logps(model, batch.sequences, batch.sequence_index, 2 * batch.num_examples)


def shares_prefixes(model: nn.Module, batch: Any) -> bool:
    """Whether the batch's KL sequences can run as continuations of its examples' prompts: a packed batch, and a
    model whose attention shared_prefix supports."""
    return batch.continuations is not None and shared_prefix.usable(model) and not _sharded(model)


def _sharded(model: nn.Module) -> bool:
    """Whether FSDP shards `model` (its two passes per step are not verified under FSDP: the plain forwards run)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - a torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def shared_logps(model: nn.Module, batch: Any, method: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of the B examples, with gradients where enabled; of the B KL sequences, without): one forward
    of the examples' packed row keeping each layer's keys and values, then one of the KL completions continuing
    its prompts (models/shared_prefix.py). Each prompt runs once for both of its sequences."""
    rows, follow = batch.examples, batch.continuations
    count = batch.num_examples
    with shared_prefix.shared_prefixes(model, list(follow.spans)):
        with shared_prefix.attention(model, shared_prefix.CAPTURE):
            hidden = method.hidden_states(model, rows) if method is not None else hidden_states(model, rows)
        tokens = head_logprobs(model, hidden, rows.loss_index, rows.loss_targets)
        examples = tokens.new_zeros(count).index_add(0, batch.example_index, tokens)
        with torch.no_grad():
            flat = hidden.detach().reshape(-1, hidden.shape[-1])
            if follow.row.input_ids.shape[1]:
                with shared_prefix.attention(model, shared_prefix.BRANCH):
                    more = hidden_states(model, follow.row)
                flat = torch.cat([flat, more.reshape(-1, more.shape[-1])])
            kl = head_logprobs(model, flat.unsqueeze(0), follow.index, follow.targets)
    return examples, tokens.new_zeros(count).index_add(0, follow.sequence, kl.to(tokens.dtype))


class KTOReferenceForward(nn.Module):
    """The frozen reference copy's log-probs of a FeedbackBatch's examples and KL sequences as one module call
    (sharded under FSDP like ReferenceForward)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> torch.Tensor:
        return kto_reference_logps(self.model, batch)


class KTOForward(nn.Module):
    """A FeedbackBatch's summed KTO loss and its KTO_SUMS as one module call; the reference as for DPO (a frozen
    copy for full fine-tuning, else the model with its adapters disabled), one forward over all 2B sequences. The
    policy's KL sequences run without gradients (the estimate is detached), its examples with them."""

    def __init__(self, model: nn.Module, method: Any, *, beta: float, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0, reference_model: nn.Module | None = None) -> None:
        super().__init__()
        self.model, self.method = model, method
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight
        self.__dict__["reference"] = KTOReferenceForward(reference_model) if reference_model is not None else None

    def _reference(self, batch: Any) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is not None:
                reference = self.reference(batch)
                if hasattr(self.reference, "reshard"):  # FSDP: a forward without backward leaves the root gathered
                    self.reference.reshard()
                return reference
            with self.method.adapters_disabled(self.model):
                return kto_reference_logps(self.model, batch)  # the plain forward: no virtual tokens or prefixes

    def _policy(self, rows: Any, index: torch.Tensor, count: int) -> torch.Tensor:
        with packed_rows(self.model, rows):
            return batch_logps(self.model, rows, index, count, self.method)

    def forward(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        reference = self._reference(batch)  # first: prefix tuning's forward keeps its hooks armed until backward
        if shares_prefixes(self.model, batch):
            policy = torch.cat(shared_logps(self.model, batch, self.method))
        else:
            with torch.no_grad():
                mismatched = self._policy(batch.mismatched, batch.mismatched_index, batch.num_examples)
            policy = torch.cat([self._policy(batch.examples, batch.example_index, batch.num_examples), mismatched])
        losses, rewards, kl = kto_losses(policy, reference, batch.desirable, beta=self.beta,
                                         desirable_weight=self.desirable_weight,
                                         undesirable_weight=self.undesirable_weight)
        good = batch.desirable.to(rewards.dtype)
        rewards = rewards.detach()
        sums = torch.stack([good.sum(), (rewards * good).sum(), (rewards * (1 - good)).sum(),
                            kl * batch.num_examples])
        if batch.padding:
            return losses.sum() * 0, sums * 0
        return losses.sum(), sums
