"""Unpaired feedback for stage kto: rows {prompt, completion, label} -> one example each, its answer scored.

Row forms (as TRL's KTOTrainer reads them): `prompt` a string (one user message) or a list of {role, content}
messages ending with a user turn; `completion` a string or a list holding exactly one assistant message; `label`
true (a desirable answer, thumbs-up) or false (undesirable). Each row is rendered through the chat template like a
preference pair's side (data/preference.py): only the answer's content and its end-of-turn marker are scored, and
tokens after that marker are cut.

On disk a feedback dataset is an ordinary encoded dataset (data/dataset.py layout), one example per row, plus
`desirable.bin` (one uint8 per example). A batch of B examples comes with B mismatched sequences for KTO's
reference-KL estimate: example i's prompt followed by example i−1's completion (cyclically within the batch, as
TRL's KTOTrainer pairs them), cut to data.max_seq_len.
"""

from __future__ import annotations

import copy
import json
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sftlab.config import DataConfig
from sftlab.data.batching import Batch, collate, collate_packed
from sftlab.data.dataset import DatasetStats, EncodedDataset, Written, build_dataset, write_examples
from sftlab.data.encode import IGNORE_INDEX, NOTHING_TRAINED, TOO_LONG, Dropped, Encoded, Encoder, Example
from sftlab.data.formats import _require, _tools, items_from_rows
from sftlab.data.parallel import RowReader
from sftlab.data.preference import _answer, _cut, _prompt_messages, _role_map, validating_reader
from sftlab.data.rejects import RejectLog
from sftlab.data.schema import Conversation, Message, message_record, validate
from sftlab.data.sources import Source, source_rows
from sftlab.errors import DataError


@dataclass(frozen=True)
class Feedback:
    prompt: tuple[Message, ...]
    completion: Message
    desirable: bool
    where: str = ""
    tools: tuple[Any, ...] | None = None
    """The row's tool definitions, rendered with the example (the completion may be a tool call)."""

    def conversation(self) -> Conversation:
        """prompt + completion, only the completion trained whatever the row's own flags."""
        prompt = tuple(replace(m, train=False) for m in self.prompt)
        return Conversation(prompt + (replace(self.completion, train=True),), self.where, self.tools)


def is_feedback_row(value: Any) -> bool:
    return isinstance(value, Mapping) and ("completion" in value or "label" in value)


def to_feedback(row: Any, where: str, role_map: Mapping[str, str] | None = None) -> Feedback:
    """A validated Feedback from one row; raises DataError naming `where`."""
    role_map = dict(role_map or {})
    prompt = _require(row, "prompt", "the conversation before the answer: a string or a list of messages", where)
    completion = _require(row, "completion", "the answer being rated: a string or a list of one message", where)
    label = _require(row, "label", "true (a desirable answer) or false (an undesirable one)", where)
    if not isinstance(label, bool):
        raise DataError(f"field 'label' is {json.dumps(label)[:40]}; expected true (a desirable answer) or false "
                        "(an undesirable one).", where=where, reason="label not true or false")
    feedback = Feedback(_prompt_messages(prompt, where, role_map), _answer(completion, "completion", where, role_map),
                        label, where, _tools(row, where))
    validate(feedback.conversation())
    return feedback


def read_feedback(path: str | Path | Source, *, role_map: Mapping[str, str] | None = None, on_bad_row: str = "error",
                  rejects: RejectLog | None = None, max_row_bytes: int | None = None) -> Iterator[Feedback]:
    """Stream valid feedback rows from a source (a file, glob, dataset dir or hub id). A bad row, or one of more
    than `max_row_bytes` bytes (never parsed), raises DataError (`error`) or goes to `rejects` (`skip`)."""
    return items_from_rows(source_rows(path, max_row_bytes=max_row_bytes),
                           lambda value, where: to_feedback(value, where, role_map), accepts=is_feedback_row,
                           kind="a feedback row", expected="'prompt', 'completion' and 'label' (true or false)",
                           reason="not a feedback row", on_bad_row=on_bad_row, rejects=rejects)


class FeedbackEncoder:
    """Feedback -> Example through an Encoder (its tokenizer, template, max_seq_len, truncation), the answer
    scored and the tokens after its end-of-turn cut (as PairEncoder does for each side of a pair)."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = copy.copy(encoder)
        self.encoder.train_on = "last_assistant"
        self.max_seq_len, self.truncation = encoder.max_seq_len, encoder.truncation
        self.encoder.max_seq_len = None
        self.truncated = 0
        """Examples cut to max_seq_len so far (data.truncation=truncate)."""
        self.special_token_rows = 0
        """Examples encoded so far whose contents hold special-token strings (data.special_tokens_in_content)."""

    def encode_batch(self, rows: Sequence[Feedback]) -> list[Example | DataError]:
        return [self._limit(r) for r in self.encoder.encode_batch([f.conversation() for f in rows])]

    def _limit(self, encoded: Encoded | DataError) -> Example | DataError:
        if isinstance(encoded, DataError):
            return encoded
        self.special_token_rows += encoded.special_tokens_in_content > 0
        example, limit = _cut(encoded), self.max_seq_len
        if limit is None or len(example.input_ids) <= limit:
            return example
        if self.truncation == "drop":
            return Dropped(f"{len(example.input_ids)} tokens is more than data.max_seq_len={limit}; dropped "
                           "(data.truncation=drop). Raise max_seq_len or set data.truncation=truncate.",
                           where=example.where, reason=TOO_LONG)
        if int(np.argmax(encoded.trained)) >= limit:
            return Dropped(f"no token is trained after truncation to data.max_seq_len={limit}; dropped. Raise "
                           "max_seq_len or shorten the prompt.", where=example.where, reason=NOTHING_TRAINED)
        self.truncated += 1
        return Example(example.input_ids[:limit], example.labels[:limit], example.where)


def mismatched(prompt_of: Example, completion_of: Example, limit: int | None) -> Example:
    """`prompt_of`'s prompt followed by `completion_of`'s scored answer, cut to `limit` tokens: a sequence for
    KTO's reference-KL estimate."""
    p = _prompt_length(prompt_of)
    c = _prompt_length(completion_of)
    ids = list(prompt_of.input_ids[:p]) + list(completion_of.input_ids[c:])
    labels = [IGNORE_INDEX] * p + list(completion_of.input_ids[c:])
    if limit is not None:
        ids, labels = ids[:limit], labels[:limit]
    return Example(ids, labels, prompt_of.where)


def _prompt_length(example: Example) -> int:
    return next(t for t, label in enumerate(example.labels) if label != IGNORE_INDEX)


@dataclass(frozen=True)
class FeedbackBatch:
    """B examples and their B mismatched KL sequences. The reference runs all 2B as one padding-free packed row
    (`sequences`); the policy runs the examples (with gradients) and the KL sequences (without, as in TRL's
    KTOTrainer) as two batches: halves of that row when the method can train packed rows, else padded."""
    sequences: Batch
    """One packed row: the B examples, then their B KL sequences."""
    sequence_index: torch.Tensor
    """(N,) which of the 2B sequences each supervised position of `sequences` (loss_index) belongs to."""
    examples: Batch
    mismatched: Batch
    num_examples: int
    example_index: torch.Tensor
    """(N,) which example each supervised position of `examples` (loss_index) belongs to."""
    mismatched_index: torch.Tensor
    """(M,) the same for `mismatched`."""
    desirable: torch.Tensor
    """(B,) bool: which examples are desirable."""
    padding: bool = False
    """A stand-in that counts for nothing (see PairBatch.padding)."""
    continuations: KLContinuations | None = None
    """Packed batches: the KL sequences as continuations of the examples' prompts (models/shared_prefix.py)."""

    @property
    def num_tokens(self) -> int:
        """Tokens the step runs through the model: the examples' and the KL sequences'."""
        return self.examples.num_tokens + self.mismatched.num_tokens

    @property
    def num_supervised(self) -> int:
        """Scored positions: the examples' and the KL sequences'."""
        return self.examples.num_supervised + self.mismatched.num_supervised

    @property
    def where(self) -> tuple[str, ...]:
        return self.examples.where

    def to(self, device: torch.device | str) -> FeedbackBatch:
        rows = {name: getattr(self, name).to(device) for name in ("sequences", "examples", "mismatched")}
        index = {name: getattr(self, name).to(device, non_blocking=True)
                 for name in ("sequence_index", "example_index", "mismatched_index", "desirable")}
        continuations = None if self.continuations is None else self.continuations.to(device)
        return replace(self, **rows, **index, continuations=continuations)


@dataclass(frozen=True)
class KLContinuations:
    """The KL sequences of a packed FeedbackBatch, each as its example's prompt continued by the other completion:
    the prompt's tokens run once, in the examples' row. `row` holds each KL sequence's tokens after its prompt but
    its last (whose hidden state predicts nothing), positions continuing the prompt's; a scored position is then
    either a prompt's last token (in the examples' row) or a position of `row`."""
    row: Batch
    """(1, S) packed: segment i continues example i's prompt (a segment may be empty)."""
    spans: tuple[tuple[int, int], ...]
    """(start in the examples' row, length) of each example's prompt."""
    index: torch.Tensor
    """(M,) the scored positions, into [the examples' row (T positions), then `row` (S positions)]."""
    targets: torch.Tensor
    """(M,) the token each of them predicts."""
    sequence: torch.Tensor
    """(M,) which KL sequence each belongs to."""

    def to(self, device: torch.device | str) -> KLContinuations:
        moved = {name: getattr(self, name).to(device, non_blocking=True) for name in ("index", "targets", "sequence")}
        return replace(self, row=self.row.to(device), **moved)


def kl_continuations(examples: Sequence[Example], kl: Sequence[Example], starts: Sequence[int],
                     total: int) -> KLContinuations:
    """KLContinuations of the KL sequences `kl`, example i starting at `starts[i]` of a packed row of `total`
    tokens; each KL sequence shares its example's prompt (checked)."""
    ids: list[int] = []
    positions: list[int] = []
    bounds, spans, index, targets, sequence = [0], [], [], [], []
    for i, (example, seq) in enumerate(zip(examples, kl)):
        p = _prompt_length(seq)
        if list(seq.input_ids[:p]) != list(example.input_ids[:p]):
            raise ValueError(f"KL sequence {i} does not continue its example's prompt")
        spans.append((int(starts[i]), p))
        for t in range(p - 1, len(seq.input_ids) - 1):  # hidden state t predicts token t + 1
            if seq.labels[t + 1] != IGNORE_INDEX:
                index.append(starts[i] + t if t == p - 1 else total + len(ids) + t - p)
                targets.append(seq.input_ids[t + 1])
                sequence.append(i)
        ids.extend(seq.input_ids[p:-1])
        positions.extend(range(p, len(seq.input_ids) - 1))
        bounds.append(len(ids))
    lengths = np.diff(bounds)
    empty = torch.zeros(0, dtype=torch.long)
    row = Batch(torch.tensor(ids, dtype=torch.long).unsqueeze(0), torch.full((1, len(ids)), IGNORE_INDEX), None,
                torch.tensor(positions, dtype=torch.long).unsqueeze(0), empty, empty,
                tuple(e.where for e in kl), cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
                max_seqlen=int(lengths.max(initial=0)))
    return KLContinuations(row, tuple(spans), torch.tensor(index, dtype=torch.long),
                           torch.tensor(targets, dtype=torch.long), torch.tensor(sequence, dtype=torch.long))


def collate_feedback(examples: Sequence[Example], desirable: Sequence[bool], *, pad_id: int,
                     max_seq_len: int | None, packed: bool = True) -> FeedbackBatch:
    """A FeedbackBatch: example i's KL sequence is its prompt with example i−1's completion (cyclically). `packed`:
    the policy's two batches are halves of the packed row (no padding); false for methods that cannot run packed
    rows (soft prompts, prefixes)."""
    count = len(examples)
    kl = [mismatched(examples[i], examples[(i - 1) % count], max_seq_len) for i in range(count)]
    sequences = collate_packed([*examples, *kl])
    sequence_index = _sequence_of(sequences)
    continuations = None
    if packed:
        halves = [_packed_part(sequences, sequence_index, part, count) for part in (0, 1)]
        starts = sequences.cu_seqlens[:count].tolist()
        continuations = kl_continuations(examples, kl, starts, int(sequences.cu_seqlens[count]))
    else:
        halves = [(b, torch.div(b.loss_index, b.input_ids.shape[1], rounding_mode="floor"))
                  for b in (collate(list(group), pad_id=pad_id) for group in (examples, kl))]
    return FeedbackBatch(sequences, sequence_index, halves[0][0], halves[1][0], count, halves[0][1], halves[1][1],
                         torch.tensor([bool(d) for d in desirable], dtype=torch.bool), continuations=continuations)


def _sequence_of(row: Batch) -> torch.Tensor:
    """(N,) which sequence of a packed row each supervised position belongs to: position p is in sequence s when
    cu[s] <= p < cu[s+1]."""
    return torch.searchsorted(row.cu_seqlens[1:].long(), row.loss_index, right=True)


def _packed_part(row: Batch, sequence: torch.Tensor, part: int, count: int) -> tuple[Batch, torch.Tensor]:
    """Sequences [part·count, (part+1)·count) of a packed row as a packed row of their own (views, no copy of the
    tokens), with each supervised position's sequence numbered from 0."""
    cu = row.cu_seqlens[part * count:(part + 1) * count + 1]
    start, end = int(cu[0]), int(cu[-1])
    keep = (sequence >= part * count) & (sequence < (part + 1) * count)
    lengths = cu[1:] - cu[:-1]
    piece = Batch(row.input_ids[:, start:end], row.labels[:, start:end], None, row.position_ids[:, start:end],
                  row.loss_index[keep] - start, row.loss_targets[keep], row.where[part * count:(part + 1) * count],
                  cu_seqlens=cu - start, max_seqlen=int(lengths.max()))
    return piece, sequence[keep] - part * count


class FeedbackDataset:
    """Feedback examples over an encoded dataset, with each one's label (what the loop's planning reads:
    `lengths`, `len`, `stats`, `max_token_id`, `where`)."""

    def __init__(self, examples: EncodedDataset, desirable: np.ndarray | None = None) -> None:
        """`desirable`: the labels, when `examples` is not one encoded dataset (several sources joined)."""
        self.examples = examples
        self.desirable = (np.fromfile(examples.directory / "desirable.bin", dtype=np.uint8).astype(bool)
                          if desirable is None else np.asarray(desirable, dtype=bool))
        if len(self.desirable) != len(examples):
            raise DataError(f"{examples.directory} holds {len(examples)} examples but {len(self.desirable)} labels; "
                            "delete it (an interrupted cache entry) and run again.")
        self.max_seq_len: int | None = None
        """Longest KL sequence (set by the run: data.max_seq_len)."""

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> np.ndarray:
        return self.examples.lengths

    @property
    def stats(self) -> DatasetStats:
        return self.examples.stats

    @property
    def max_token_id(self) -> int:
        return self.examples.max_token_id

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    def where(self, index: int) -> str:
        return self.examples.where(index)

    def collate(self, indices: Sequence[int], *, pad_id: int, packed: bool = True) -> FeedbackBatch:
        """The examples `indices` as a FeedbackBatch; `packed`: see collate_feedback (data.packing, which would
        pack several micro-batches' examples into one row, is refused for kto by the config)."""
        chosen = [int(i) for i in indices]
        return collate_feedback([self.examples[i] for i in chosen], self.desirable[chosen].tolist(), pad_id=pad_id,
                                max_seq_len=self.max_seq_len, packed=packed)

    def close(self) -> None:
        self.examples.close()


def build_feedback_dataset(data_path: str | Path | Source, data: DataConfig, encoder: Encoder, *,
                           rejects_path: str | Path | None = None) -> FeedbackDataset:
    """Encode the feedback rows of `data_path` (or reuse the cached encoding); copy rejected rows to
    `rejects_path`."""
    dataset = FeedbackDataset(build_dataset(data_path, data, encoder, rejects_path=rejects_path, write=_write,
                                            rows="feedback"))
    dataset.max_seq_len = data.max_seq_len
    return dataset


def _write(data_path: str | Path | Source, data: DataConfig, encoder: Encoder, directory: Path,
           settings: dict[str, Any]) -> None:
    """The encoded-dataset layout (data/dataset.py) plus desirable.bin, each example's label."""
    write_examples(_FeedbackRows(data_path, data, encoder), data, directory, settings, encoder.added_tokens)


class _FeedbackRows:
    """Feedback rows as dataset.write_examples reads them (a RowKind)."""

    def __init__(self, data_path: str | Path | Source, data: DataConfig, encoder: Encoder) -> None:
        self.data_path, self.data, self.encoder = data_path, data, FeedbackEncoder(encoder)
        self.row_limit = encoder.row_limit
        self.labels = array("B")

    def read(self, on_bad_row: str, rejects: RejectLog | None, fields: Any = None) -> Iterator[Feedback]:
        return read_feedback(self.data_path, role_map=_role_map(self.data_path, self.data), on_bad_row=on_bad_row,
                             rejects=rejects, max_row_bytes=self.row_limit)

    def validating_reader(self) -> RowReader:
        return validating_reader(read_feedback, self.data_path, self.data, self.row_limit)

    def encode_stream(self, batches: Iterable[Sequence[Feedback]]) -> Iterator[tuple[Sequence[Feedback], list[Any]]]:
        return ((batch, self.encoder.encode_batch(batch)) for batch in batches)

    def written(self, item: Feedback, result: Example) -> Written:
        self.labels.append(int(item.desirable))
        return Written([(np.asarray(result.input_ids, dtype=np.int32), np.asarray(result.labels) != IGNORE_INDEX,
                         result.where)])

    def reject_row(self, item: Feedback) -> str:
        return feedback_row(item)

    def finish(self, directory: Path, stats: DatasetStats) -> dict[str, Any]:
        """The encoder counted truncation and special tokens (its results are plain examples)."""
        stats.truncated = self.encoder.truncated
        stats.special_token_rows = self.encoder.special_token_rows
        np.frombuffer(self.labels, dtype=np.uint8).tofile(directory / "desirable.bin")
        return {"desirable": int(sum(self.labels))}


def feedback_row(row: Feedback) -> str:
    """A feedback row in the conversational form, so a rejected one can be fixed and fed back."""
    record: dict[str, Any] = {"prompt": [message_record(m) for m in row.prompt],
                              "completion": [message_record(row.completion)], "label": row.desirable}
    if row.tools is not None:
        record["tools"] = list(row.tools)
    return json.dumps(record, ensure_ascii=False)
