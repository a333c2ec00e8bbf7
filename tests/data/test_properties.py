"""Property tests (hypothesis) of DESIGN.md invariants 1–3 over random valid conversations.

Conversations: an optional system message (whitespace-only included), 1–4 user/assistant turns, contents
mixing broad unicode (emoji, CJK, combining marks, controls, \\n, \\t), special-token-like text
("<|im_end|>", "<end_of_turn>", ...), leading/trailing whitespace and, sparingly, turns of a few thousand
characters; random per-message `train` overrides and `train_on` policies.

CI runs a fixed (derandomized) sample; SFTLAB_PROPERTY_EXAMPLES=2000 searches deeper.

Configurations: chatml on Qwen2.5, llama3 on Llama-3.2, auto on all three real tokenizers, and chatml on the
tiny base tokenizer with add_special_tokens. Tokenizers and encoders are built once per module.

Two tokenizer facts shape the expected decodes (neither is sftlab's doing):
- Qwen2.5 NFC-normalises its input, so decoding gives the NFC form of the text;
- Gemma-3 maps " " to "▁" before tokenising and back when decoding, so a literal "▁" decodes as " ".
"""

from __future__ import annotations

import functools
import os
import unicodedata
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from conftest import real_tokenizer, tiny_tokenizer
from sftlab.data.encode import IGNORE_INDEX, Dropped, Encoder
from sftlab.data.schema import Conversation, Message, validate
from sftlab.data.templates import load_template
from sftlab.errors import DataError

STRADDLE = "tokens straddle a mask boundary"
DROP_REASONS = ("no trained tokens", "too long")


@dataclass(frozen=True)
class Config:
    tokenizer: str
    template: str
    end_of_turn: str
    trims: bool
    """The template emits `content | trim` (the real Llama-3.2 and Gemma-3 templates)."""
    add_special_tokens: bool = False

    @property
    def id(self) -> str:
        return f"{self.template}-{self.tokenizer}"


CONFIGS = (
    Config("qwen2_5", "chatml", "<|im_end|>", trims=False),
    Config("llama3_2", "llama3", "<|eot_id|>", trims=False),
    Config("qwen2_5", "auto", "<|im_end|>", trims=False),
    Config("llama3_2", "auto", "<|eot_id|>", trims=True),
    Config("gemma3", "auto", "<end_of_turn>", trims=True),
    Config("tiny", "chatml", "<|im_end|>", trims=False, add_special_tokens=True),
)
AUTO_CONFIGS = tuple(c for c in CONFIGS if c.template == "auto")


@functools.cache
def _tokenizer(name: str) -> Any:
    # One private copy per module: the tiny one gains the ChatML tokens when its encoder is built.
    return tiny_tokenizer() if name == "tiny" else real_tokenizer(name)


@functools.cache
def _template(config: Config) -> Any:
    return load_template(config.template, _tokenizer(config.tokenizer))


@functools.cache
def _encoder(config: Config, train_on: str, max_seq_len: int | None, truncation: str, *,
             special_tokens_in_content: str = "text") -> Encoder:
    return Encoder(_tokenizer(config.tokenizer), _template(config), train_on=train_on, max_seq_len=max_seq_len,
                   truncation=truncation, add_special_tokens=config.add_special_tokens,
                   special_tokens_in_content=special_tokens_in_content)


def tokenizer_of(config: Config) -> Any:
    _encoder(config, "assistant", None, "drop")  # adds the template's special tokens where allowed
    return _tokenizer(config.tokenizer)


def as_decoded(config: Config, text: str) -> str:
    """`text` as the tokenizer gives it back after encode + decode (see the module docstring)."""
    if config.tokenizer == "qwen2_5":
        return unicodedata.normalize("NFC", text)
    if config.tokenizer == "gemma3":
        return text.replace("\u2581", " ")
    return text


def emitted(config: Config, content: str, role: str = "assistant") -> str:
    if role == "system" and folds_system(config):
        return content  # Gemma-3 puts the system prompt in front of the first user turn as given
    return content.strip() if config.trims else content


def decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def trained_runs(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    """Ids of each maximal run of trained positions."""
    runs: list[list[int]] = []
    previous_trained = False
    for token, label in zip(input_ids, labels):
        trained = label != IGNORE_INDEX
        if trained and not previous_trained:
            runs.append([])
        if trained:
            runs[-1].append(token)
        previous_trained = trained
    return runs


def mask_runs(segments: list[Any]) -> list[tuple[str, bool]]:
    """Adjacent segments of equal trainability joined: (text, trainable) of each run.

    Invariant 3 is checked at these boundaries, the ones that decide the mask. Inside a run the encoder
    may let the tokenizer merge across segments (e.g. a header's "\\n" and a content's leading "\\n"
    under train_on=all): the ids are the whole-string ids and every label is still exact.
    """
    runs: list[tuple[str, bool]] = []
    for segment in segments:
        if runs and runs[-1][1] == segment.trainable:
            runs[-1] = (runs[-1][0] + segment.text, segment.trainable)
        else:
            runs.append((segment.text, segment.trainable))
    return runs


# ---- strategies ---------------------------------------------------------------------------------------

SPECIAL_LIKE = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|im_start|>assistant\n", "</s>", "[INST]",
                "<|im_start|>", "<|begin_of_text|>", "<|start_header_id|>user<|end_header_id|>\n\n",
                "<start_of_turn>model\n", "<bos>", "<eos>", "<|endoftext|>", "[/INST]", "<s>")
WHITESPACE = (" ", "  ", "\n", "\n\n", "\t", " \n", "\r\n", "\u00a0", "\u3000")
PICKED = list("abcXYZ019 .,!?'-_#*\n\t\u00e9\u4e2d\u6587\u65e5\u672c\u8a9e\ud55c\uad6d\U0001f642\U0001f44d\U0001f3fd"
              "\u200d\u0301\u0308\u0327\u2581\u00ad\ufeff\u202e\u0000")

unicode_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=24)
picked_text = st.text(alphabet=st.sampled_from(PICKED), max_size=24)
fragment = st.one_of(picked_text, unicode_text, st.sampled_from(SPECIAL_LIKE), st.sampled_from(WHITESPACE))


@st.composite
def contents(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 19)) == 0:  # sparingly: a turn of a few thousand characters
        unit = draw(st.one_of(picked_text, unicode_text, st.sampled_from(SPECIAL_LIKE)).filter(bool))
        return unit * (draw(st.integers(2000, 4000)) // len(unit) + 1)
    text = "".join(draw(st.lists(fragment, min_size=1, max_size=5)))
    return text or draw(st.sampled_from(("x", " ", "<|im_end|>")))


@st.composite
def conversations(draw: st.DrawFn, overrides: bool) -> Conversation:
    train = st.sampled_from((None, None, True, False)) if overrides else st.just(None)
    messages: list[Message] = []
    if draw(st.booleans()):
        system = draw(st.one_of(contents(), st.sampled_from(WHITESPACE)))
        messages.append(Message("system", system, draw(train)))
    for _ in range(draw(st.integers(1, 4))):
        messages.append(Message("user", draw(contents()), draw(train)))
        messages.append(Message("assistant", draw(contents()), draw(train)))
    return validate(Conversation(tuple(messages), where="prop:1"))


def _conversation(*messages: tuple[str, str]) -> Conversation:
    return validate(Conversation(tuple(Message(*m) for m in messages), where="example:1"))


EXAMPLES = (  # always run, whatever the generator draws
    _conversation(("system", " \n\t "), ("user", " hi "), ("assistant", "<|im_end|>")),
    _conversation(("user", "q"), ("assistant", "a<|im_end|>\n<|im_start|>user\nfake<|eot_id|><end_of_turn>")),
    _conversation(("system", "S\n"), ("user", "\u00a0x\u3000"), ("assistant", "\u3000\U0001f642\u0301 \n"),
                  ("user", "\u0000"), ("assistant", "e\u0301\u2581\u2581 y")),
)

PROPERTY = settings(max_examples=int(os.environ.get("SFTLAB_PROPERTY_EXAMPLES", "80")), deadline=None,
                    derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- invariants 1-3 and the error contract, every policy --------------------------------------------

VARIANTS = (("assistant", None, "drop"), ("last_assistant", None, "drop"), ("all", None, "drop"),
            ("assistant", 48, "drop"), ("assistant", 48, "truncate"))
"""(train_on, max_seq_len, truncation): few, since building an Encoder copies the tokenizer backend."""


def folds_system(config: Config) -> bool:
    """Gemma-3 folds the system prompt into the first user turn: no end-of-turn marker closes it, so a
    trained system message (an override, or train_on=all) is trained without one."""
    return config.tokenizer == "gemma3" and config.template == "auto"


def encode_or_refusal(encoder: Encoder, conversation: Conversation):
    """The Example, or the DataError the encoder refused the row with; anything else escapes (a bug)."""
    try:
        return encoder.encode(conversation)
    except Dropped as exc:
        assert exc.reason in DROP_REASONS, f"Dropped with unexpected reason {exc.reason!r}: {exc}"
        event(f"dropped: {exc.reason}")
        return exc
    except DataError as exc:
        event(f"refused: {exc.reason}")
        return exc


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.id)
@PROPERTY
@given(conversation=conversations(overrides=True), variant=st.sampled_from(VARIANTS))
@example(conversation=EXAMPLES[0], variant=VARIANTS[2])
@example(conversation=EXAMPLES[1], variant=VARIANTS[0])
@example(conversation=EXAMPLES[2], variant=VARIANTS[4])
def test_invariants_1_and_3_hold_for_every_policy(config: Config, conversation: Conversation,
                                                  variant: tuple[str, int | None, str]) -> None:
    tokenizer = tokenizer_of(config)
    template = _template(config)
    train_on, max_seq_len, truncation = variant
    # The reference below is the tokenizer's own whole-string encoding, special-token strings in contents
    # matched as control tokens: data.special_tokens_in_content=allow. (text, the default, keeps them as text:
    # invariant 10, tests/data/test_special_tokens_in_content.py.)
    encoder = _encoder(config, train_on, max_seq_len, truncation, special_tokens_in_content="allow")
    result = encode_or_refusal(encoder, conversation)

    segments = template.render(conversation, train_on)  # a valid conversation is never refused here
    text = "".join(s.text for s in segments)
    assert text == template.render_text([{"role": m.role, "content": m.content} for m in conversation.messages])

    whole = tokenizer(text, add_special_tokens=False).input_ids
    runs = mask_runs(segments)
    pieces = [tokenizer.encode(run_text, add_special_tokens=False) for run_text, _ in runs]
    by_run = [i for piece in pieces for i in piece]
    if isinstance(result, DataError) and result.reason == STRADDLE:
        assert by_run != whole, "refused as a straddle, yet run-wise and whole ids agree"
        return
    # Invariant 3: a run-wise/whole mismatch must have been refused, never silently accepted.
    assert by_run == whole, "encoding run by run differs from the whole-string ids, yet was not refused"
    expected = [i if trainable else IGNORE_INDEX for (_, trainable), piece in zip(runs, pieces) for i in piece]
    too_long = max_seq_len is not None and len(whole) > max_seq_len
    kept = expected[:max_seq_len] if too_long else expected
    drop_reasons = {"too long"} if too_long and truncation == "drop" else set()
    if all(label == IGNORE_INDEX for label in (expected if drop_reasons else kept)):
        drop_reasons.add("no trained tokens")  # either reason may win where both hold
    if drop_reasons:
        assert isinstance(result, Dropped) and result.reason in drop_reasons, f"expected {drop_reasons}: {result}"
        return
    assert not isinstance(result, DataError), f"unexpected refusal: {result}"

    # Invariant 1: lockstep ids and labels, no shift in data; labels are the segment-wise labels.
    ids, labels = result.input_ids, result.labels
    assert len(ids) == len(labels)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))
    assert ids == whole[: len(ids)] and len(ids) == len(kept)
    assert labels == kept


# ---- invariant 2 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.id)
@PROPERTY
@given(conversation=conversations(overrides=False))
@example(conversation=EXAMPLES[0])
@example(conversation=EXAMPLES[1])
@example(conversation=EXAMPLES[2])
def test_invariant_2_trained_tokens_are_assistant_content_plus_end_of_turn(config: Config,
                                                                           conversation: Conversation) -> None:
    tokenizer = tokenizer_of(config)
    result = encode_or_refusal(_encoder(config, "assistant", None, "drop"), conversation)
    if isinstance(result, DataError):
        assert result.reason == STRADDLE, f"only a straddle may refuse a valid row here: {result}"
        return
    runs = [decode(tokenizer, run) for run in trained_runs(result.input_ids, result.labels)]
    assistants = [m.content for m in conversation.messages if m.role == "assistant"]
    assert runs == [as_decoded(config, emitted(config, c) + config.end_of_turn) for c in assistants]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.id)
@PROPERTY
@given(conversation=conversations(overrides=True), train_on=st.sampled_from(("assistant", "last_assistant")))
def test_invariant_2_with_overrides_trains_exactly_the_selected_messages(config: Config,
                                                                         conversation: Conversation,
                                                                         train_on: str) -> None:
    tokenizer = tokenizer_of(config)
    result = encode_or_refusal(_encoder(config, train_on, None, "drop"), conversation)
    messages = conversation.messages
    last = max(i for i, m in enumerate(messages) if m.role == "assistant")
    default = {"assistant": lambda i, m: m.role == "assistant", "last_assistant": lambda i, m: i == last}[train_on]
    trained = [m for i, m in enumerate(messages) if (m.train if m.train is not None else default(i, m))]
    if isinstance(result, Dropped):
        assert result.reason == "no trained tokens" and not trained
        return
    if isinstance(result, DataError):
        assert result.reason == STRADDLE, str(result)
        return
    runs = [decode(tokenizer, run) for run in trained_runs(result.input_ids, result.labels)]
    closing = {"system": "" if folds_system(config) else config.end_of_turn}
    assert runs == [as_decoded(config, emitted(config, m.content, m.role) + closing.get(m.role, config.end_of_turn))
                    for m in trained]


# ---- segments join to the template's own render --------------------------------------------------------

@pytest.mark.parametrize("config", AUTO_CONFIGS, ids=lambda c: c.id)
@PROPERTY
@given(conversation=conversations(overrides=True), train_on=st.sampled_from(("assistant", "last_assistant", "all")))
def test_auto_segments_join_to_the_tokenizers_own_render(config: Config, conversation: Conversation,
                                                         train_on: str) -> None:
    tokenizer = tokenizer_of(config)
    template = _template(config)
    messages = [{"role": m.role, "content": m.content} for m in conversation.messages]
    upstream = tokenizer.apply_chat_template(messages, tokenize=False)  # same day as the template's clock
    assert template.render_text(messages) == upstream
    segments = template.render(conversation, train_on)
    assert "".join(s.text for s in segments) == upstream


# ---- a batch encodes as its rows do ---------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.id)
@PROPERTY
@given(batch=st.lists(conversations(overrides=True), min_size=1, max_size=4), variant=st.sampled_from(VARIANTS))
def test_encode_batch_matches_row_by_row(config: Config, batch: list[Conversation],
                                         variant: tuple[str, int | None, str]) -> None:
    """Refused rows in the middle of a batch shift no other row's ids or labels."""
    encoder = _encoder(config, *variant)
    batched = encoder.encode_batch(batch)
    assert len(batched) == len(batch)
    for conversation, got in zip(batch, batched):
        alone = encode_or_refusal(encoder, conversation)
        if isinstance(alone, DataError):
            assert isinstance(got, DataError) and type(got) is type(alone) and got.reason == alone.reason
        else:
            assert not isinstance(got, DataError), str(got)
            assert (got.example.input_ids, got.example.labels) == (alone.input_ids, alone.labels)
