"""Byte-level BPE through tiktoken: the tokenizer's own ids, with about a quarter of the CPU.

Qwen, Llama 3, GPT-2 and most recent models tokenise the same way: cut out the added tokens, NFC-normalise (or
not), split the rest with one regex, map each piece to bytes and merge byte pairs in the order the merges
list gives. tiktoken runs that algorithm (regex split, then repeatedly merge the adjacent pair whose joined
bytes have the lowest id) about 4× faster than `tokenizers` on our 2-core machines (0.27 against 1.06 ms of CPU
per 2,600-character tool-calling conversation). The two agree where the tokenizer's merges are ordered as its
ids are, so `FastBPE.create` takes a tokenizer only where that can be checked:

- the model is byte-level BPE with nothing else (no dropout, byte fallback, unknown token, word prefix or
  suffix); the normaliser is none or NFC; the pre-tokenizer is one regex `Split` (whose pieces are its
  matches) followed by a plain `ByteLevel`, or a `ByteLevel` with its own regex; every added token is matched
  on the raw text with no stripping or word rule, and none is a prefix of another (tiktoken takes the first
  alternative, the tokenizer the longest);
- every merge makes a token of the vocabulary and the merges' order is the order of the ids they make
  (tiktoken merges by id), and, where the tokenizer does not take a whole word found in the vocabulary as
  it is (`ignore_merges`), merging each token's own bytes gives that token (tiktoken always takes it);
- a self-test: tricky strings (added tokens, spaces, newlines, unicode, runs of one character, random
  joins of vocabulary tokens) give exactly the tokenizer's ids and offsets.

A text the normaliser would change, or whose tokens do not spell it (a regex that skips characters), is
encoded by the tokenizer itself. Character offsets come from the tokens' byte lengths: a token holding part
of a character spans the whole character, as the tokenizer reports it. `tiktoken` missing, or any check
failing: None, and the Encoder uses the tokenizer as before.
"""

from __future__ import annotations

import json
import random
import unicodedata
from array import array
from collections.abc import Callable, Sequence
from functools import cache
from itertools import pairwise
from typing import Any, TypeVar

import numpy as np

from sftlab.data.token_cache import Spans

T = TypeVar("T")

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
"""The regex of a `ByteLevel` pre-tokenizer with use_regex=true (GPT-2's)."""

SEPARATOR = "\ue000sftlab:end-of-text\ue000"
"""Joins the texts of a batch for one tiktoken call: a special token of our own (id past the vocabulary),
made of private-use characters; a text holding it is encoded by the tokenizer itself."""

SELF_TEST_TEXTS = 600
"""Strings the self-test compares with the tokenizer (about 0.1 s)."""


@cache
def _byte_table() -> dict[int, str]:
    """`str.translate` table from the byte-level alphabet to one character per byte (then encoded as Latin-1):
    GPT-2's mapping, where printable Latin-1 bytes stand for themselves and the other 68 are shifted to code
    points 256 and up, in order. Other characters below 256 map to one that Latin-1 cannot encode."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    table = {b: "\uffff" for b in shifted}
    table.update({256 + k: chr(b) for k, b in enumerate(shifted)})
    return table


def _token_bytes(token: str) -> bytes | None:
    """A vocabulary token's bytes, or None if it is not written in the byte-level alphabet."""
    try:
        return token.translate(_byte_table()).encode("latin-1")
    except UnicodeEncodeError:
        return None


class FastBPE:
    """Encodes texts as `backend.encode_batch(texts, add_special_tokens=False)` would, through tiktoken."""

    def __init__(self, backend: Any, encoding: Any, lengths: np.ndarray, nfc: bool) -> None:
        self._backend = backend
        self._encoding = encoding
        self._specials = set(encoding.special_tokens_set)
        self._lengths = lengths  # bytes of each token id (added tokens: their UTF-8)
        self._separator_id = encoding.encode_single_token(SEPARATOR)
        self._nfc = nfc
        self.fallbacks = 0
        """Texts encoded by the tokenizer itself (not NFC, or tokens that do not spell the text)."""

    @classmethod
    def create(cls, backend: Any) -> FastBPE | None:
        """The fast path for this backend, or None where it cannot be shown to give the same ids."""
        try:
            import tiktoken
        except ImportError:
            return None
        if backend is None:
            return None
        try:
            made = _build(tiktoken, backend)
        except Exception:  # an unusual tokenizer.json (a field of another shape): not for the fast path
            return None
        if made is None:
            return None
        fast = cls(backend, *made)
        return fast if fast.self_test() else None

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[Any]:
        """Encodings (`Spans`) of the texts: one tiktoken call for the batch (see `_encode_joined`); a text it
        cannot take is encoded by the tokenizer itself (a `tokenizers.Encoding`)."""
        assert not add_special_tokens
        results: list[Any] = [None] * len(texts)
        fast = [k for k, text in enumerate(texts) if SEPARATOR not in text and not (
            self._nfc and not text.isascii() and not unicodedata.is_normalized("NFC", text))]
        if fast:
            for k, spans in zip(fast, self._encode_joined([texts[k] for k in fast])):
                results[k] = spans
        slow = [k for k, spans in enumerate(results) if spans is None]
        if slow:
            self.fallbacks += len(slow)
            for k, encoding in zip(slow, self._backend.encode_batch([texts[k] for k in slow],
                                                                    add_special_tokens=False)):
                results[k] = encoding
        return results

    def _encode_joined(self, texts: list[str]) -> list[Spans | None]:
        """The texts joined, each followed by SEPARATOR, encoded in one call: tiktoken releases the GIL for the
        whole batch (a call per text gave it back ~0.3 ms later and waited up to 5 ms to take it again from the
        thread rendering the next batch: half the speed). Special tokens cut the text, and each stretch between
        two is split and merged on its own, so each text's tokens are those of the text alone — checked: the
        separator must come out as its own token right where each text ends (else that text goes to the
        tokenizer). Offsets come from the tokens' byte lengths."""
        joined = SEPARATOR.join(texts) + SEPARATOR
        try:
            data = joined.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: the tokenizer's business
            return [None] * len(texts)
        ids = self._encoding.encode_to_numpy(joined, allowed_special=self._specials).astype(np.int64)
        lengths = self._lengths[ids]
        byte_ends = np.cumsum(lengths)
        byte_starts = byte_ends - lengths
        if byte_ends[-1] != len(data):  # the tokens do not spell the text (a regex that skips characters)
            return [None] * len(texts)
        if len(data) == len(joined):  # ASCII: bytes are characters
            starts, ends = byte_starts, byte_ends
        else:
            char_of_byte = np.cumsum((np.frombuffer(data, dtype=np.uint8) & 0xC0) != 0x80) - 1
            starts, ends = char_of_byte[byte_starts], char_of_byte[byte_ends - 1] + 1
        text_starts = np.cumsum([0] + [len(t) + len(SEPARATOR) for t in texts])[:-1]
        first = np.searchsorted(starts, text_starts)  # each text's first token
        after = np.searchsorted(starts, text_starts + [len(t) for t in texts])  # its separator's token
        whole = (after < len(ids)) & (ids[np.minimum(after, len(ids) - 1)] == self._separator_id)
        whole &= starts[np.minimum(after, len(ids) - 1)] == text_starts + [len(t) for t in texts]
        results: list[Spans | None] = []
        for k in range(len(texts)):
            if not whole[k]:
                results.append(None)
                continue
            a, b, shift = first[k], after[k], text_starts[k]
            results.append(Spans(ids[a:b], array("q", (starts[a:b] - shift).tobytes()),
                                 array("q", (ends[a:b] - shift).tobytes()), monotone=True))
        return results

    def self_test(self, count: int = SELF_TEST_TEXTS) -> bool:
        """Whether this gives the tokenizer's own ids and offsets on tricky strings."""
        texts = _tricky_texts(self._backend, count)
        expected = self._backend.encode_batch(texts, add_special_tokens=False)
        fallbacks = self.fallbacks
        got = self.encode_batch(texts)
        self.fallbacks = fallbacks
        return all(np.asarray(g.ids).tolist() == w.ids and
                   np.asarray(g.offsets).tolist() == [list(o) for o in w.offsets] for g, w in zip(got, expected))


_MADE: dict[int, tuple[Any, int, Any]] = {}
"""FastBPE.create's answers in this process, by tokenizer backend (kept alive here) and its vocabulary's size."""


def fast_bpe_for(backend: Any, owner: Any = None) -> FastBPE | None:
    """FastBPE.create(backend), once per tokenizer and process (Encoders of one run share a tokenizer, each with
    its own plain copy of the backend, data/encode.py's `_plain_backend`): `owner`, the tokenizer's own backend,
    is the key where given."""
    if backend is None:
        return None
    return once_per_tokenizer(_MADE, backend, owner, FastBPE.create)


def once_per_tokenizer(made: dict[int, tuple[Any, int, T]], backend: Any, owner: Any, make: Callable[[Any], T]) -> T:
    """make(backend), kept in `made` by tokenizer: `owner` (the tokenizer's own backend) where given, else
    `backend`, held alive there, with its vocabulary's size, so a token added since makes it again. At most four
    tokenizers are kept."""
    key = owner if owner is not None else backend
    size = key.get_vocab_size(with_added_tokens=True)
    entry = made.get(id(key))
    if entry is None or entry[0] is not key or entry[1] != size:
        if len(made) >= 4:
            made.clear()
        entry = made[id(key)] = (key, size, make(backend))
    return entry[2]


def _build(tiktoken: Any, backend: Any) -> tuple[Any, np.ndarray, bool] | None:
    """(tiktoken Encoding, byte length per id, NFC?) where the tokenizer's structure allows; else None."""
    state = json.loads(backend.to_str())
    model = state["model"]
    if model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback") or \
            model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("unk_token"):
        return None
    nfc = _normalizer_is_nfc(state.get("normalizer"))
    if nfc is None:
        return None
    pattern = _pattern(state.get("pre_tokenizer"))
    if pattern is None:
        return None
    specials = _added_tokens(state.get("added_tokens") or [])
    if specials is None:
        return None
    ranks: dict[bytes, int] = {}
    for token, index in model["vocab"].items():
        raw = _token_bytes(token)
        if raw is None or raw in ranks:
            return None
        ranks[raw] = index
    if any(bytes([b]) not in ranks for b in range(256)):
        return None
    ids = set(ranks.values())
    for content, index in specials.items():  # an added token may sit in the vocabulary too: tiktoken wants it once
        raw = content.encode("utf-8")
        if ranks.get(raw) == index:
            del ranks[raw]
        elif index in ids:
            return None
    if not _merges_ordered_by_id(model):
        return None
    if not model.get("ignore_merges") and not _tokens_merge_to_themselves(backend, model["vocab"], set(specials)):
        return None
    size = max([*ranks.values(), *specials.values()]) + 1
    if SEPARATOR in specials:
        return None
    specials[SEPARATOR] = size
    size += 1
    encoding = tiktoken.Encoding(f"sftlab-{id(backend)}", pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens=specials)
    lengths = np.zeros(size, dtype=np.int64)
    for raw, index in ranks.items():
        lengths[index] = len(raw)
    for content, index in specials.items():
        lengths[index] = len(content.encode("utf-8"))
    return encoding, lengths, nfc


def _normalizer_is_nfc(normalizer: dict[str, Any] | None) -> bool | None:
    """False for no normaliser, True for NFC alone, None for anything else."""
    if normalizer is None:
        return False
    if normalizer.get("type") == "Sequence":
        inner = normalizer.get("normalizers") or []
        if not inner:
            return False
        return _normalizer_is_nfc(inner[0]) if len(inner) == 1 else None
    return True if normalizer.get("type") == "NFC" else None


def _pattern(pre: dict[str, Any] | None) -> str | None:
    """The regex that splits text into words, where the pre-tokenizer is a regex and byte-level mapping."""
    if pre is None:
        return None
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and _plain_byte_level(steps[0], use_regex=True):
        return GPT2_PATTERN
    if len(steps) != 2 or not _plain_byte_level(steps[1], use_regex=False):
        return None
    split = steps[0]
    regex = (split.get("pattern") or {}).get("Regex")
    # The pieces are the regex's matches (tiktoken's findall): Isolated keeps the text between matches as pieces
    # too (none with a regex that matches everything; else the tokens do not spell the text, and the tokenizer
    # encodes it), Removed with invert drops it, as tiktoken does.
    kept = (split.get("behavior"), bool(split.get("invert"))) in (("Isolated", False), ("Removed", True))
    if split.get("type") != "Split" or regex is None or not kept:
        return None
    return regex


def _plain_byte_level(step: dict[str, Any], *, use_regex: bool) -> bool:
    return step.get("type") == "ByteLevel" and not step.get("add_prefix_space") and \
        bool(step.get("use_regex", True)) == use_regex


def _added_tokens(tokens: list[dict[str, Any]]) -> dict[str, int] | None:
    """Added tokens by content, where each is matched as tiktoken matches its special tokens."""
    found: dict[str, int] = {}
    for token in tokens:
        if token.get("normalized") or token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            return None
        content = token["content"]
        if not content or content in found:
            return None
        found[content] = int(token["id"])
    contents = sorted(found)
    if any(b.startswith(a) for a, b in pairwise(contents)):  # sorted: a prefix comes right before
        return None
    return found


def _merges_ordered_by_id(model: dict[str, Any]) -> bool:
    """Every merge joins two vocabulary tokens into a third, and the merges' order is their results' id order
    (each result made by one merge, or by merges that all come before any later id's)."""
    vocab = model["vocab"]
    last = -1
    for merge in model["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        made = vocab.get(left + right)
        if made is None or made < last or left not in vocab or right not in vocab:
            return False
        last = made
    return True


def _tokens_merge_to_themselves(backend: Any, vocab: dict[str, int], added: set[str]) -> bool:
    """Whether the merges alone turn each token's own characters into that token (tiktoken takes a word
    found in the vocabulary whole; a tokenizer without ignore_merges runs the merges on it). Added tokens
    (GPT-2's `<|endoftext|>` is in its vocabulary too) are cut out before any merging: not asked."""
    from tokenizers import Tokenizer

    bare = Tokenizer(backend.model)  # the same BPE model: no normaliser, pre-tokenizer or added tokens
    tokens = [t for t in vocab if t not in added]
    for start in range(0, len(tokens), 4096):  # in slices: 150k Encodings at once held ~100 MB
        chunk = tokens[start:start + 4096]
        if not all(e.ids == [vocab[t]] for t, e in zip(chunk, bare.encode_batch(chunk, add_special_tokens=False))):
            return False
    return True


FILLERS = ("", " ", "  ", "   ", "\n", "\n\n", " \n", "\n ", "\t", "\r\n", "a", " a", "Hello world", " hello\n",
           "café", "e\u0301", "東京 ", "😀", "🚀x", "12345", "1234567", "'s", "'S", "don't", "I'M", "<", ">", "<|",
           "|>", "{\"a\": 1}", "```py\n", "Ω≈ç√", "ñ", "\u200b", "\u00a0", "x\u0300\u0301", "ﬁ", "ｈｅｌｌｏ")
"""Text in the self-test's strings: spaces, newlines, digits, contractions, unicode (combining, wide, emoji)."""


def _tricky_texts(backend: Any, count: int) -> list[str]:
    """Deterministic strings of added tokens, fillers, runs of one character and joined vocabulary tokens."""
    rng = random.Random(0)
    added = [t.content for t in backend.get_added_tokens_decoder().values()]
    added = rng.sample(added, min(len(added), 16))
    vocab = backend.get_vocab(with_added_tokens=False)
    words = [_token_bytes(t) for t in rng.sample(sorted(vocab), min(len(vocab), 4000))]
    words = [w.decode("utf-8", "ignore") for w in words if w is not None]
    texts = [ch * n for ch in " a\n=-0.!é😀" for n in (1, 2, 3, 5, 8, 13, 21)]
    while len(texts) < count:
        parts = []
        for _ in range(rng.randint(1, 14)):
            roll = rng.random()
            parts.append(rng.choice(added) if added and roll < 0.15 else rng.choice(FILLERS) if roll < 0.45
                         else rng.choice(words) if words else "x")
        texts.append("".join(parts))
    return texts[:count]
