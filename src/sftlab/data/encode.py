"""Segments -> Example(input_ids, labels): tokens and labels built in lockstep, boundaries verified.

The rendered conversation is tokenised once, as a whole — exactly the ids the model sees when the same
template renders the same conversation at inference. Each token's label comes from the segment its
characters lie in, read from the tokenizer's character offsets. A token whose characters straddle a
trained/untrained boundary (the tokenizer merged across it) is an error naming the row, never a silent
shift. Tokenizers without offsets (slow, pure Python) are encoded segment by segment and the result must
equal the whole-string encoding, or the row is refused. Text that repeats across rows (system prompts, tool
schemas) is tokenised once and its tokens reused (data/token_cache.py): the same ids and offsets as the
whole-string encoding, proven per tokenizer (or not used).

A special-token string inside a message's content (`<|im_end|>` typed in a reply) is text, never the control
token: read as the token, it would forge template markup — a turn end and a new user turn trained as the
assistant's words, a system turn in a prompt. The whole-string encoding shows where the tokenizer matched
special tokens inside content (`SpecialTokensInContent.find`, cheap: most rows have none); for such a row,
each stretch of text between two of the template's own special tokens that holds one is encoded again with
special-token matching off and spliced in (the template's markup stays control tokens; a cut at a special
token is where the tokenizer cuts anyway). `data.special_tokens_in_content` chooses text (default), error
(the row is refused, naming the token) or allow (the old behaviour: the control token, counted).
"""

from __future__ import annotations

import copy
import gc
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from sftlab.data.fast_bpe import FastBPE, fast_bpe_for, once_per_tokenizer
from sftlab.data.formats import row_byte_limit
from sftlab.data.schema import Conversation
from sftlab.data.templates import MAX_TEMPLATE_TEXT, ChatTemplate, Segment
from sftlab.data.token_cache import PieceCache
from sftlab.errors import ConfigError, DataError

IGNORE_INDEX = -100
"""Label of a position the loss ignores (PyTorch cross-entropy's ignore_index). Defined here only."""

ROLE_CODES = {"": 0, "system": 1, "user": 2, "assistant": 3, "tool": 4, "reasoning": 5, "tool_call": 6}
"""Per-token role codes reported by `encode_detailed`: 0 is template text."""

FAST_BPE_AFTER = 2048
"""Texts an Encoder tokenises with the tokenizer itself before it sets up the tiktoken path (data/fast_bpe.py;
~1.5 s once, won back after ~1,500 tool-calling conversations); smaller builds never pay for it."""

SPECIAL_TOKENS_IN_CONTENT = ("text", "error", "allow")
"""data.special_tokens_in_content: how a special-token string inside a message's content is tokenised."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    where: str = ""


@dataclass(frozen=True)
class Encoded:
    """An example plus what reports and writers need: its arrays, per-token role codes, truncation."""
    where: str
    role_codes: np.ndarray  # (T,) ROLE_CODES of each token
    truncated: bool
    segments: list[Segment]
    ids: np.ndarray         # (T,) int64, the example's input_ids
    trained: np.ndarray     # (T,) bool, labels != IGNORE_INDEX
    special_tokens_in_content: int = 0
    """Special-token strings found inside the messages' contents (kept as text, or as control tokens under
    data.special_tokens_in_content=allow)."""

    @property
    def roles(self) -> list[int]:
        return self.role_codes.tolist()

    @property
    def example(self) -> Example:
        """The example as Python lists, made on demand: the dataset writer reads the arrays and never needs them
        (two lists of a Python int per token, for every row, were a tenth of the encoding time)."""
        return Example(self.ids.tolist(), np.where(self.trained, self.ids, IGNORE_INDEX).tolist(), self.where)


TOO_LONG = "too long"
NOTHING_TRAINED = "no trained tokens"
STRADDLE = "tokens straddle a mask boundary"
SPECIAL_IN_CONTENT = "special token in content"


class Dropped(DataError):
    """A valid row that policy keeps out of training (reason TOO_LONG or NOTHING_TRAINED); always counted."""


class Encoder:
    """Turns conversations into examples with one tokenizer and one template."""

    def __init__(self, tokenizer: Any, template: ChatTemplate, *, train_on: str = "assistant",
                 max_seq_len: int | None = None, truncation: str = "drop", add_special_tokens: bool = False,
                 max_row_bytes: int | None = None, special_tokens_in_content: str = "text",
                 cache_tokens: bool = True, fast_bpe: bool | None = None) -> None:
        if truncation not in ("drop", "truncate"):
            raise ConfigError(f"data.truncation must be drop or truncate; found {truncation!r}")
        if special_tokens_in_content not in SPECIAL_TOKENS_IN_CONTENT:
            raise ConfigError(f"data.special_tokens_in_content must be one of {', '.join(SPECIAL_TOKENS_IN_CONTENT)}; "
                              f"found {special_tokens_in_content!r}")
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
        self._backend = _plain_backend(getattr(tokenizer, "backend_tokenizer", None))
        self.special_tokens_in_content = special_tokens_in_content
        self._specials = SpecialTokensInContent(tokenizer, self._backend, special_tokens_in_content)
        self._cache_tokens = cache_tokens
        self._pieces = PieceCache.create(self._backend) if cache_tokens else None
        """Reuses the tokens of repeated text (system prompts, tool schemas); None where not provably exact
        for this tokenizer (or cache_tokens=False): whole texts are tokenised."""
        self._fast_setting = fast_bpe
        self._fast: FastBPE | bool | None = None if fast_bpe is not False else False
        """data/fast_bpe.py's tiktoken path once made (False: not for this tokenizer, or not wanted)."""
        self._texts_tokenized = 0

    def recipe(self) -> dict[str, Any]:
        """What rebuilds this Encoder in another process (`from_recipe`; data/parallel.py's workers): the
        tokenizer as it is now (with any tokens added), the template (with its clock), the settings."""
        tokenizer = self.tokenizer if self._backend is None else TokenizerView(self.tokenizer)
        return {"tokenizer": tokenizer, "template": self.template, "train_on": self.train_on,
                "max_seq_len": self.max_seq_len, "truncation": self.truncation, "row_limit": self.row_limit,
                "render_limit": self.render_limit, "special_tokens_in_content": self.special_tokens_in_content,
                "cache_tokens": self._cache_tokens, "fast_bpe": self._fast_setting}

    @classmethod
    def from_recipe(cls, recipe: dict[str, Any]) -> Encoder:
        encoder = cls(recipe["tokenizer"], recipe["template"], train_on=recipe["train_on"],
                      max_seq_len=recipe["max_seq_len"], truncation=recipe["truncation"],
                      special_tokens_in_content=recipe["special_tokens_in_content"],
                      cache_tokens=recipe["cache_tokens"], fast_bpe=recipe.get("fast_bpe"))
        encoder.row_limit, encoder.render_limit = recipe["row_limit"], recipe["render_limit"]
        return encoder

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
        with ThreadPoolExecutor(max_workers=1) as pool, settled_heap():
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
            _match_special_tokens(self._backend)
            fast = self._fast_bpe(len(texts))
            if fast is not None:
                return [(e.ids, e) for e in fast.encode_batch(texts)]
            if self._pieces is not None:
                return self._pieces.encode_batch(texts)
            encodings = self._backend.encode_batch(texts, add_special_tokens=False)
            return [(e.ids, e) for e in encodings]
        return [(self.tokenizer.encode(text, add_special_tokens=False), None) for text in texts]

    def _fast_bpe(self, count: int) -> FastBPE | None:
        """The tiktoken path, made once this Encoder has tokenised FAST_BPE_AFTER texts (or at once with
        fast_bpe=True): its set-up (~1.5 s) pays off only on a build of thousands of rows."""
        self._texts_tokenized += count
        if self._fast is None and (self._fast_setting or self._texts_tokenized >= FAST_BPE_AFTER):
            self._fast = fast_bpe_for(self._backend, getattr(self.tokenizer, "backend_tokenizer", None)) or False
        return self._fast or None

    def _label(self, where: str, segments: list[Segment], ids: list[int], encoding: Any) -> Encoded:
        if encoding is None:
            trained, roles, content = self._label_by_segments(where, segments, ids)
        else:
            trained, roles, content = _label_by_offsets(where, segments, ids, encoding)
        array = np.asarray(ids, dtype=np.int64)
        forged = self._specials.find(array, content, segments, encoding)
        if len(forged):
            array, trained, roles = self._specials.resolve(where, segments, array, encoding, forged,
                                                           (trained, roles))
        if not trained.any():
            raise Dropped(f"no token is trained (data.train_on={self.train_on} and the messages' own \"train\" "
                          "flags), so the row teaches nothing; dropped.", where=where, reason=NOTHING_TRAINED)
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
        return Encoded(where, roles, truncated, segments, array, trained, len(forged))

    def _label_by_segments(self, where: str, segments: list[Segment],
                           whole: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids: list[int] = []
        labels: list[int] = []
        roles: list[int] = []
        content: list[bool] = []
        for segment in segments:
            piece = self.tokenizer.encode(segment.text, add_special_tokens=False)
            ids += piece
            labels += piece if segment.trainable else [IGNORE_INDEX] * len(piece)
            roles += [ROLE_CODES[segment.role]] * len(piece)
            content += [segment.content] * len(piece)
        if ids != list(whole):
            raise DataError("the tokenizer encodes the conversation differently as a whole than segment by "
                            "segment (it merges characters across a trained/untrained boundary) and gives no "
                            "offsets to map them; use a fast tokenizer (tokenizer.json).",
                            where=where, reason=STRADDLE)
        return (np.asarray(labels, dtype=np.int64) != IGNORE_INDEX, np.asarray(roles, dtype=np.int64),
                np.asarray(content, dtype=bool))


@dataclass(frozen=True)
class _AddedToken:
    content: str
    special: bool

    def __str__(self) -> str:
        return self.content


class TokenizerView:
    """What an Encoder reads of a fast tokenizer, without transformers: the Rust backend and the added tokens.
    Encoding workers (data/parallel.py) get this instead of the tokenizer, so they start without importing
    transformers (seconds of CPU each)."""

    def __init__(self, tokenizer: Any) -> None:
        self.backend_tokenizer = tokenizer.backend_tokenizer
        self.name_or_path = getattr(tokenizer, "name_or_path", "")
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.added_tokens_decoder = {int(i): _AddedToken(str(t), bool(getattr(t, "special", False)))
                                     for i, t in decoder.items()}
        self.all_special_ids = [int(i) for i in getattr(tokenizer, "all_special_ids", []) or []]
        self._length = len(tokenizer)
        self._added_vocab = dict(tokenizer.get_added_vocab())

    def __len__(self) -> int:
        return self._length

    def get_added_vocab(self) -> dict[str, int]:
        return self._added_vocab

    def convert_ids_to_tokens(self, index: int) -> str | None:
        return self.backend_tokenizer.id_to_token(index)


class SpecialTokensInContent:
    """Finds the special tokens the tokenizer matched inside message contents, and applies
    data.special_tokens_in_content to a row holding some: re-encode them as text, refuse the row, or allow."""

    def __init__(self, tokenizer: Any, backend: Any, mode: str) -> None:
        self.mode = mode
        self._tokenizer = tokenizer
        self._backend = backend
        self._text_backend: Any = None  # made on first use: most datasets never need it
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special = {int(i) for i, token in decoder.items() if getattr(token, "special", False)}
        special |= {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
        # One flag per id, plus a last False one that ids out of range are clipped to.
        self._is_special = np.zeros(max([len(tokenizer), *special], default=0) + 2, dtype=bool)
        self._is_special[sorted(special)] = True

    def find(self, ids: np.ndarray, content: np.ndarray, segments: Sequence[Segment], encoding: Any) -> np.ndarray:
        """Indices of the special tokens in `ids` that the tokenizer matched in a message's content (content[i]
        True). A special token the model emits for other text (`<unk>` for an unknown character) is not one."""
        found = np.flatnonzero(self._is_special.take(ids, mode="clip") & content)
        if not len(found) or encoding is None:
            return found
        text = "".join(s.text for s in segments)
        return np.array([k for k in found.tolist() if text[slice(*encoding.token_to_chars(k))] ==
                         self._backend.id_to_token(int(ids[k]))], dtype=np.int64)

    def resolve(self, where: str, segments: Sequence[Segment], ids: np.ndarray, encoding: Any, forged: np.ndarray,
                labels: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, trained, roles) of a row whose contents hold the special tokens at `forged`, by the mode."""
        if self.mode == "allow":
            return ids, *labels
        if self.mode == "error":
            token = self._tokenizer.convert_ids_to_tokens(int(ids[forged[0]]))
            role = {code: role for role, code in ROLE_CODES.items()}[int(labels[1][forged[0]])] or "a"
            raise DataError(f"the {role} message's content holds {token!r}, a special token of the tokenizer "
                            f"({len(forged)} in this row); read as the control token it forges the template's "
                            "markup (a turn's end, a new turn). Remove it from the row, or set "
                            "data.special_tokens_in_content=text to train it as plain text (allow: as the "
                            "control token).", where=where, reason=SPECIAL_IN_CONTENT)
        if encoding is None:
            raise DataError("a message's content holds a special-token string, and this tokenizer (no "
                            "tokenizer.json, so no offsets) cannot encode it as plain text; use a fast tokenizer, "
                            "or set data.special_tokens_in_content=error or allow.",
                            where=where, reason=SPECIAL_IN_CONTENT)
        new_ids, offsets = self.as_text(where, "".join(s.text for s in segments), ids,
                                        np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2), forged)
        trained, roles, _ = _label_by_all_offsets(where, list(segments), new_ids, offsets)
        return new_ids, trained, roles

    def as_text(self, where: str, text: str, ids: np.ndarray, offsets: np.ndarray,
                forged: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, offsets) of `text` with the special tokens at `forged` read as text: each stretch between two
        of the other (the template's) special tokens that holds one is encoded with special-token matching
        off and spliced in. Refuses the row (DataError) unless the result decodes to the same text."""
        anchors = np.setdiff1d(np.flatnonzero(self._is_special.take(ids, mode="clip")), forged)
        after = np.searchsorted(anchors, forged)  # anchors[after - 1] < forged < anchors[after]
        regions = sorted({(int(anchors[k - 1]) if k > 0 else -1, int(anchors[k]) if k < len(anchors) else len(ids))
                          for k in after.tolist()})
        spans = [(int(offsets[left, 1]) if left >= 0 else 0, int(offsets[right, 0]) if right < len(ids) else len(text))
                 for left, right in regions]
        encodings = self._as_text_backend().encode_batch([text[a:b] for a, b in spans], add_special_tokens=False)
        id_parts, offset_parts, copied = [], [], 0
        for (left, right), (start, _), encoding in zip(regions, spans, encodings):
            id_parts += [ids[copied:left + 1], np.asarray(encoding.ids, dtype=np.int64)]
            spliced = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2) + start  # (n, 2) in the row's text
            offset_parts += [offsets[copied:left + 1], spliced]
            copied = right
        new_ids = np.concatenate(id_parts + [ids[copied:]])
        new_offsets = np.concatenate(offset_parts + [offsets[copied:]])
        self._check_as_text(where, ids, new_ids, len(anchors))
        return new_ids, new_offsets

    def _check_as_text(self, where: str, ids: np.ndarray, new_ids: np.ndarray, anchors: int) -> None:
        """Fail safe: the re-encoded row keeps exactly the template's special tokens and the same text."""
        kept = int(self._is_special.take(new_ids, mode="clip").sum())
        same = self._backend.decode(new_ids.tolist(), skip_special_tokens=False) == \
            self._backend.decode(ids.tolist(), skip_special_tokens=False)
        if kept != anchors or not same:
            raise DataError("a message's content holds a special-token string that this tokenizer cannot encode "
                            "as plain text in place (encoded on its own, the text changes); remove it from the "
                            "row, or set data.special_tokens_in_content=allow to keep it as the control token.",
                            where=where, reason=SPECIAL_IN_CONTENT)

    def _as_text_backend(self) -> Any:
        if self._text_backend is None:
            self._text_backend = _text_backend_for(self._backend, getattr(self._tokenizer, "backend_tokenizer", None))
        return self._text_backend


_TEXT_BACKENDS: dict[int, tuple[Any, int, Any]] = {}
"""_text_backend_for's copies in this process, by tokenizer backend (kept alive here) and its vocabulary's size."""


def _text_backend_for(backend: Any, owner: Any = None) -> Any:
    """A copy of `backend` that matches special tokens' strings as text, made once per tokenizer and process: the
    copy takes ~0.5 s for a large vocabulary, and every Encoder (each with its own plain copy of one tokenizer's
    backend, `_plain_backend`) and every prompt_token_ids call would otherwise make its own. `owner`, the
    tokenizer's own backend, is the key where given; a token added to it since makes a new copy."""
    return once_per_tokenizer(_TEXT_BACKENDS, backend, owner, _as_text_copy)


def _as_text_copy(backend: Any) -> Any:
    copied = copy.deepcopy(backend)
    copied.encode_special_tokens = True  # special tokens' strings are matched as text
    return copied


def prompt_token_ids(tokenizer: Any, segments: Sequence[Segment], *, special_tokens_in_content: str = "text",
                     where: str = "") -> list[int]:
    """The ids of a rendered prompt (`ChatTemplate.render_prompt`): the template's markup as control tokens,
    the contents' special-token strings by `special_tokens_in_content`, as in training data."""
    if special_tokens_in_content not in SPECIAL_TOKENS_IN_CONTENT:
        raise ConfigError(f"special_tokens_in_content must be one of {', '.join(SPECIAL_TOKENS_IN_CONTENT)}; "
                          f"found {special_tokens_in_content!r}")
    backend = _plain_backend(getattr(tokenizer, "backend_tokenizer", None))
    text = "".join(s.text for s in segments)
    if backend is None:  # no offsets: contents encoded on their own (a segment boundary is a token boundary)
        return [i for s in segments for i in tokenizer.encode(s.text, add_special_tokens=False,
                                                                 split_special_tokens=s.content
                                                                 and special_tokens_in_content != "allow")]
    _match_special_tokens(backend)
    encoding = backend.encode(text, add_special_tokens=False)
    ids = np.asarray(encoding.ids, dtype=np.int64)
    offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    _, roles, content = _label_by_all_offsets(where, list(segments), ids, offsets)
    specials = SpecialTokensInContent(tokenizer, backend, special_tokens_in_content)
    forged = specials.find(ids, content, segments, encoding)
    if len(forged):
        ids = specials.resolve(where, segments, ids, encoding, forged, (np.zeros(len(ids), dtype=bool), roles))[0]
    return ids.tolist()


def _plain_backend(backend: Any) -> Any:
    """The fast tokenizer's backend, or a private copy of it if its settings would alter our encodings:
    offsets must not be trimmed around whitespace, and nothing may be cut or padded (encoding with
    add_special_tokens=False already adds no BOS/EOS: the rendered text holds them where the template wants
    them). None for a tokenizer without one (slow, pure Python)."""
    if backend is None or not _alters_encoding(backend):
        return backend
    backend = copy.deepcopy(backend)
    backend.post_processor = None
    backend.no_truncation()
    backend.no_padding()
    return backend


def _match_special_tokens(backend: Any) -> None:
    """Make the (shared) backend match special tokens again: transformers sets `encode_special_tokens` for
    each call from its `split_special_tokens` argument and leaves it so, and a whole-string encoding with it
    on would split the template's own markup into text."""
    if getattr(backend, "encode_special_tokens", False):
        backend.encode_special_tokens = False


_settled = threading.Lock()
_settled_depth = 0


@contextmanager
def settled_heap() -> Iterator[None]:
    """Python's cyclic garbage collector told to leave alone what was alive before (gc.freeze), until the
    outermost of these ends (gc.unfreeze). An encoding pass allocates objects by the million (parsed rows,
    renders, segments); each of the collector's full passes walked every object the process holds (modules, the
    tokenizer, the template): 14-19% of a tool-calling build's time (gc.callbacks, 30,000 rows). Objects made
    during the pass are collected as usual, and every object is still freed when its last reference goes: only
    cycles that were already garbage at the start wait for the end of the pass."""
    global _settled_depth
    with _settled:
        if _settled_depth == 0:
            gc.freeze()
        _settled_depth += 1
    try:
        yield
    finally:
        with _settled:
            _settled_depth -= 1
            if _settled_depth == 0:
                gc.unfreeze()


def _texts(rendered: list[list[Segment] | DataError]) -> list[str]:
    return ["".join(s.text for s in r) for r in rendered if not isinstance(r, DataError)]


def _alters_encoding(backend: Any) -> bool:
    """Whether the fast tokenizer's settings would trim offsets, truncate or pad our encodings."""
    processor = backend.post_processor
    trims = processor is not None and b'"trim_offsets":true' in processor.__getstate__().replace(b" ", b"")
    return trims or backend.truncation is not None or backend.padding is not None


def _label_by_offsets(where: str, segments: list[Segment], ids: list[int],
                      encoding: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trained flags, role codes and content flags per token, from the token that holds each segment's first
    character.

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
    content = np.repeat(np.array([s.content for s in segments], dtype=bool), counts)
    return trained, roles, content


def _straddle(where: str, segments: list[Segment], index: int, span: tuple[int, int]) -> None:
    text = "".join(s.text for s in segments)
    raise DataError(f"token {index} ({text[span[0]:span[1]]!r}) spans the boundary between trained and untrained "
                    "text: the tokenizer merges the end of one part with the start of the next, so no exact mask "
                    "exists. Usually a message starts or ends with whitespace the template's own whitespace "
                    "joins; strip it from the content.", where=where, reason=STRADDLE)


def _label_by_all_offsets(where: str, segments: list[Segment], ids: Sequence[int],
                          offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The general path: every token's character span looked up among the segments."""
    offsets = offsets.reshape(-1, 2)
    starts = np.cumsum([0] + [len(s.text) for s in segments[:-1]])
    trainable = np.array([s.trainable for s in segments], dtype=bool)
    role_codes = np.array([ROLE_CODES[s.role] for s in segments], dtype=np.int64)
    content = np.array([s.content for s in segments], dtype=bool)
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
    return trainable[first], role_codes[first], content[first]


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
