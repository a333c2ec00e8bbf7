"""The forgetting probe: what fine-tuning cost the model's general behaviour, measured inside every run.

Before training the base model answers a set of general prompts greedily (eval.probe: the ~100 built-in ones in
probe_prompts.jsonl beside this file, or the user's JSONL). Those answers, and the base's top-k next-token
log-probs along them, are the reference, saved once in OUTPUT/probe_reference.safetensors (a resumed run reads
the same file back: same prompts, same answers, same numbers). At every eval point and at the end:

- probe_nll: the current model's mean per-token negative log-likelihood of the base's answers (its step-0 value
  is the floor; a rise is drift away from what the base would say);
- probe_kl: the mean per-token KL(base || current) over the base's top-k tokens plus one bucket for the rest of
  the vocabulary (a lower bound of the full KL, tight when the top k hold most of the mass). Stored log-probs
  serve every method alike: full fine-tuning keeps no second model, adapter methods no extra forward, and the
  value is exactly 0 at step 0 for every method, soft prompts included (their random start is the reference);
- the instruction tax, at the start and the end (and at eval points with eval.probe_generate): sampled answers
  (fixed seed) to the open-ended prompts give probe_distinct2 (distinct bigrams / bigrams, over all answers),
  probe_repetition (share of repeated 4-grams within an answer) and probe_length (mean tokens).

Decoding is models/decoding.py's batched loop over the model's forward with a KV cache, never HF generate(),
which would skip prefix tuning's prefixes. Under torchrun only rank 0 probes.

One decoding pass at the start and one at the end: when the model at step 0 is the base (full fine-tuning;
adapters that start as the identity), the top-k are taken at each step of the greedy decode itself (`Along`), the
instruction tax's sampled answers decode in the same batch (forks of their prompts' prefill), and a measure
decodes the same answers again, forced, in the same batches and steps — so the model at step 0 measures exactly
what it stored (a measure without the tax, at an eval point, runs the greedy rows alone: the same numbers to
float rounding). Before, the probe decoded greedily, scored the answers in a second forward and sampled in a
third pass; on the demo its time fell from 64 s to ~40 s. Soft prompts and prefixes start random, not as the
base: the base answers with them disabled and a forward of the model as it is scores the answers (`score`), as
references written before this choice existed are also measured (Reference.scored_by).

The prompts, once templated, share a long token prefix (a template's default system prompt and the user's header:
most of a short prompt's tokens). Its keys and values are computed once per decoding or scoring pass and copied
along each batch (SharedPrefix), so only each row's own tokens run through the model; the numbers are those of
the unshared forward to float rounding, and the reference and every later measurement take the same path, so
probe_kl at step 0 is still exactly 0.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sftlab.config import Config
from sftlab.data.batching import Batch, collate
from sftlab.data.encode import IGNORE_INDEX, Example, prompt_token_ids
from sftlab.data.formats import Row, conversations_from_rows, iter_rows
from sftlab.data.schema import message_record
from sftlab.data.stop_tokens import stop_token_ids
from sftlab.data.templates import ChatTemplate, load_template
from sftlab.errors import ConfigError, DataError
from sftlab.methods.base import Method
from sftlab.models import decoding
from sftlab.models.decoding import SharedPrefix

BUILTIN = Path(__file__).with_name("probe_prompts.jsonl")
"""The built-in probe set: one JSON object a line, {"id", "kind", "open", "messages"}; `kind` is one of fact,
instruction, writing, arithmetic, code, multilingual, advice; `open` marks prompts with many good answers (the
instruction-tax prompts); `messages` ends with the user's turn, the answer to come."""
REFERENCE_FILE = "probe_reference.safetensors"
"""OUTPUT/<this>: the base's answers and top-k log-probs, written once before training."""
TEMPERATURE, TOP_P = 0.7, 0.9
"""The sampled (instruction-tax) answers: generate.py's defaults."""
CHUNK = 512
"""Answer positions whose logits are computed at once."""


@dataclass(frozen=True)
class ProbePrompt:
    messages: tuple[dict[str, str], ...]
    open: bool = False
    id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    """The row's other fields (sftlab eval's tasks read their `check` here)."""


def read_prompts(spec: str) -> list[ProbePrompt]:
    """eval.probe's prompts: `builtin`, `none` (no prompts) or a JSONL file of conversations that end with the
    user's turn. A bad row fails with its file:line and the fix."""
    if spec == "none":
        return []
    path = BUILTIN if spec == "builtin" else Path(spec)
    if not path.is_file():
        raise ConfigError(f"eval.probe: {spec} is not builtin, none or an existing JSONL file; give the path of a "
                          "file of {\"messages\": [...]} rows that end with the user's turn.")
    prompts = [_prompt(row) for row in iter_rows(path)]
    if not prompts:
        raise DataError(f"{path}: no prompts; expected one {{\"messages\": [...]}} object a line.")
    return prompts


def _prompt(row: Row) -> ProbePrompt:
    """One row as a prompt: validated as a conversation whose assistant answer is still to come."""
    if row.error is not None:
        raise row.error
    value = row.value
    if not isinstance(value, dict) or not isinstance(value.get("messages"), list) or not value["messages"]:
        raise DataError("expected an object with a non-empty \"messages\" list of {role, content}; fix the row.",
                        where=row.where)
    last = value["messages"][-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        raise DataError("the last message must be the user's (the probe asks the model for the answer); drop the "
                        "final answer from the row.", where=row.where)
    if not isinstance(value.get("open", False), bool):
        raise DataError(f"\"open\" must be true or false, found {value['open']!r}.", where=row.where)
    answered = {**value, "messages": [*value["messages"], {"role": "assistant", "content": "-"}]}
    conversation = next(conversations_from_rows([Row(row.where, row.raw, answered)], format="messages"))
    messages = tuple(message_record(m) for m in conversation.messages[:-1])
    extra = {k: v for k, v in value.items() if k not in ("messages", "open", "id")}
    return ProbePrompt(messages, bool(value.get("open", False)), str(value.get("id", row.where)), extra)


@dataclass
class Reference:
    """What the base said: per prompt its token ids and greedy answer ids; per answer token the base's top-k."""
    prompts: list[ProbePrompt]
    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]
    answers: list[str]
    top_ids: torch.Tensor
    """(N, k) int64: the base's k most likely next tokens at each of the N answer tokens, in answer order."""
    top_logps: torch.Tensor
    """(N, k) float32: their log-probs."""
    base: dict[str, Any] = field(default_factory=dict)
    """The base's own numbers: probe_nll at step 0, its instruction-tax values, its sampled answers."""
    scored_by: str = "score"
    """How the top-k were taken, and so how every measure against them is: "decode" (along the greedy decode
    itself; measures decode the answers again, forced) or "score" (a forward over prompt + answer; references
    written before there was a choice are this)."""


def save_reference(reference: Reference, path: Path) -> None:
    record = {"prompts": [{"id": p.id, "open": p.open, "messages": list(p.messages)} for p in reference.prompts],
              "prompt_ids": reference.prompt_ids, "answer_ids": reference.answer_ids, "answers": reference.answers,
              "base": reference.base, "scored_by": reference.scored_by}
    save_file({"top_ids": reference.top_ids.contiguous(), "top_logps": reference.top_logps.contiguous()}, str(path),
              metadata={"sftlab_probe": json.dumps(record, ensure_ascii=False)})


def load_reference(path: Path) -> Reference:
    with safe_open(str(path), framework="pt") as opened:
        record = json.loads(opened.metadata()["sftlab_probe"])
        top_ids, top_logps = opened.get_tensor("top_ids"), opened.get_tensor("top_logps")
    prompts = [ProbePrompt(tuple(p["messages"]), p["open"], p["id"]) for p in record["prompts"]]
    return Reference(prompts, record["prompt_ids"], record["answer_ids"], record["answers"], top_ids, top_logps,
                     record["base"], record.get("scored_by", "score"))


class Prober:
    """The probe of one model: decoding and scoring the prompts, in batches of eval.probe_batch_size."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, method: Method | None, cfg: Config, *,
                 device: torch.device, pad_id: int, template: ChatTemplate | None = None) -> None:
        self.model, self.tokenizer, self.method, self.cfg = model, tokenizer, method, cfg
        self.device, self.pad_id = device, pad_id
        self.template: ChatTemplate = template or load_template(cfg.data.template, tokenizer)
        self.stops = set(stop_token_ids(tokenizer, self.template))
        self.share_prefix = True
        """Whether the prompts' shared prefix is computed once per pass (off: every row runs whole; the tests
        compare the two)."""

    def encode(self, prompt: ProbePrompt) -> list[int]:
        segments = self.template.render_prompt(prompt.messages)
        return prompt_token_ids(self.tokenizer, segments,
                                special_tokens_in_content=self.cfg.data.special_tokens_in_content)

    def reference(self, prompts: list[ProbePrompt]) -> Reference:
        """The base's greedy answers and the model's own top-k along them, at step 0 (the model as the run
        starts), so that probe_kl starts at exactly 0.

        When the model's forward at step 0 is the base's (plain_forward: full fine-tuning, and adapters that
        start as the identity — LoRA's B = 0, a bottleneck's zero up-projection), the model as it is answers,
        and the top-k are taken along the way, at each decoding step: one pass over the answers instead of a
        decode and a second forward to score them. Otherwise (virtual tokens or prefixes, which start random)
        the base answers with the method's parts disabled, and a forward of the model as it is scores them."""
        prompt_ids = [self.encode(p) for p in prompts]
        if plain_forward(self.method):  # the instruction tax's sampled answers in the same batch, forked
            along = Along(keep_top=self.cfg.eval.probe_top_k)
            answer_ids, samples = self._along(prompt_ids, open_rows(prompts), watch=along)
            nll, (top_ids, top_logps) = along.nll(), along.top(answer_ids)
            reference = Reference(prompts, prompt_ids, answer_ids, [self.text(a) for a in answer_ids], top_ids,
                                  top_logps, scored_by="decode")
            reference.base = {"probe_nll": nll, **self._tax_of(samples)}
            return reference
        with base_view(self.method, self.model):
            answer_ids = self.decode(prompt_ids, sampled=False, plain=True)
        nll, top_ids, top_logps = self.score(prompt_ids, answer_ids, keep_top=self.cfg.eval.probe_top_k)
        reference = Reference(prompts, prompt_ids, answer_ids, [self.text(a) for a in answer_ids], top_ids,
                              top_logps, scored_by="score")
        with base_view(self.method, self.model):
            reference.base = {"probe_nll": nll, **self.tax(reference, plain=True)}
        return reference

    def measure(self, reference: Reference, *, generate: bool) -> dict[str, Any]:
        """probe_nll and probe_kl of the current model (and its instruction tax with `generate`): taken the way
        the reference's top-k were (Reference.scored_by), so that the model at step 0 gives exactly 0."""
        if reference.scored_by == "decode" and plain_forward(self.method):
            along = Along(against=reference)
            _, samples = self._along(reference.prompt_ids, open_rows(reference.prompts) if generate else [],
                                     watch=along, forced=reference.answer_ids)
            return {"probe_nll": along.nll(), "probe_kl": along.kl(), **(self._tax_of(samples) if generate else {})}
        nll, kl = self.score(reference.prompt_ids, reference.answer_ids, against=reference)
        found: dict[str, Any] = {"probe_nll": nll, "probe_kl": kl}
        if generate:
            found.update(self.tax(reference))
        return found

    def _along(self, prompt_ids: list[list[int]], sampled: list[int], *, watch: Along,
               forced: list[list[int]] | None = None) -> tuple[list[list[int]], list[list[int]]]:
        """The greedy answers (or `forced` ones) with `watch` along them, and in the same batches the sampled
        answers to the prompts `sampled` (forks of their prefill): one decoding pass where there were two. The
        reference and every measure with the instruction tax take the same batches, so the model at step 0
        measures exactly what it stored; a measure without it (an eval point) runs the greedy rows alone."""
        found = self.decode(prompt_ids, sampled=False, plain=True, watch=watch, forced=forced, also_sampled=sampled,
                            generator=self._generator())
        return found[:len(prompt_ids)], found[len(prompt_ids):]

    def tax(self, reference: Reference, *, plain: bool = False) -> dict[str, Any]:
        """Sampled answers (seed train.seed) to the open-ended prompts and their diversity numbers."""
        chosen = open_rows(reference.prompts)
        if not chosen:
            return {}
        answers = self.decode([reference.prompt_ids[i] for i in chosen], sampled=True, plain=plain,
                              generator=self._generator())
        return self._tax_of(answers)

    def _tax_of(self, answers: list[list[int]]) -> dict[str, Any]:
        return {**tax_numbers(answers), "samples": [self.text(a) for a in answers]} if answers else {}

    def _generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.cfg.train.seed)

    def text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.stops], skip_special_tokens=True)

    def decode(self, prompt_ids: list[list[int]], *, sampled: bool, plain: bool,
               generator: torch.Generator | None = None, forced: list[list[int]] | None = None,
               watch: decoding.Watch | None = None, also_sampled: Sequence[int] = ()) -> list[list[int]]:
        """Answer ids (ending with the stop token when one came). A plain forward is the model itself unless the
        method prepends virtual tokens or prefixes (then one prompt at a time through its prefill). `forced`:
        the answers are given (decoding.decode_rows), `watch` sees the logits along them. `also_sampled`: these
        prompts are also answered by sampling (with `generator`) in the same batches, from the same prefill;
        their answers follow, in that order (a plain forward only)."""
        plain = plain or plain_forward(self.method)
        if also_sampled and not plain:
            raise ValueError("also_sampled needs the model's plain forward")
        size = self.cfg.eval.probe_batch_size if plain else 1
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                prefix = self.prefix(prompt_ids, plain=plain)
                answers: list[list[int]] = []
                forked: dict[int, list[int]] = {}
                for start in range(0, len(prompt_ids), size):
                    chunk = prompt_ids[start:start + size]
                    forks = [i - start for i in also_sampled if start <= i < start + size]
                    found = self._decode_batch(chunk, sampled=sampled, plain=plain, generator=generator, prefix=prefix,
                                               forced=None if forced is None else forced[start:start + size],
                                               watch=None if watch is None else _offset(watch, start), forks=forks)
                    answers += found[:len(chunk)]
                    forked.update({start + i: answer for i, answer in zip(forks, found[len(chunk):])})
                return answers + [forked[i] for i in also_sampled]
        finally:
            self.model.train(was_training)

    def prefix(self, rows: list[list[int]], *, plain: bool) -> SharedPrefix:
        """The rows' shared prefix with its KV cache, computed once at batch 1 by the model as it is now (empty
        when sharing is off, the forward is not the model's plain one, or the model's cache cannot be copied)."""
        if not (plain and self.share_prefix):
            return decoding.NO_PREFIX
        return decoding.shared_prefix(self.model, rows, device=self.device)

    def _decode_batch(self, prompts: list[list[int]], *, sampled: bool, plain: bool,
                      generator: torch.Generator | None, prefix: SharedPrefix, forced: list[list[int]] | None = None,
                      watch: decoding.Watch | None = None, forks: list[int] | None = None) -> list[list[int]]:
        """The prompts decoded together against a KV cache (models/decoding.py), the shared prefix's cache in
        front; greedy, or top-p at TEMPERATURE with `generator`. A plain forward prefills them shortest first in
        left-padded groups and decodes one batch that each row leaves at its stop token (decode_rows); a method's
        prefill takes one prompt (decode_batch)."""
        sampler = decoding.top_p_sampler(temperature=TEMPERATURE, top_p=TOP_P, generator=generator)
        pick = sampler if sampled else decoding.greedy
        limit = self.cfg.eval.probe_max_new_tokens
        if plain:  # prompts prefilled shortest first in groups (little padding), decoded as one batch that rows leave
            return decoding.decode_rows(self.model, prompts, caps=[limit] * len(prompts), stops=self.stops,
                                        pad_id=self.pad_id, device=self.device, pick=pick, prefix=prefix,
                                        forced=forced, watch=watch,
                                        forks=decoding.Forks(forks, sampler, limit) if forks else None)
        return decoding.decode_batch(self.model, prompts, stops=self.stops, pad_id=self.pad_id, device=self.device,
                                     max_new_tokens=limit, pick=pick, prefix=prefix, prefill=self.method.prefill,
                                     forced=forced, watch=watch)

    def score(self, prompt_ids: list[list[int]], answer_ids: list[list[int]], *, keep_top: int = 0,
              against: Reference | None = None) -> tuple[Any, ...]:
        """Mean NLL of the answers under the current model, and either its top-`keep_top` (ids, log-probs) per
        answer token, or the mean KL from `against`'s stored top-k. Rows go through shortest first (each batch
        padded only to its own longest row), their tokens' results put back in answer order."""
        size = self.cfg.eval.probe_batch_size
        starts = [0, *itertools.accumulate(len(a) for a in answer_ids)]  # row i's tokens: starts[i]:starts[i + 1]
        top_ids = torch.zeros((starts[-1], keep_top), dtype=torch.long)
        top_logps = torch.zeros((starts[-1], keep_top), dtype=torch.float32)
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(answer_ids[i]))
        nll_sum, kl_sum = 0.0, 0.0
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                prefix = self.prefix(prompt_ids, plain=plain_forward(self.method))
                for chosen in (order[start:start + size] for start in range(0, len(order), size)):
                    batch = answer_batch([prompt_ids[i][prefix.length:] for i in chosen],
                                         [answer_ids[i] for i in chosen], self.pad_id)
                    tokens = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in chosen])
                    done = 0
                    for logps, targets in self._logps(batch.to(self.device), prefix):  # (n, V) fp32, (n,)
                        rows, done = tokens[done:done + logps.shape[0]], done + logps.shape[0]
                        nll_sum += float(-logps.gather(1, targets[:, None]).sum())
                        if against is not None:
                            kl_sum += float(top_k_kl(against.top_ids[rows], against.top_logps[rows], logps).sum())
                        else:
                            values, indices = logps.topk(keep_top, dim=-1)
                            top_ids[rows], top_logps[rows] = indices.cpu(), values.cpu()
        finally:
            self.model.train(was_training)
        count = max(starts[-1], 1)
        return (nll_sum / count, kl_sum / count) if against is not None else (nll_sum / count, top_ids, top_logps)

    def _logps(self, batch: Batch, prefix: SharedPrefix) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Log-probs (n, V) over the vocabulary at the batch's supervised positions, in answer order, CHUNK
        positions at a time (the logits' memory bounded whatever the vocabulary), with their targets (n,). The
        batch's rows continue the shared prefix (when it has one)."""
        if prefix.length:
            mask = prefix.masked(batch.attention_mask)
            hidden = self.model.base_model(input_ids=batch.input_ids, attention_mask=mask, use_cache=True,
                                           position_ids=batch.position_ids + prefix.length,
                                           **prefix.copied(batch.input_ids.shape[0]))[0]
        else:
            hidden = (self.method.hidden_states(self.model, batch) if self.method is not None
                      else self.model.base_model(**batch.model_inputs(), use_cache=False)[0])
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.loss_index)
        head = self.model.get_output_embeddings()
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        for part, targets in zip(hidden.split(CHUNK), batch.loss_targets.split(CHUNK)):
            logits = head(part).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            yield torch.log_softmax(logits, dim=-1), targets


class Along:
    """What a decode measures along the answers it takes (a decoding.Watch): the mean NLL of the tokens taken,
    and either the top-`keep_top` (ids, log-probs) at each answer token (the reference, while the greedy answers
    are picked) or the mean KL from `against`'s top-k (a measure, the reference's answers forced). Its sums run
    in the decoder's order, the same in both, so the model at step 0 measures exactly what it stored."""

    def __init__(self, *, keep_top: int = 0, against: Reference | None = None) -> None:
        self.keep_top, self.against = keep_top, against
        self.nll_sum, self.kl_sum, self.count = 0.0, 0.0, 0
        self.kept: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.starts: list[int] = []
        if against is not None:
            self.starts = [0, *itertools.accumulate(len(a) for a in against.answer_ids)]

    def __call__(self, rows: list[int], positions: list[int], logits: torch.Tensor, tokens: torch.Tensor) -> None:
        logps = torch.log_softmax(logits.float(), dim=-1)
        self.nll_sum += float(-logps.gather(1, tokens.to(logps.device)[:, None]).sum())
        self.count += len(rows)
        if self.against is not None:
            index = torch.tensor([self.starts[i] + at for i, at in zip(rows, positions)])
            self.kl_sum += float(top_k_kl(self.against.top_ids[index], self.against.top_logps[index], logps).sum())
        else:
            values, indices = (t.cpu() for t in logps.topk(self.keep_top, dim=-1))  # one copy a step, not a row
            for r, (i, at) in enumerate(zip(rows, positions)):
                self.kept[(i, at)] = (indices[r], values[r])

    def nll(self) -> float:
        return self.nll_sum / max(self.count, 1)

    def kl(self) -> float:
        return self.kl_sum / max(self.count, 1)

    def top(self, answers: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept top-k (N, k) in answer order."""
        if not any(answers):
            return (torch.zeros((0, self.keep_top), dtype=torch.long), torch.zeros((0, self.keep_top)))
        pairs = [self.kept[(i, at)] for i, answer in enumerate(answers) for at in range(len(answer))]
        return torch.stack([ids for ids, _ in pairs]), torch.stack([logps for _, logps in pairs])


def _offset(watch: decoding.Watch, start: int) -> decoding.Watch:
    """`watch` for a batch of prompts that starts at `start` in the whole list (the decoder numbers them from 0)."""
    if start == 0:
        return watch
    return lambda rows, positions, logits, tokens: watch([start + i for i in rows], positions, logits, tokens)


def answer_batch(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> Batch:
    """Right-padded prompt + answer rows, only the answer's tokens supervised (row-major = answer order)."""
    examples = [Example(p + a, [IGNORE_INDEX] * len(p) + a) for p, a in zip(prompts, answers)]
    return collate(examples, pad_id=pad_id)


def top_k_kl(top_ids: torch.Tensor, top_logps: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    """Per position KL(base || current) over the base's top-k tokens plus one bucket for all the others (n,).
    Identical distributions give exactly 0: every term is computed the same way from the same numbers."""
    top_ids, top_logps = top_ids.to(logps.device), top_logps.to(logps.device)
    current = logps.gather(1, top_ids)  # (n, k)
    head = (top_logps.exp() * (top_logps - current)).sum(-1)
    rest_base = (1 - top_logps.exp().sum(-1)).clamp(min=0)
    rest_current = (1 - current.exp().sum(-1)).clamp(min=1e-12)
    tail = torch.where(rest_base > 0, rest_base * (rest_base.clamp(min=1e-12).log() - rest_current.log()),
                       torch.zeros_like(rest_base))
    return (head + tail).clamp(min=0)


def tax_numbers(answers: list[list[int]]) -> dict[str, float]:
    """probe_distinct2 (distinct bigrams / bigrams over all answers), probe_repetition (mean share of an answer's
    4-grams that repeat an earlier one of the same answer), probe_length (mean tokens)."""
    bigrams = [tuple(a[i:i + 2]) for a in answers for i in range(len(a) - 1)]
    shares = []
    for answer in answers:
        grams = [tuple(answer[i:i + 4]) for i in range(len(answer) - 3)]
        if grams:
            shares.append(1 - len(set(grams)) / len(grams))
    return {"probe_distinct2": len(set(bigrams)) / max(len(bigrams), 1),
            "probe_repetition": sum(shares) / max(len(shares), 1),
            "probe_length": sum(len(a) for a in answers) / max(len(answers), 1)}


def open_rows(prompts: Sequence[ProbePrompt]) -> list[int]:
    """The indices of the open-ended prompts (the instruction tax's)."""
    return [i for i, p in enumerate(prompts) if p.open]


def plain_forward(method: Method | None) -> bool:
    """Whether the model's plain forward is the trained model (no virtual tokens or prefixes to prepend)."""
    return method is None or (type(method).prefill is Method.prefill and
                              type(method).hidden_states is Method.hidden_states)


def base_view(method: Method | None, model: torch.nn.Module) -> Any:
    """The base model: the method's parts disabled, or (a method that trains the base weights themselves, or
    none) the model as it is, which before training is the base."""
    import contextlib

    if method is None or type(method).whole_model:
        return contextlib.nullcontext()
    return method.adapters_disabled(model)


def finite(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value)
