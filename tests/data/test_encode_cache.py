"""The token cache (data/token_cache.py) changes nothing but speed: for every fixture tokenizer, conversations
encoded through it give byte-identical input_ids, labels, role codes and errors to whole-text encoding, on
first sight, when their units are cached, and when they are read back from the cache; the cache stays within
its bound; a tokenizer where cut-wise encoding would differ is refused by the self-test."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REAL_TOKENIZERS, shared_real_tokenizer, tiny_chat_tokenizer
from sftlab.data.encode import Encoder
from sftlab.data.schema import Conversation, Message, ToolCall
from sftlab.data.templates import load_template
from sftlab.data.token_cache import PieceCache, _cut_tokens
from sftlab.errors import DataError

TOOLS = ({"type": "function", "function": {"name": "get_weather", "description": "Weather for a city, naïve café 東京.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "search", "description": "Search  the web\n\n",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}})
SYSTEMS = ("You are a helpful assistant. Answer briefly, and say when you are not sure about something.",
           "  Leading and trailing spaces around a long system prompt that repeats across many rows.  ",
           "Tu es un assistant serviable — réponds en français. 你是一个乐于助人的助手。😀 ▁▁ ends with newline\n",
           "Short.")
MARKUP = ("<|im_end|>", "<|im_start|>", "<|eot_id|>", "<|start_header_id|>", "<end_of_turn>", "<start_of_turn>",
          "<tool_call>", "<bos>", "<|endoftext|>")
"""Special-token strings typed inside contents (kept as text by default: the forgery path)."""

words = st.text(st.characters(blacklist_categories=("Cs", "Co")), max_size=12)
pieces = st.one_of(words, st.sampled_from(MARKUP), st.sampled_from([" ", "  ", "\n", " \n", "é", "e\u0301", "🙂"]))
contents = st.lists(pieces, min_size=1, max_size=6).map("".join).filter(lambda s: s.strip() != "")
long_contents = st.one_of(st.sampled_from(SYSTEMS), contents)


@st.composite
def conversations(draw: st.DrawFn) -> Conversation:
    messages = [Message("system", draw(long_contents))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages.append(Message("user", draw(long_contents)))
        if draw(st.booleans()):
            call = ToolCall(draw(st.sampled_from(["get_weather", "search"])), {"city": draw(words)}, "call0")
            messages += [Message("assistant", "", tool_calls=(call,)),
                         Message("tool", draw(contents), tool_call_id="call0")]
        messages.append(Message("assistant", draw(long_contents), reasoning=draw(st.one_of(st.none(), contents))))
    return Conversation(tuple(messages), "gen:1", tools=TOOLS if draw(st.booleans()) else None)


def _tokenizer(name: str):
    return tiny_chat_tokenizer() if name == "tiny" else shared_real_tokenizer(name)


_ENCODERS: dict[str, tuple[Encoder, Encoder]] = {}


def encoders(name: str) -> tuple[Encoder, Encoder]:
    """(whole-text encoder, cached encoder) for a tokenizer; the cached one lives across hypothesis examples
    and caches every unit of 8+ characters, so that most of its units come from the cache."""
    if name not in _ENCODERS:
        tokenizer = _tokenizer(name)
        template = load_template("chatml" if name == "tiny" else "auto", tokenizer)
        whole = Encoder(tokenizer, template, cache_tokens=False)
        cached = Encoder(tokenizer, template)
        assert cached._pieces is not None, f"{name}: the token cache refused a fixture tokenizer"
        cached._pieces = PieceCache.create(cached._backend, min_chars=8)  # cache far more than by default
        _ENCODERS[name] = (whole, cached)
    return _ENCODERS[name]


def assert_same(expected, got) -> None:
    if isinstance(expected, DataError):
        assert type(got) is type(expected) and str(got) == str(expected) and got.reason == expected.reason
        return
    assert not isinstance(got, DataError), got
    assert got.ids.dtype == expected.ids.dtype and got.ids.tobytes() == expected.ids.tobytes()
    assert got.trained.tobytes() == expected.trained.tobytes()
    assert np.array_equal(got.role_codes, expected.role_codes)
    assert (got.truncated, got.special_tokens_in_content) == (expected.truncated, expected.special_tokens_in_content)
    assert got.example == expected.example


@pytest.mark.parametrize("name", [*REAL_TOKENIZERS, "tiny"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(conversations(), min_size=1, max_size=5))
def test_cached_encoding_is_byte_identical_to_whole_text(name: str, batch: list[Conversation]) -> None:
    whole, cached = encoders(name)
    expected = whole.encode_batch(batch)
    for _ in range(3):  # first sight, cached on second sight, read from the cache
        for want, got in zip(expected, cached.encode_batch(batch), strict=True):
            assert_same(want, got)


@pytest.mark.parametrize("name", [*REAL_TOKENIZERS, "tiny"])
def test_repeated_prompts_come_from_the_cache(name: str) -> None:
    """With default settings, a long prefix repeated over rows (a system prompt, a few-shot exchange) is cached
    and reused, and the rows still encode exactly as whole texts."""
    tokenizer = _tokenizer(name)
    template = load_template("chatml" if name == "tiny" else "auto", tokenizer)
    whole, cached = Encoder(tokenizer, template, cache_tokens=False), Encoder(tokenizer, template)
    shared = (Message("system", SYSTEMS[0] * 4), Message("user", SYSTEMS[2] * 4), Message("assistant", SYSTEMS[1] * 4))
    rows = [Conversation((*shared, Message("user", f"Question {k}: what is {k} + 1?"),
                          Message("assistant", f"It is {k + 1}.")), f"gen:{k}") for k in range(30)]
    for batch in (rows[:15], rows[15:]):  # the first batch caches them (encoded once), the second reads them
        for want, got in zip(whole.encode_batch(batch), cached.encode_batch(batch), strict=True):
            assert_same(want, got)
    assert cached._pieces.hits >= 12


@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_pieces_answer_as_the_whole_encoding(name: str) -> None:
    """Offsets, char_to_token at every position and token_to_chars of every token, against tokenizers'."""
    backend = Encoder(_tokenizer(name), load_template("auto", _tokenizer(name)))._backend
    cuts = _cut_tokens(backend)
    texts = [f"{cuts[0]}system\n{SYSTEMS[2]}{cuts[-1]} \n{cuts[0]}  x 🙂 e\u0301{cuts[-1]}", f"  {SYSTEMS[1]}{cuts[0]}",
             f"{cuts[0]}{cuts[0]}{SYSTEMS[0]}", ""]
    cache = PieceCache(backend, cuts, min_chars=1)
    for _ in range(3):
        wanted = backend.encode_batch(texts, add_special_tokens=False)
        for (ids, pieces), want in zip(cache.encode_batch(texts), wanted, strict=True):
            assert list(np.asarray(ids)) == want.ids
            assert np.asarray(pieces.offsets).reshape(-1, 2).tolist() == [list(o) for o in want.offsets]
            assert [pieces.char_to_token(p) for p in range(len(texts[0]) + 2)] == \
                [want.char_to_token(p) for p in range(len(texts[0]) + 2)]
            assert [tuple(pieces.token_to_chars(k)) for k in range(len(want.ids))] == \
                [tuple(want.token_to_chars(k)) for k in range(len(want.ids))]
    assert cache.hits > 0


def test_the_cache_stays_within_its_bound() -> None:
    backend = Encoder(_tokenizer("qwen2_5"), load_template("auto", _tokenizer("qwen2_5")))._backend
    cache = PieceCache(backend, _cut_tokens(backend), max_chars=2_000, max_tokens=400, min_chars=16)
    texts = [f"<|im_start|>system\nprompt number {k} " + "word " * (k % 50) for k in range(300)]
    for _ in range(3):
        for (ids, _), want in zip(cache.encode_batch(texts), backend.encode_batch(texts, add_special_tokens=False)):
            assert list(np.asarray(ids)) == want.ids
        assert cache.chars <= 2_000 and cache.tokens <= 400
        assert cache.chars == sum(len(unit) for unit in cache._cache)
        assert cache.tokens == sum(len(unit.ids) for unit in cache._cache.values())
    assert cache.tokens > 300 and cache.hits > 0  # full, and still reused


def test_a_tokenizer_that_is_not_cut_wise_exact_is_refused() -> None:
    """Cutting at a token that strips the whitespace before it (lstrip) changes the encoding: `_cut_tokens`
    never picks such a token, and the self-test catches a cut that is not exact anyway."""
    from tokenizers import AddedToken

    tokenizer = tiny_chat_tokenizer()
    tokenizer.add_tokens([AddedToken("<|sep|>", special=True, normalized=False, lstrip=True)], special_tokens=True)
    backend = tokenizer.backend_tokenizer
    assert "<|sep|>" not in _cut_tokens(backend) and "<|im_end|>" in _cut_tokens(backend)
    assert PieceCache.create(backend) is not None
    assert not PieceCache(backend, ["<|sep|>"]).self_test()
    tokenizer.add_tokens([AddedToken("x<|im_end|", special=False, normalized=False)])  # overlaps <|im_end|>'s start
    assert "<|im_end|>" not in _cut_tokens(tokenizer.backend_tokenizer)


def test_an_encoding_pass_settles_the_heap_only_while_it_runs() -> None:
    """Encoder.encode_stream freezes what was alive before it (the collector's full passes skip it) and unfreezes
    it when the outermost pass ends, however it ends; cyclic garbage made during the pass is still collected."""
    import gc
    import weakref

    from sftlab.data.encode import settled_heap

    class Node:
        pass

    assert gc.get_freeze_count() == 0
    with settled_heap():
        frozen = gc.get_freeze_count()
        assert frozen > 0
        with settled_heap():
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen  # the inner pass ends, the outer holds on
        cycle = Node()
        cycle.self = cycle  # type: ignore[attr-defined]
        gone = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert gone() is None
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), settled_heap():
        raise RuntimeError
    assert gc.get_freeze_count() == 0
    tokenizer = tiny_chat_tokenizer()
    encoder = Encoder(tokenizer, load_template("chatml", tokenizer))
    row = Conversation((Message("user", "Hi"), Message("assistant", "Hello")))
    stream = encoder.encode_stream(iter([[row], [row], [row]]))
    next(stream)
    assert gc.get_freeze_count() > 0
    stream.close()  # a consumer that stops early (an error in a later row) unfreezes too
    assert gc.get_freeze_count() == 0
