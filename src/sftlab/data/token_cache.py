"""Tokenisation of repeated text, cached: the same ids and offsets as the whole-text encoding, for less work.

A fast tokenizer first cuts its input at the added tokens it matches (`<|im_start|>`, `<|eot_id|>`...) and
tokenises each stretch between two of them on its own. So the text from one such cut to the next always
gives the same tokens wherever it stands, and a rendered dataset repeats long stretches: the system prompt,
a row's tool schemas (about half the characters of a tool-calling file). `PieceCache` cuts each rendered
text into units, each starting at a special token the tokenizer cuts at (the first unit at the text's
start), takes the ids and offsets of a unit seen before from a bounded LRU cache, and tokenises the rest as
runs of consecutive units in one `encode_batch`. A row's tokens are the concatenation, offsets shifted.

Exact only where the tokenizer really works piece by piece, so a cut is made only at a special token whose
every match is the tokenizer's own (`_cut_tokens`: no other added token contains it or overlaps its start;
no whitespace stripping or word-boundary rule beside it), and `PieceCache.create` refuses a tokenizer that
fails a self-test on tricky strings (spaces and newlines around added tokens, unicode, partial tokens): the
Encoder then tokenises whole texts as before. Each unit starts with its cut token, so a rule for the text's
first piece (SentencePiece's "▁" prefix, Metaspace prepend_scheme=first) sees the same as in the whole text.
"""

from __future__ import annotations

import bisect
import random
import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from itertools import chain, pairwise
from typing import Any

import numpy as np

CACHE_CHARS = 1 << 22
"""Most characters of text whose tokens the cache holds (4M: at most 16 MB of text)."""
CACHE_TOKENS = 1 << 20
"""Most tokens the cache holds (1M: 24 MB of ids and offsets; English text reaches CACHE_CHARS first)."""
MIN_CACHED_CHARS = 256
"""Shorter units are never cached: their tokens are cheap, and each cached unit splits a row's runs (measured:
a 100-character system prompt's hits cost about what they save; tool schemas are thousands of characters)."""
SEEN_CAP = 1 << 16
"""Hashes of units seen once that the admission filter remembers (cleared when full): a unit is cached the
second time it is seen, so text that never repeats (most user turns) never enters the cache."""
MAX_CUT_TOKENS = 512
"""Special tokens a regex of cut points is built from at most (Llama 3 has 256, most reserved)."""


_NEW, _RUN = "new", "run"
"""Plan states of a part to encode: a unit to cache, or a run of units not cached."""


class Spans:
    """Token ids and character offsets as arrays, answering what the labelling reads of a
    `tokenizers.Encoding` (`char_to_token`, `token_to_chars`, `offsets`): a cached unit's tokens (offsets
    relative to the unit's start), or a whole text's from data/fast_bpe.py."""

    __slots__ = ("ends", "ids", "monotone", "starts")

    def __init__(self, ids: np.ndarray, starts: array, ends: array, monotone: bool | None = None) -> None:
        self.ids, self.starts, self.ends = ids, starts, ends
        if monotone is None:
            pairs = np.stack([np.frombuffer(starts, dtype=np.int64), np.frombuffer(ends, dtype=np.int64)], 1)
            monotone = bool((np.diff(pairs, axis=0) >= 0).all())
        self.monotone = monotone

    @classmethod
    def from_encoding(cls, encoding: Any) -> Spans:
        """A `tokenizers.Encoding`'s ids and offsets."""
        flat = array("q", chain.from_iterable(encoding.offsets))
        return cls(np.asarray(encoding.ids, dtype=np.int64), flat[0::2], flat[1::2])

    def char_to_token(self, position: int) -> int | None:
        """The first token whose span holds `position`, as `tokenizers.Encoding.char_to_token` answers."""
        if self.monotone:  # tokens ending after `position` are a suffix; the first one holds it or none does
            k = bisect.bisect_right(self.ends, position)
            return k if k < len(self.ends) and self.starts[k] <= position else None
        return next((k for k, (a, b) in enumerate(zip(self.starts, self.ends)) if a <= position < b), None)

    def token_to_chars(self, token: int) -> tuple[int, int]:
        return self.starts[token], self.ends[token]

    @property
    def offsets(self) -> np.ndarray:
        """(T, 2) character offsets."""
        return np.stack([np.frombuffer(self.starts, dtype=np.int64), np.frombuffer(self.ends, dtype=np.int64)], 1)


class Pieces:
    """A row's encoding made of parts (cached units and freshly encoded runs): what the labelling reads of a
    `tokenizers.Encoding` (`char_to_token`, `token_to_chars`, `offsets`), answered part by part."""

    def __init__(self, parts: list[tuple[int, Any]]) -> None:
        self._chars = [start for start, _ in parts]  # each part's first character in the row's text
        self._parts = [part for _, part in parts]
        ids = [_ids(part) for part in self._parts]
        self._tokens = [0, *np.cumsum([len(i) for i in ids]).tolist()][:-1]  # each part's first token
        self.ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)

    def char_to_token(self, position: int) -> int | None:
        """A part's tokens cover only its own characters, so the first token holding `position` is in the
        part that holds it."""
        k = bisect.bisect_right(self._chars, position) - 1
        if k < 0:
            return None
        token = self._parts[k].char_to_token(position - self._chars[k])
        return None if token is None else token + self._tokens[k]

    def token_to_chars(self, token: int) -> tuple[int, int]:
        k = bisect.bisect_right(self._tokens, token) - 1
        part, local = self._parts[k], token - self._tokens[k]
        start, end = part.token_to_chars(local)
        return start + self._chars[k], end + self._chars[k]

    @property
    def offsets(self) -> np.ndarray:
        """(T, 2) character offsets in the row's text (the rare paths read them all)."""
        chunks = [np.asarray(part.offsets, dtype=np.int64).reshape(-1, 2) + start
                  for start, part in zip(self._chars, self._parts)]
        return np.concatenate(chunks) if chunks else np.zeros((0, 2), dtype=np.int64)


def _ids(part: Any) -> np.ndarray:
    return part.ids if isinstance(part, Spans) else np.asarray(part.ids, dtype=np.int64)


class PieceCache:
    """Encodes rendered texts with the fast backend, reusing the tokens of units seen before (see the module's
    docstring). Touched by one thread at a time (the Encoder's tokenizer thread)."""

    def __init__(self, backend: Any, cut_tokens: Sequence[str], *, max_chars: int = CACHE_CHARS,
                 max_tokens: int = CACHE_TOKENS, min_chars: int = MIN_CACHED_CHARS) -> None:
        self._backend = backend
        self.cut_tokens = list(cut_tokens)
        self._cuts = re.compile("|".join(re.escape(t) for t in sorted(cut_tokens, key=len, reverse=True)))
        self.max_chars, self.max_tokens, self.min_chars = max_chars, max_tokens, min_chars
        self._cache: OrderedDict[str, Spans] = OrderedDict()
        self.chars = self.tokens = 0
        """Characters and tokens of the units cached now (at most max_chars and max_tokens)."""
        self._seen: set[int] = set()
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    @classmethod
    def create(cls, backend: Any, **limits: int) -> PieceCache | None:
        """A cache for this backend, or None where cached encoding could differ from whole-text encoding."""
        if backend is None or getattr(getattr(backend, "model", None), "dropout", None):
            return None  # no fast tokenizer; or BPE dropout (random: no two encodings agree anyway)
        cuts = _cut_tokens(backend)
        if not cuts:
            return None
        cache = cls(backend, cuts, **limits)
        return cache if cache.self_test() else None

    def encode_batch(self, texts: Sequence[str]) -> list[tuple[Any, Any]]:
        """(ids, encoding) per text, as `backend.encode_batch(texts, add_special_tokens=False)` gives them."""
        with self._lock:
            return self._encode_batch(texts)

    def _encode_batch(self, texts: Sequence[str]) -> list[tuple[Any, Any]]:
        plans = [self._plan(text) for text in texts]
        jobs: dict[str, int] = {}  # text to encode -> its index in the batch (a unit new twice is encoded once)
        for text, plan in zip(texts, plans):
            for start, end, state in plan:
                if not isinstance(state, Spans):
                    jobs.setdefault(text[start:end], len(jobs))
        encodings = self._backend.encode_batch(list(jobs), add_special_tokens=False) if jobs else []
        results = []
        for text, plan in zip(texts, plans):
            parts = []
            for start, end, state in plan:
                part = state
                if not isinstance(state, Spans):
                    part = encodings[jobs[text[start:end]]]
                    if state is _NEW:
                        part = self._store(text[start:end], part)
                parts.append((start, part))
            if len(plan) == 1 and plan[0][2] is _RUN:
                results.append((parts[0][1].ids, parts[0][1]))  # the whole text, encoded as ever
            else:
                pieces = Pieces(parts)
                results.append((pieces.ids, pieces))
        return results

    def _plan(self, text: str) -> list[tuple[int, int, Any]]:
        """The row's parts: (start, end, state), state the cached unit, _NEW (a unit to encode and cache) or
        _RUN (units to encode together: seen at most once before, or too short to cache)."""
        plan: list[tuple[int, int, Any]] = []
        run = 0  # start of the run of units to encode together
        for start, end in _units(self._cuts, text):
            if end - start < self.min_chars:
                continue
            unit = text[start:end]
            cached = self._cache.get(unit)
            if cached is None and not self._admit(unit):
                self.misses += 1
                continue
            if run < start:
                plan.append((run, start, _RUN))
            if cached is not None:
                self._cache.move_to_end(unit)
                self.hits += 1
            plan.append((start, end, cached or _NEW))
            run = end
        if run < len(text) or not plan:
            plan.append((run, len(text), _RUN))
        return plan

    def _admit(self, unit: str) -> bool:
        """Whether to encode `unit` on its own and cache it: the second time it is seen (see SEEN_CAP)."""
        key = hash(unit)
        if key in self._seen:
            return True
        if len(self._seen) >= SEEN_CAP:
            self._seen.clear()
        self._seen.add(key)
        return False

    def _store(self, unit: str, encoding: Any) -> Spans:
        cached = self._cache.get(unit) or Spans.from_encoding(encoding)
        if unit not in self._cache and len(unit) <= self.max_chars // 4 and len(cached.ids) <= self.max_tokens // 4:
            self._cache[unit] = cached
            self.chars += len(unit)
            self.tokens += len(cached.ids)
            while self.chars > self.max_chars or self.tokens > self.max_tokens:  # least recently used first
                old, evicted = self._cache.popitem(last=False)
                self.chars -= len(old)
                self.tokens -= len(evicted.ids)
        return cached

    def self_test(self, count: int = 48) -> bool:
        """Whether cached encoding gives exactly the whole-text ids and offsets on tricky strings (spaces,
        newlines and unicode around and between the cut tokens and other added tokens), each unit cached."""
        texts = _tricky_texts(self._backend, self.cut_tokens, count)
        probe = PieceCache(self._backend, self.cut_tokens, min_chars=1)
        for text in texts:
            for start, end in _units(self._cuts, text):  # seen once: the next encoding caches every unit
                probe._admit(text[start:end])
        probe.encode_batch(texts)  # caches the units
        whole = self._backend.encode_batch(texts, add_special_tokens=False)
        for (ids, pieces), expected in zip(probe.encode_batch(texts), whole):
            if list(np.asarray(ids)) != expected.ids or not _same_offsets(pieces, expected):
                return False
        return True


def _units(cuts: re.Pattern[str], text: str) -> list[tuple[int, int]]:
    """(start, end) of each unit of `text`: from one cut token's start to the next one's (the first from 0)."""
    bounds = [m.start() for m in cuts.finditer(text)] if cuts.pattern else []
    if not bounds or bounds[0]:
        bounds.insert(0, 0)
    bounds.append(len(text))
    return [(a, b) for a, b in pairwise(bounds) if a < b]


def _cut_tokens(backend: Any) -> list[str]:
    """The special tokens to cut texts at: each one's every match in a text is a match of the tokenizer's own
    first pass, whatever surrounds it. So: matched on the raw text (normalized=False), no whitespace
    stripping or word-boundary rule of its own, no other added token that contains it or whose end overlaps
    its start (the tokenizer's leftmost-longest match would take that one instead), and edges that are
    neither whitespace (another token's strip could eat them) nor word characters (another token's
    single_word rule looks at its neighbours)."""
    tokens = list(backend.get_added_tokens_decoder().values())
    raw = [t.content for t in tokens if not t.normalized]
    cuts = []
    for token in tokens:
        text = token.content
        if not token.special or token.normalized or token.lstrip or token.rstrip or token.single_word or \
                not _neutral_edges(text) or _overlapped(text, raw):
            continue
        cuts.append(text)
    return cuts[:MAX_CUT_TOKENS]


def _neutral_edges(text: str) -> bool:
    return bool(text) and all(not (c.isspace() or c.isalnum() or c == "_") for c in (text[0], text[-1]))


def _overlapped(text: str, others: Sequence[str]) -> bool:
    """Whether another token contains `text`, or ends with a proper prefix of it."""
    inner = set(text[:-1])
    for other in others:
        if other == text:
            continue
        if text in other:
            return True
        if other[-1] in inner and any(other.endswith(text[:k]) for k in range(1, min(len(other), len(text)))):
            return True
    return False


FILLERS = ("", " ", "  ", "\n", " \n", "\n\n ", "\t", "a", " a", "a ", "Hello world", " hello\n", "▁x", " ▁ ",
           "café", "e\u0301", "東京 ", "😀", "🚀x", "12345", "'s", "don't", "<", ">", "<|", "|>", "\r\n", "   x  ")
"""Text around and between added tokens in the self-test: spaces, newlines, unicode, partial markup."""


def _tricky_texts(backend: Any, cut_tokens: Sequence[str], count: int) -> list[str]:
    """Deterministic strings mixing the cut tokens, other added tokens, their fragments, and FILLERS."""
    rng = random.Random(0)
    cuts = rng.sample(sorted(cut_tokens), min(len(cut_tokens), 8))
    others = [t.content for t in backend.get_added_tokens_decoder().values() if t.content not in cuts]
    others = rng.sample(others, min(len(others), 8))
    fragments = [t[:-1] for t in cuts] + [t[1:] for t in cuts]
    texts = []
    for _ in range(count):
        parts = [rng.choice(cuts) if rng.random() < 0.4 else rng.choice(others or cuts) if rng.random() < 0.2
                 else rng.choice(fragments) if rng.random() < 0.1 else rng.choice(FILLERS)
                 for _ in range(rng.randint(1, 12))]
        texts.append("".join(parts))
    return texts


def _same_offsets(pieces: Any, expected: Any) -> bool:
    """Whether `pieces` answers exactly as the whole-text Encoding: every offset, and every character's token."""
    offsets = np.asarray(pieces.offsets, dtype=np.int64).reshape(-1, 2).tolist()
    if offsets != [list(o) for o in expected.offsets]:
        return False
    length = max([end for _, end in offsets], default=0) + 2
    return all(pieces.char_to_token(p) == expected.char_to_token(p) for p in range(length)) and \
        all(tuple(pieces.token_to_chars(k)) == tuple(expected.token_to_chars(k)) for k in range(len(offsets)))
