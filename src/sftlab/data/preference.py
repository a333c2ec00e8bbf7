"""Preference pairs: rows -> Pair(prompt, chosen, rejected) -> two examples sharing the prompt's tokens.

Row forms (`prompt`, `chosen`, `rejected` each a string or a list of {role, content} messages):
- explicit: {"prompt", "chosen", "rejected"}. The prompt is the shared conversation before the answer (a string
  is one user message); chosen and rejected are the final assistant turn (a string, or a list holding exactly
  one assistant message).
- implicit: {"chosen": messages, "rejected": messages}, two whole conversations. Everything before their final
  assistant message is the prompt and must be the same in both.

Each side is rendered through the same chat template as supervised data, as prompt + answer with only the
answer trained: the scored tokens are the answer's content and the end-of-turn marker that closes it — nothing
of the prompt, the role headers or the template's own text. Both encodings must agree token for token on
everything before the answer (the shared prompt), or the row is refused. Tokens after the end-of-turn marker (a
template's trailing newline) are cut: no scored prediction depends on them.

On disk a pair dataset is an ordinary encoded dataset (data/dataset.py layout) whose example 2i is pair i's
chosen side and 2i+1 its rejected side; `PairDataset` reads it pair by pair.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sftlab.config import DataConfig
from sftlab.data.batching import Batch, collate, collate_packed
from sftlab.data.dataset import DatasetStats, EncodedDataset, Written, build_dataset, write_examples
from sftlab.data.encode import IGNORE_INDEX, NOTHING_TRAINED, TOO_LONG, Dropped, Encoded, Encoder, Example
from sftlab.data.formats import _message_list, _require, _tools, items_from_rows
from sftlab.data.parallel import RowReader
from sftlab.data.rejects import RejectLog
from sftlab.data.schema import Conversation, Message, message_record, validate
from sftlab.data.sources import Source, resolve, source_rows
from sftlab.errors import DataError

PROMPTS_DIFFER = "prompts differ"


@dataclass(frozen=True)
class Pair:
    prompt: tuple[Message, ...]
    """The shared conversation before the answer: an optional system message, then user/assistant turns
    ending with a user message."""
    chosen: Message
    rejected: Message
    where: str = ""
    tools: tuple[Any, ...] | None = None
    """The row's tool definitions, rendered with both sides (an answer may be a tool call)."""

    def conversations(self) -> tuple[Conversation, Conversation]:
        """(prompt + chosen, prompt + rejected), with only the answer trained whatever the row's own flags."""
        prompt = tuple(replace(m, train=False) for m in self.prompt)
        return (Conversation(prompt + (replace(self.chosen, train=True),), self.where, self.tools),
                Conversation(prompt + (replace(self.rejected, train=True),), self.where, self.tools))


def is_preference_row(value: Any) -> bool:
    """Whether a row means to be a pair (it has 'chosen' or 'rejected'; to_pair checks the rest)."""
    return isinstance(value, Mapping) and ("chosen" in value or "rejected" in value)


def to_pair(row: Any, where: str, role_map: Mapping[str, str] | None = None) -> Pair:
    """A validated Pair from one row of either form; raises DataError naming `where`."""
    role_map = dict(role_map or {})
    chosen = _require(row, "chosen", "the preferred answer: a string or a list of messages", where)
    rejected = _require(row, "rejected", "the dispreferred answer: a string or a list of messages", where)
    if row.get("prompt") is not None:
        prompt = _prompt_messages(row["prompt"], where, role_map)
        pair = Pair(prompt, _answer(chosen, "chosen", where, role_map),
                    _answer(rejected, "rejected", where, role_map), where)
    else:
        pair = _implicit_pair(chosen, rejected, where, role_map)
    pair = replace(pair, tools=_tools(row, where))
    for conversation in pair.conversations():
        validate(conversation)
    if replace(pair.chosen, train=None) == replace(pair.rejected, train=None):
        raise DataError("'chosen' and 'rejected' are the same answer, so the pair states no preference; fix the "
                        "row or remove it.", where=where, reason="chosen equals rejected")
    return pair


def _prompt_messages(prompt: Any, where: str, role_map: Mapping[str, str]) -> tuple[Message, ...]:
    if isinstance(prompt, str):
        if not prompt:
            raise DataError("field 'prompt' is empty; expected the user's message or a list of messages.",
                            where=where, reason="empty content")
        return (Message("user", prompt),)
    return tuple(_message_list(prompt, "prompt", where, role_map))


def _answer(value: Any, field: str, where: str, role_map: Mapping[str, str]) -> Message:
    """One assistant message from a string or a one-message list."""
    if isinstance(value, str):
        return Message("assistant", value)
    messages = _message_list(value, field, where, role_map)
    if len(messages) != 1 or messages[0].role != "assistant":
        found = ", ".join(repr(m.role)[:40] for m in messages[:4]) + (", ..." if len(messages) > 4 else "") \
            if messages else "nothing"
        raise DataError(f"field {field!r} holds {found}; expected one assistant message (the final turn). Put "
                        "earlier turns in 'prompt'.", where=where, reason=f"{field} not one assistant message")
    return messages[0]


def _implicit_pair(chosen: Any, rejected: Any, where: str, role_map: Mapping[str, str]) -> Pair:
    """{"chosen": messages, "rejected": messages}: the prompt is everything before the final message."""
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, list):
            raise DataError(f"field {field!r} is a {type(value).__name__} and the row has no 'prompt'; expected "
                            "whole conversations (lists of messages) in 'chosen' and 'rejected', or a 'prompt' "
                            "field with the shared part.", where=where, reason="no prompt")
    chosen_messages = _message_list(chosen, "chosen", where, role_map)
    rejected_messages = _message_list(rejected, "rejected", where, role_map)
    for field, messages in (("chosen", chosen_messages), ("rejected", rejected_messages)):
        if not messages or messages[-1].role != "assistant":
            last = messages[-1].role if messages else "nothing"
            raise DataError(f"the conversation in {field!r} ends with {repr(last)[:40]}; expected it to end with the "
                            "assistant answer being compared.", where=where, reason="trailing user turn")
    prompt, other = chosen_messages[:-1], rejected_messages[:-1]
    for index in range(max(len(prompt), len(other))):
        mine = prompt[index] if index < len(prompt) else None
        theirs = other[index] if index < len(other) else None
        if mine is None or theirs is None or replace(mine, train=None) != replace(theirs, train=None):
            raise DataError(f"'chosen' and 'rejected' differ at message {index + 1}, before their final assistant "
                            "answers; expected the same conversation up to the answer (its shared part is the "
                            "prompt). Make the two prefixes identical, or give the prompt as a 'prompt' field.",
                            where=where, reason=PROMPTS_DIFFER)
    return Pair(tuple(prompt), chosen_messages[-1], rejected_messages[-1], where)


def read_pairs(path: str | Path | Source, *, role_map: Mapping[str, str] | None = None, on_bad_row: str = "error",
               rejects: RejectLog | None = None, max_row_bytes: int | None = None) -> Iterator[Pair]:
    """Stream valid pairs from a source (a file, glob, dataset dir or hub id). A bad row, or one of more than
    `max_row_bytes` bytes (never parsed; see `pair_row_limit`), raises DataError (`error`) or goes to `rejects`
    (`skip`)."""
    return items_from_rows(source_rows(path, max_row_bytes=max_row_bytes),
                           lambda value, where: to_pair(value, where, role_map), accepts=is_preference_row,
                           kind="a preference pair", expected="'chosen' and 'rejected' (and 'prompt', unless both "
                           "are whole conversations)", reason="not a preference row", on_bad_row=on_bad_row,
                           rejects=rejects)


def pair_row_limit(encoder: Encoder) -> int | None:
    """Most bytes of a pair row: two sides' worth of the encoder's row limit (a pair holds two answers)."""
    return None if encoder.row_limit is None else 2 * encoder.row_limit


@dataclass(frozen=True)
class EncodedPair:
    chosen: Example
    rejected: Example
    prompt_tokens: int
    """Tokens before the answer, the same ids on both sides."""
    truncated: bool = False
    special_tokens_in_content: int = 0
    """Special-token strings found in the pair's contents, both sides (see Encoded)."""

    @property
    def where(self) -> str:
        return self.chosen.where


class PairEncoder:
    """Pairs -> EncodedPair through an Encoder (its tokenizer, template, max_seq_len and truncation; not its
    train_on: only the answer is ever scored)."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = copy.copy(encoder)  # shares the tokenizer; train_on=all would also score template text
        self.encoder.train_on = "last_assistant"
        # data.max_seq_len applies to what trains: each side cut after its answer's end-of-turn (`_cut`), not
        # the whole render (a template may add text after the last turn).
        self.max_seq_len, self.truncation = encoder.max_seq_len, encoder.truncation
        self.encoder.max_seq_len = None

    def encode(self, pair: Pair) -> EncodedPair:
        (result,) = self.encode_batch([pair])
        if isinstance(result, DataError):
            raise result
        return result

    def encode_batch(self, pairs: Sequence[Pair]) -> list[EncodedPair | DataError]:
        """Each entry is the EncodedPair or the DataError / Dropped for that row."""
        results = self.encoder.encode_batch([c for pair in pairs for c in pair.conversations()])
        return [self._limit(_join(c, r)) for c, r in zip(results[0::2], results[1::2])]

    def _limit(self, pair: EncodedPair | DataError) -> EncodedPair | DataError:
        """data.max_seq_len and data.truncation on the pair's sides, as the Encoder applies them to examples."""
        limit = self.max_seq_len
        if isinstance(pair, DataError) or limit is None:
            return pair
        longest = max(len(pair.chosen.input_ids), len(pair.rejected.input_ids))
        if longest <= limit:
            return pair
        if self.truncation == "drop":
            return Dropped(f"{longest} tokens is more than data.max_seq_len={limit}; dropped (data.truncation=drop). "
                           "Raise max_seq_len or set data.truncation=truncate.", where=pair.where, reason=TOO_LONG)
        if pair.prompt_tokens >= limit:
            return Dropped(f"no token is trained after truncation to data.max_seq_len={limit}; dropped. Raise "
                           "max_seq_len or shorten the prompt.", where=pair.where, reason=NOTHING_TRAINED)
        sides = [Example(side.input_ids[:limit], side.labels[:limit], side.where)
                 for side in (pair.chosen, pair.rejected)]
        return EncodedPair(*sides, pair.prompt_tokens, truncated=True,
                           special_tokens_in_content=pair.special_tokens_in_content)

    def encode_stream(self, batches: Iterable[Sequence[Pair]]
                      ) -> Iterator[tuple[Sequence[Pair], list[EncodedPair | DataError]]]:
        """encode_batch over a stream of batches, the next batch encoding on a worker thread meanwhile."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for batch in batches:
                future = pool.submit(self.encode_batch, batch)
                if pending is not None:
                    yield pending[0], pending[1].result()
                pending = (batch, future)
            if pending is not None:
                yield pending[0], pending[1].result()


def _join(chosen: Encoded | DataError, rejected: Encoded | DataError) -> EncodedPair | DataError:
    """Check the two sides share their prompt tokens; cut each after its last scored token."""
    for side in (chosen, rejected):
        if isinstance(side, DataError):
            return side
    where = chosen.where
    starts = [int(np.argmax(side.trained)) for side in (chosen, rejected)]
    if starts[0] != starts[1] or not np.array_equal(chosen.ids[:starts[0]], rejected.ids[:starts[1]]):
        return DataError("the chat template renders the prompt differently before the chosen answer than before "
                         f"the rejected one ({starts[0]} vs {starts[1]} tokens), so the two are not scored in the "
                         "same context. Use a template that renders earlier turns independently of the last "
                         "answer (e.g. data.template=chatml).", where=where, reason=PROMPTS_DIFFER)
    return EncodedPair(_cut(chosen), _cut(rejected), starts[0], chosen.truncated or rejected.truncated,
                       chosen.special_tokens_in_content + rejected.special_tokens_in_content)


def _cut(encoded: Encoded) -> Example:
    end = len(encoded.trained) - int(np.argmax(encoded.trained[::-1]))  # one past the last trained token
    example = encoded.example
    return Example(example.input_ids[:end], example.labels[:end], example.where)


@dataclass(frozen=True)
class PairBatch:
    """P pairs as one batch of 2P sequences: the P chosen sides, then the P rejected sides in the same order
    (rows of a padded batch, or consecutive examples of one packed row)."""
    batch: Batch
    num_pairs: int
    sequence_index: torch.Tensor
    """(N,) which of the 2P sequences each supervised position of `batch` (loss_index) belongs to."""
    sequence_tokens: torch.Tensor
    """(2P,) float: scored tokens of each sequence."""
    reference_logps: torch.Tensor | None = None
    """(2P,) precomputed reference log-probabilities of the sequences, or None (computed each step)."""
    padding: bool = False
    """A stand-in that counts for nothing (its losses and metrics are multiplied by 0): what a rank runs when
    the eval batches ran out before its turn, so that the other ranks' collectives still meet."""
    context_index: torch.Tensor | None = None
    """(M,) flat indices of the chosen sides' unscored positions that predict a token (the prompt after its first
    token): what ORPO's orpo.nll=sequence also trains; None otherwise (`with_chosen_context`)."""
    context_targets: torch.Tensor | None = None
    """(M,) the token each of them predicts."""

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens

    @property
    def num_supervised(self) -> int:
        return self.batch.num_supervised

    @property
    def where(self) -> tuple[str, ...]:
        return self.batch.where[:self.num_pairs]

    def model_inputs(self) -> dict[str, object]:
        return self.batch.model_inputs()

    def to(self, device: torch.device | str) -> PairBatch:
        moved = {name: None if value is None else value.to(device, non_blocking=True)
                 for name, value in (("sequence_index", self.sequence_index), ("sequence_tokens", self.sequence_tokens),
                                     ("reference_logps", self.reference_logps), ("context_index", self.context_index),
                                     ("context_targets", self.context_targets))}
        return replace(self, batch=self.batch.to(device), **moved)


def collate_pairs(pairs: Sequence[tuple[Example, Example]], *, pad_id: int, packed: bool = False,
                  reference_logps: np.ndarray | None = None) -> PairBatch:
    """A PairBatch of `pairs` ((chosen, rejected) examples); `reference_logps` (P, 2) rides along if given."""
    examples = [chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs]
    batch = collate_packed(examples) if packed else collate(examples, pad_id=pad_id)
    if packed:  # position p of the row belongs to example e when cu[e] <= p < cu[e+1]
        sequence = torch.searchsorted(batch.cu_seqlens[1:].long(), batch.loss_index, right=True)
    else:
        sequence = torch.div(batch.loss_index, batch.input_ids.shape[1], rounding_mode="floor")
    tokens = torch.zeros(len(examples)).index_add_(0, sequence, torch.ones(len(sequence)))
    reference = None
    if reference_logps is not None:
        reference = torch.from_numpy(np.ascontiguousarray(np.asarray(reference_logps, dtype=np.float32).T)).reshape(-1)
    return PairBatch(batch, len(pairs), sequence, tokens, reference)


def with_chosen_context(batch: PairBatch, chosen: Sequence[Example]) -> PairBatch:
    """`batch` with the positions of its chosen sides (`chosen`, in batch order) whose target is not scored: every
    prompt token after the first. With the scored ones they make the whole chosen sequence, every token after the
    first, which ORPO's orpo.nll=sequence trains (TRL's ORPOTrainer)."""
    inner = batch.batch
    starts = inner.cu_seqlens[:-1].tolist() if inner.packed else [row * inner.input_ids.shape[1]
                                                                  for row in range(len(chosen))]
    index, targets = [], []
    for start, example in zip(starts, chosen):
        for t in range(len(example.input_ids) - 1):
            if example.labels[t + 1] == IGNORE_INDEX:
                index.append(start + t)
                targets.append(example.input_ids[t + 1])
    return replace(batch, context_index=torch.tensor(index, dtype=torch.long),
                   context_targets=torch.tensor(targets, dtype=torch.long))


class PairDataset:
    """Pairs over an encoded dataset whose example 2i is pair i's chosen side and 2i+1 its rejected side.

    Offers what the training loop's planning reads of an EncodedDataset (`lengths`, `len`, `stats`,
    `max_token_id`, `where`), per pair: a pair's length is its two sides' tokens together."""

    def __init__(self, examples: EncodedDataset) -> None:
        if len(examples) % 2:
            raise DataError(f"{examples.directory} holds {len(examples)} examples; a pair dataset holds two per pair.")
        self.examples = examples
        self.reference_logps: np.ndarray | None = None
        """(pairs, 2) reference log-probabilities (chosen, rejected) when precomputed before training."""

    def __len__(self) -> int:
        return len(self.examples) // 2

    @property
    def lengths(self) -> np.ndarray:
        sides = self.examples.lengths
        return sides[0::2] + sides[1::2]

    @property
    def stats(self) -> DatasetStats:
        return self.examples.stats

    @property
    def max_token_id(self) -> int:
        return self.examples.max_token_id

    def pair(self, index: int) -> tuple[Example, Example]:
        return self.examples[2 * index], self.examples[2 * index + 1]

    def where(self, index: int) -> str:
        return self.examples.where(2 * index)

    def collate(self, indices: Sequence[int], *, pad_id: int, packed: bool = False) -> PairBatch:
        chosen = [int(i) for i in indices]
        reference = None if self.reference_logps is None else self.reference_logps[chosen]
        return collate_pairs([self.pair(i) for i in chosen], pad_id=pad_id, packed=packed, reference_logps=reference)

    def close(self) -> None:
        self.examples.close()


def build_pair_dataset(data_path: str | Path | Source, data: DataConfig, encoder: Encoder, *,
                       rejects_path: str | Path | None = None) -> PairDataset:
    """Encode the pairs of `data_path` (or reuse the cached encoding); copy rejected rows to `rejects_path`."""
    return PairDataset(build_dataset(data_path, data, encoder, rejects_path=rejects_path, write=_write,
                                     rows="preference pairs"))


def _write(data_path: str | Path | Source, data: DataConfig, encoder: Encoder, directory: Path,
           settings: dict[str, Any]) -> None:
    """The encoded-dataset layout (data/dataset.py), two examples per pair; stats count examples (sides)."""
    write_examples(_Pairs(data_path, data, encoder), data, directory, settings, encoder.added_tokens)


class _Pairs:
    """Preference pairs as dataset.write_examples reads them (a RowKind)."""

    def __init__(self, data_path: str | Path | Source, data: DataConfig, encoder: Encoder) -> None:
        self.data_path, self.data, self.encoder = data_path, data, PairEncoder(encoder)
        self.row_limit = pair_row_limit(encoder)

    def read(self, on_bad_row: str, rejects: RejectLog | None, fields: Any = None) -> Iterator[Pair]:
        return read_pairs(self.data_path, role_map=_role_map(self.data_path, self.data), on_bad_row=on_bad_row,
                          rejects=rejects, max_row_bytes=self.row_limit)

    def validating_reader(self) -> RowReader:
        return validating_reader(read_pairs, self.data_path, self.data, self.row_limit)

    def encode_stream(self, batches: Iterable[Sequence[Pair]]) -> Iterator[tuple[Sequence[Pair], list[Any]]]:
        return self.encoder.encode_stream(batches)

    def written(self, item: Pair, result: EncodedPair) -> Written:
        sides = [(np.asarray(side.input_ids, dtype=np.int32), np.asarray(side.labels) != IGNORE_INDEX, side.where)
                 for side in (result.chosen, result.rejected)]
        return Written(sides, result.truncated, result.special_tokens_in_content > 0)

    def reject_row(self, item: Pair) -> str:
        return pair_row(item)

    def finish(self, directory: Path, stats: DatasetStats) -> dict[str, Any]:
        return {"pairs": stats.examples // 2}


def pair_row(pair: Pair) -> str:
    """A pair as an explicit-form row, so a rejected one can be fixed and fed back."""
    row: dict[str, Any] = {"prompt": [message_record(m) for m in pair.prompt], "chosen": [message_record(pair.chosen)],
                           "rejected": [message_record(pair.rejected)]}
    if pair.tools is not None:
        row["tools"] = list(pair.tools)
    return json.dumps(row, ensure_ascii=False)


def validating_reader(read: Any, data_path: str | Path | Source, data: DataConfig,
                      row_limit: int | None) -> RowReader:
    """A row kind's `read("error", None)` as a RowReader (the validation pass), for readers of the shape of
    read_pairs and read_feedback."""
    source = data_path if isinstance(data_path, Source) else resolve(data_path)
    settings = {"role_map": _role_map(data_path, data), "on_bad_row": "error", "rejects": None,
                "max_row_bytes": row_limit}
    return RowReader(read, (data_path,), settings, source.data_bytes())


def _role_map(data_path: str | Path | Source, data: DataConfig) -> Mapping[str, str]:
    """data.role_map, with a source's own role_map over it."""
    return {**data.role_map, **data_path.spec.role_map} if isinstance(data_path, Source) else data.role_map
