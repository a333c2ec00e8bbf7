"""Segments -> Example(input_ids, labels): tokens and labels built in lockstep, boundaries verified.

The rendered conversation is tokenised once, as a whole — exactly the ids the model sees when the same
template renders the same conversation at inference. Each token's label comes from the segment its
characters lie in, read from the tokenizer's character offsets. A token whose characters straddle a
trained/untrained boundary (the tokenizer merged across it) is an error naming the row, never a silent
shift. Tokenizers without offsets (slow, pure Python) are encoded segment by segment and the result must
equal the whole-string encoding, or the row is refused.
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from sftlab.data.formats import row_byte_limit
from sftlab.data.schema import Conversation
from sftlab.data.templates import MAX_TEMPLATE_TEXT, ChatTemplate, Segment
from sftlab.errors import ConfigError, DataError

IGNORE_INDEX = -100
"""Label of a position the loss ignores (PyTorch cross-entropy's ignore_index). Defined here only."""

ROLE_CODES = {"": 0, "system": 1, "user": 2, "assistant": 3, "tool": 4, "reasoning": 5, "tool_call": 6}
"""Per-token role codes reported by `encode_detailed`: 0 is template text."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    where: str = ""


@dataclass(frozen=True)
class Encoded:
    """An example plus what reports and writers need: its arrays, per-token role codes, truncation."""
    example: Example
    role_codes: np.ndarray  # (T,) ROLE_CODES of each token
    truncated: bool
    segments: list[Segment]
    ids: np.ndarray         # (T,) int64, the example's input_ids
    trained: np.ndarray     # (T,) bool, labels != IGNORE_INDEX

    @property
    def roles(self) -> list[int]:
        return self.role_codes.tolist()


TOO_LONG = "too long"
NOTHING_TRAINED = "no trained tokens"
STRADDLE = "tokens straddle a mask boundary"


class Dropped(DataError):
    """A valid row that policy keeps out of training (reason TOO_LONG or NOTHING_TRAINED); always counted."""


class Encoder:
    """Turns conversations into examples with one tokenizer and one template."""

    def __init__(self, tokenizer: Any, template: ChatTemplate, *, train_on: str = "assistant",
                 max_seq_len: int | None = None, truncation: str = "drop", add_special_tokens: bool = False,
                 max_row_bytes: int | None = None) -> None:
        if truncation not in ("drop", "truncate"):
            raise ConfigError(f"data.truncation must be drop or truncate; found {truncation!r}")
        self.tokenizer = tokenizer
        self.template = template
        self.train_on = train_on
        self.max_seq_len = max_seq_len
        self.truncation = truncation
        self.row_limit = row_byte_limit(max_seq_len, max_row_bytes)
        """Most bytes of an input row (readers reject longer rows unread); fixed here, whatever later
        changes max_seq_len (the pair encoder clears it to apply it per side)."""
        self.render_limit = None if self.row_limit is None else self.row_limit + MAX_TEMPLATE_TEXT
        """Most characters one row's render may have: its contents (at most row_limit) + template text."""
        self.added_tokens = _ensure_special_tokens(tokenizer, template, add_special_tokens)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend
        if backend is not None and _alters_encoding(backend):
            # A private copy without them: offsets must not be trimmed around whitespace, and nothing may
            # be cut or padded (encoding with add_special_tokens=False already adds no BOS/EOS: the
            # rendered text holds them where the template wants them).
            self._backend = copy.deepcopy(backend)
            self._backend.post_processor = None
            self._backend.no_truncation()
            self._backend.no_padding()

    def encode(self, conversation: Conversation) -> Example:
        """Encode one conversation; raises DataError (bad row) or Dropped (policy)."""
        return self.encode_detailed([conversation])[0].example

    def encode_detailed(self, conversations: Sequence[Conversation]) -> list[Encoded]:
        """Encode a batch (the tokenizer runs over the whole batch at once); raises on the first bad row."""
        results = self.encode_batch(conversations)
        for result in results:
            if isinstance(result, DataError):
                raise result
        return results  # type: ignore[return-value]

    def encode_batch(self, conversations: Sequence[Conversation]) -> list[Encoded | DataError]:
        """Encode a batch; each entry is the Encoded result or the DataError / Dropped for that row."""
        rendered = self._render(conversations)
        return self._finish(conversations, rendered, self._tokenize(_texts(rendered)))

    def encode_stream(self, batches: Iterable[Sequence[Conversation]]
                      ) -> Iterator[tuple[Sequence[Conversation], list[Encoded | DataError]]]:
        """encode_batch over a stream of batches, pipelined: while the tokenizer (Rust, which releases the
        GIL) encodes batch k+1 on a worker thread, Python reads, renders and labels on this one."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for batch in batches:
                rendered = self._render(batch)
                future = pool.submit(self._tokenize, _texts(rendered))
                if pending is not None:
                    yield pending[0], self._finish(pending[0], pending[1], pending[2].result())
                pending = (batch, rendered, future)
            if pending is not None:
                yield pending[0], self._finish(pending[0], pending[1], pending[2].result())

    def _render(self, conversations: Sequence[Conversation]) -> list[list[Segment] | DataError]:
        rendered: list[list[Segment] | DataError] = []
        for conversation in conversations:
            try:
                rendered.append(self.template.render(conversation, self.train_on, max_chars=self.render_limit))
            except DataError as exc:
                rendered.append(exc)
        return rendered

    def _finish(self, conversations: Sequence[Conversation], rendered: list[list[Segment] | DataError],
                tokenized: list[tuple[list[int], Any]]) -> list[Encoded | DataError]:
        pieces = iter(tokenized)
        results: list[Encoded | DataError] = []
        for conversation, segments in zip(conversations, rendered):
            if isinstance(segments, DataError):
                results.append(segments)
                continue
            ids, encoding = next(pieces)
            try:
                results.append(self._label(conversation.where, segments, ids, encoding))
            except DataError as exc:
                results.append(exc)
        return results

    def _tokenize(self, texts: list[str]) -> list[tuple[list[int], Any]]:
        if self._backend is not None:
            encodings = self._backend.encode_batch(texts, add_special_tokens=False)
            return [(e.ids, e) for e in encodings]
        return [(self.tokenizer.encode(text, add_special_tokens=False), None) for text in texts]

    def _label(self, where: str, segments: list[Segment], ids: list[int], encoding: Any) -> Encoded:
        if encoding is None:
            trained, roles = self._label_by_segments(where, segments, ids)
        else:
            trained, roles = _label_by_offsets(where, segments, ids, encoding)
        if not trained.any():
            raise Dropped(f"no token is trained (data.train_on={self.train_on} and the messages' own \"train\" "
                          "flags), so the row teaches nothing; dropped.", where=where, reason=NOTHING_TRAINED)
        array = np.asarray(ids, dtype=np.int64)
        truncated = False
        if self.max_seq_len is not None and len(array) > self.max_seq_len:
            if self.truncation == "drop":
                raise Dropped(f"{len(array)} tokens is more than data.max_seq_len={self.max_seq_len}; dropped "
                              "(data.truncation=drop). Raise max_seq_len or set data.truncation=truncate.",
                              where=where, reason=TOO_LONG)
            limit = self.max_seq_len
            array, trained, roles, truncated = array[:limit], trained[:limit], roles[:limit], True
            if not trained.any():
                raise Dropped(f"no token is trained after truncation to data.max_seq_len={limit}; dropped. "
                              "Raise max_seq_len or shorten the prompt.", where=where, reason=NOTHING_TRAINED)
        labels = np.where(trained, array, IGNORE_INDEX)
        return Encoded(Example(array.tolist(), labels.tolist(), where), roles, truncated, segments, array, trained)

    def _label_by_segments(self, where: str, segments: list[Segment], whole: list[int]) -> tuple[np.ndarray, np.ndarray]:
        ids: list[int] = []
        labels: list[int] = []
        roles: list[int] = []
        for segment in segments:
            piece = self.tokenizer.encode(segment.text, add_special_tokens=False)
            ids += piece
            labels += piece if segment.trainable else [IGNORE_INDEX] * len(piece)
            roles += [ROLE_CODES[segment.role]] * len(piece)
        if ids != list(whole):
            raise DataError("the tokenizer encodes the conversation differently as a whole than segment by "
                            "segment (it merges characters across a trained/untrained boundary) and gives no "
                            "offsets to map them; use a fast tokenizer (tokenizer.json).",
                            where=where, reason=STRADDLE)
        return np.asarray(labels, dtype=np.int64) != IGNORE_INDEX, np.asarray(roles, dtype=np.int64)


def _texts(rendered: list[list[Segment] | DataError]) -> list[str]:
    return ["".join(s.text for s in r) for r in rendered if not isinstance(r, DataError)]


def _alters_encoding(backend: Any) -> bool:
    """Whether the fast tokenizer's settings would trim offsets, truncate or pad our encodings."""
    processor = backend.post_processor
    trims = processor is not None and b'"trim_offsets":true' in processor.__getstate__().replace(b" ", b"")
    return trims or backend.truncation is not None or backend.padding is not None


def _label_by_offsets(where: str, segments: list[Segment], ids: list[int], encoding: Any) -> tuple[np.ndarray, np.ndarray]:
    """Trained flags and role codes per token, from the token that holds each segment's first character.

    A segment starts at the token containing its first character; if that token began earlier, it
    straddles the boundary: harmless between two segments both trained or both not (the token goes to
    the earlier one), an error where training switches on or off.
    """
    first_token: list[int | None] = []  # per segment: index of its first token (None: an empty segment)
    position = 0
    for k, segment in enumerate(segments):
        token = encoding.char_to_token(position) if segment.text else None
        if segment.text and token is None:  # a character no token covers (a normaliser removed it)
            return _label_by_all_offsets(where, segments, ids, np.asarray(encoding.offsets, dtype=np.int64))
        if token is None:
            first_token.append(None)
        elif encoding.token_to_chars(token)[0] < position:
            if k > 0 and segments[k - 1].trainable != segment.trainable:
                _straddle(where, segments, token, encoding.token_to_chars(token))
            first_token.append(token + 1)
        else:
            first_token.append(token)
        position += len(segment.text)
    following = len(ids)
    for k in range(len(first_token) - 1, -1, -1):  # an empty segment holds no token: it ends where it starts
        following = first_token[k] = following if first_token[k] is None else first_token[k]
    bounds = np.asarray(first_token + [len(ids)], dtype=np.int64)
    counts = np.maximum(np.diff(bounds), 0)
    trained = np.repeat(np.array([s.trainable for s in segments], dtype=bool), counts)
    roles = np.repeat(np.array([ROLE_CODES[s.role] for s in segments], dtype=np.int64), counts)
    return trained, roles


def _straddle(where: str, segments: list[Segment], index: int, span: tuple[int, int]) -> None:
    text = "".join(s.text for s in segments)
    raise DataError(f"token {index} ({text[span[0]:span[1]]!r}) spans the boundary between trained and untrained "
                    "text: the tokenizer merges the end of one part with the start of the next, so no exact mask "
                    "exists. Usually a message starts or ends with whitespace the template's own whitespace "
                    "joins; strip it from the content.", where=where, reason=STRADDLE)


def _label_by_all_offsets(where: str, segments: list[Segment], ids: list[int],
                          offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The general path: every token's character span looked up among the segments."""
    offsets = offsets.reshape(-1, 2)
    starts = np.cumsum([0] + [len(s.text) for s in segments[:-1]])
    trainable = np.array([s.trainable for s in segments], dtype=bool)
    role_codes = np.array([ROLE_CODES[s.role] for s in segments], dtype=np.int64)
    # A trainable "run" changes only where the flag flips; a token must lie inside one run.
    flips = np.concatenate(([True], trainable[1:] != trainable[:-1]))
    run_of_segment = np.cumsum(flips) - 1
    begin, end = offsets[:, 0], np.maximum(offsets[:, 1] - 1, offsets[:, 0])
    first = np.searchsorted(starts, begin, side="right") - 1
    last = np.searchsorted(starts, end, side="right") - 1
    straddle = run_of_segment[first] != run_of_segment[last]
    if straddle.any():
        k = int(np.argmax(straddle))
        _straddle(where, segments, k, (int(offsets[k, 0]), int(offsets[k, 1])))
    return trainable[first], role_codes[first]


def _ensure_special_tokens(tokenizer: Any, template: ChatTemplate, add: bool) -> list[str]:
    """The template's markup tokens must be single tokens of the tokenizer; add them only if allowed."""
    if not template.special_tokens:
        return []
    added_vocab = set(tokenizer.get_added_vocab())
    missing = [t for t in template.special_tokens if t not in added_vocab]
    if not missing:
        return []
    if not add:
        raise ConfigError(
            f"template {template.name!r} needs special tokens {', '.join(missing)}, which the tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '')!r} does not have (a base model?). Set "
            "data.add_special_tokens=true to add them (the model's embeddings are resized and the new rows "
            "trained), or use data.template=auto with the model's own chat template.")
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return missing
