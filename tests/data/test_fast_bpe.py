"""The tiktoken path (data/fast_bpe.py) changes nothing but speed: on the byte-level fixture tokenizers it gives
the tokenizer's own ids and offsets (every character's token, every token's characters) on generated text, an
Encoder through it writes byte-identical examples and errors, and a tokenizer whose merges tiktoken would apply
differently — or that it cannot take — is refused."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_encode_cache import assert_same, conversations

from conftest import real_tokenizer, shared_real_tokenizer, tiny_chat_tokenizer
from sftlab.data import encode as encode_module
from sftlab.data.encode import Encoder
from sftlab.data.fast_bpe import FastBPE, _byte_table, fast_bpe_for
from sftlab.data.schema import Conversation, Message
from sftlab.data.templates import load_template

WITH_TEMPLATES = ("qwen2_5", "llama3_2", "mistral_nemo")
BYTE_LEVEL = (*WITH_TEMPLATES, "gpt2")
"""The fixture tokenizers the fast path takes: three regexes (Qwen's, Llama 3's, Tekken's), NFC or none, merges
with and without ignore_merges, GPT-2's own ByteLevel regex and its `<|endoftext|>` (an added token that is in
the vocabulary too). Gemma 3's is SentencePiece-style, with byte fallback: refused."""

MARKUP = ("<|im_end|>", "<|im_start|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
          "<|endoftext|>", "<tool_call>", "<|im_end", "|>", "<|")
alphabet = st.characters(blacklist_categories=("Cs", "Co"))
pieces = st.one_of(st.text(alphabet, max_size=16), st.sampled_from(MARKUP),
                   st.sampled_from([" ", "  ", "\n", "\n\n", " \n", "\t", "\r\n", "'s", "'LL", "123456", "é",
                                    "e\u0301", "🙂", "東京", "\u00a0", "ﬁ"]),
                   st.text(st.sampled_from(" \na0é😀."), min_size=1, max_size=30))
texts = st.lists(pieces, max_size=12).map("".join)


def _fast(name: str) -> FastBPE:
    fast = fast_bpe_for(shared_real_tokenizer(name).backend_tokenizer)
    assert fast is not None, f"{name}: the fast path refused a byte-level fixture tokenizer"
    return fast


def assert_same_encoding(got, want, text: str) -> None:
    assert np.asarray(got.ids).tolist() == want.ids
    assert np.asarray(got.offsets).reshape(-1, 2).tolist() == [list(o) for o in want.offsets]
    assert [got.char_to_token(p) for p in range(len(text) + 2)] == [want.char_to_token(p) for p in range(len(text) + 2)]
    assert [tuple(got.token_to_chars(k)) for k in range(len(want.ids))] == \
        [tuple(want.token_to_chars(k)) for k in range(len(want.ids))]


@pytest.mark.parametrize("name", BYTE_LEVEL)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(texts, min_size=1, max_size=6))
def test_ids_and_offsets_equal_the_tokenizers(name: str, batch: list[str]) -> None:
    backend = shared_real_tokenizer(name).backend_tokenizer
    for text, got, want in zip(batch, _fast(name).encode_batch(batch), backend.encode_batch(batch,
                                                                                            add_special_tokens=False)):
        assert_same_encoding(got, want, text)


@pytest.mark.parametrize("name", WITH_TEMPLATES)
def test_realistic_rows_equal_the_tokenizers(name: str) -> None:
    """Rendered tool-calling and chat rows (the shapes of bench_encode.py's data), on the batch path."""
    tokenizer = shared_real_tokenizer(name)
    tools = [{"type": "function", "function": {"name": "lookup_order", "description": "Find an order — by id.",
                                               "parameters": {"type": "object", "properties": {
                                                   "order_id": {"type": "string", "pattern": "^[A-Z]{2}\\d{6}$"}}}}}]
    rendered = []
    for k in range(40):
        messages = [{"role": "system", "content": f"You are agent #{k}.   Be brief.\n\n"},
                    {"role": "user", "content": f"Where's order AB{k:06d}?  I've waited {k} days… 😤\n```json\n"
                                                f"{json.dumps({'id': k, 'x': [1.5, None, 'ü']})}\n```"},
                    {"role": "assistant", "content": f"  Order AB{k:06d} ships tomorrow.\n\n- item\n- 東京"}]
        rendered.append(tokenizer.apply_chat_template(messages, tools=tools if k % 2 else None, tokenize=False))
    wanted = tokenizer.backend_tokenizer.encode_batch(rendered, add_special_tokens=False)
    for text, got, want in zip(rendered, _fast(name).encode_batch(rendered), wanted):
        assert_same_encoding(got, want, text)


def test_text_the_normaliser_would_change_goes_to_the_tokenizer() -> None:
    """Qwen normalises to NFC: a decomposed é is the tokenizer's to encode (offsets point into the raw text)."""
    fast = _fast("qwen2_5")
    before = fast.fallbacks
    text = "<|im_start|>user\nCafe\u0301 au lait<|im_end|>"
    [got] = fast.encode_batch([text])
    assert fast.fallbacks == before + 1
    assert_same_encoding(got, shared_real_tokenizer("qwen2_5").backend_tokenizer.encode(text, add_special_tokens=False),
                         text)


@pytest.mark.parametrize("name", WITH_TEMPLATES)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(conversations(), min_size=1, max_size=5))
def test_an_encoder_through_it_writes_the_same_examples(name: str, batch: list[Conversation]) -> None:
    tokenizer = shared_real_tokenizer(name)
    template = load_template("auto", tokenizer)
    plain = Encoder(tokenizer, template, fast_bpe=False, cache_tokens=False)
    fast = Encoder(tokenizer, template, fast_bpe=True)
    for want, got in zip(plain.encode_batch(batch), fast.encode_batch(batch), strict=True):
        assert_same(want, got)
    assert isinstance(fast._fast, FastBPE)


def test_an_encoder_switches_after_enough_texts(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default the set-up (about a second) waits for a build of FAST_BPE_AFTER texts; the switch mid-build
    changes no example."""
    monkeypatch.setattr(encode_module, "FAST_BPE_AFTER", 6)
    tokenizer = shared_real_tokenizer("qwen2_5")
    template = load_template("auto", tokenizer)
    rows = [Conversation((Message("user", f"What is {k} × 3?"), Message("assistant", f"{3 * k}, I'd say.")), f"t:{k}")
            for k in range(12)]
    plain, auto = Encoder(tokenizer, template, fast_bpe=False), Encoder(tokenizer, template)
    for batch in (rows[:4], rows[4:8], rows[8:]):
        for want, got in zip(plain.encode_batch(batch), auto.encode_batch(batch), strict=True):
            assert_same(want, got)
    assert isinstance(auto._fast, FastBPE) and auto._texts_tokenized == 12
    assert Encoder(tokenizer, template, fast_bpe=False)._fast_bpe(10_000) is None


def test_tokenizers_it_cannot_take_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert FastBPE.create(shared_real_tokenizer("gemma3").backend_tokenizer) is None  # byte fallback, "▁" pieces
    from tokenizers import pre_tokenizers

    tiny = tiny_chat_tokenizer().backend_tokenizer  # byte-level BPE trained here: taken
    assert FastBPE.create(tiny) is not None
    tiny.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # a space before the text: refused
    assert FastBPE.create(tiny) is None
    from tokenizers import AddedToken

    llama = real_tokenizer("llama3_2")
    llama.add_tokens([AddedToken("<|tab|>", special=True, normalized=False, lstrip=True)], special_tokens=True)
    assert FastBPE.create(llama.backend_tokenizer) is None  # tiktoken cannot strip spaces before a token
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    assert FastBPE.create(shared_real_tokenizer("qwen2_5").backend_tokenizer) is None  # not installed


def _byte_level_bpe(merges: list[tuple[str, str]], made: dict[str, int]):
    """A byte-level BPE tokenizer over all 256 bytes plus `made` tokens at the given ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    stand_in = {v: chr(k) for k, v in _byte_table().items() if k >= 256}  # byte -> its vocabulary character
    alphabet = {stand_in.get(chr(b), chr(b)): b for b in range(256)}
    vocab = {**alphabet, **made}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return tokenizer


def test_merges_out_of_id_order_are_refused() -> None:
    """tiktoken merges the pair whose result has the lowest id; the tokenizer, the first pair in its merges
    list. Where the two orders differ, so can the tokens: refused. In order, taken."""
    merges = [("a", "b"), ("b", "c")]
    assert FastBPE.create(_byte_level_bpe(merges, {"ab": 256, "bc": 257})) is not None
    backwards = _byte_level_bpe(merges, {"ab": 257, "bc": 256})
    assert FastBPE.create(backwards) is None
    assert backwards.encode("abc").tokens == ["ab", "c"]  # tiktoken would give a, bc
    assert FastBPE.create(_byte_level_bpe([("a", "b")], {"ab": 256, "abc": 257})) is None  # abc made by no merge


def test_copies_of_one_tokenizers_backend_share_one_set_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """An Encoder may hold its own plain copy of the backend (data/encode.py's `_plain_backend`, where the
    post-processor trims offsets); the set-up, about a second, is made once per tokenizer all the same."""
    import copy

    owner = real_tokenizer("llama3_2").backend_tokenizer
    made = []
    real_create = FastBPE.create.__func__
    monkeypatch.setattr(FastBPE, "create", classmethod(lambda cls, backend: made.append(backend) or
                                                       real_create(cls, backend)))
    first = fast_bpe_for(copy.deepcopy(owner), owner)
    assert first is not None and fast_bpe_for(copy.deepcopy(owner), owner) is first
    assert len(made) == 1
    owner.add_tokens(["<|new|>"])  # the tokenizer changed: made again
    assert fast_bpe_for(copy.deepcopy(owner), owner) is not first and len(made) == 2
