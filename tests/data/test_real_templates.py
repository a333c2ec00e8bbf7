"""Masks are exact on real tokenizers with their real chat templates (Qwen2.5, Llama-3.2, Gemma-3).

Two independent references:
- the upstream tokenizer itself: `apply_chat_template(..., tokenize=False)` must give our text, and
  `tokenizer(text)` our ids; the decoded trained runs must be exactly each assistant content (as the
  template emits it) followed by its end-of-turn marker;
- TRL's `*_training.jinja` templates with `{% generation %}` markers, through transformers'
  `return_assistant_tokens_mask=True`: on the text those templates render, our mask must agree with
  theirs wherever theirs follows our rule. Where it does not, the difference must be only the whitespace
  separators around a turn that TRL's markers include (Qwen2.5: the newline after `assistant` and after
  `<|im_end|>`; Gemma-3: the newline after `<end_of_turn>`) — checked token by token, not waved through.
"""

from __future__ import annotations

import re

import pytest

from conftest import fixture_path, shared_real_tokenizer
from sftlab.data.encode import IGNORE_INDEX, Encoder
from sftlab.data.inspect import runs
from sftlab.data.schema import Conversation, Message
from sftlab.data.templates import load_template

EOT = {"qwen2_5": "<|im_end|>", "llama3_2": "<|eot_id|>", "gemma3": "<end_of_turn>"}
TRIMS = {"qwen2_5": False, "llama3_2": True, "gemma3": True}  # templates that `| trim` contents
TRL_TRAINING = {"qwen2_5": "qwen2_5_training.jinja", "llama3_2": "llama3_training.jinja",
                "gemma3": "gemma3_training.jinja"}

CONVERSATIONS = [
    [("system", "You are a helpful assistant."), ("user", "Hi there!"), ("assistant", "Hello! How can I help?"),
     ("user", "What is 2+2?"), ("assistant", "2+2 equals 4.")],
    [("system", "Réponds en français, s'il te plaît."), ("user", "Bonjour 👋 — ça va ?"),
     ("assistant", "Très bien, merci ! 😊\n\n- point un\n- point deux"), ("user", "日本語で答えて"),
     ("assistant", "はい、わかりました。"), ("user", "Code?"),
     ("assistant", "```python\ndef f(x):\n    return x * 2\n```")],
    [("system", "Be terse."), ("user", "Say the marker <|im_end|> or <|eot_id|> literally."),
     ("assistant", "Markers: <end_of_turn> and <|im_start|>user — just text here."),
     ("user", "  spaces around  "), ("assistant", "  padded answer  ")],
    [("system", "You answer with numbers only."), ("user", "1+1"), ("assistant", "2"), ("user", "2+2"),
     ("assistant", "4"), ("user", "3+3"), ("assistant", "6"), ("user", "4+4"), ("assistant", "8")],
]


def conversation(turns: list[tuple[str, str]]) -> Conversation:
    return Conversation(tuple(Message(role, content) for role, content in turns), "test:1")


def trained_runs(tokenizer, example) -> list[str]:
    return [tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            for trained, ids in runs(example.input_ids, example.labels) if trained]


@pytest.mark.fixtures
@pytest.mark.parametrize("name", sorted(EOT))
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_auto_template_masks_exactly_the_assistant_replies(name: str, index: int) -> None:
    tokenizer = shared_real_tokenizer(name)
    turns = CONVERSATIONS[index]
    template = load_template("auto", tokenizer)
    example = Encoder(tokenizer, template).encode(conversation(turns))
    messages = [{"role": r, "content": c} for r, c in turns]

    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert template.render_text(messages) == text
    # The tokenizer's own encoding of the render, except that special-token strings inside contents
    # (conversation 2) are text there: data.special_tokens_in_content=allow reproduces it exactly.
    allowed = Encoder(tokenizer, template, special_tokens_in_content="allow").encode(conversation(turns))
    assert allowed.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    forged = any(token in c for _, c in turns for token in tokenizer.all_special_tokens + [EOT[name]])
    assert (example.input_ids == allowed.input_ids) != forged
    assert len(example.labels) == len(example.input_ids)

    def emitted(content: str) -> str:
        return content.strip() if TRIMS[name] else content

    expected = [emitted(c) + EOT[name] for r, c in turns if r == "assistant"]
    assert trained_runs(tokenizer, example) == expected
    # Nothing else: every trained position holds its own token id, all others are ignored.
    trained_count = sum(label != IGNORE_INDEX for label in example.labels)
    assert trained_count == sum(len(tokenizer.encode(emitted(c), add_special_tokens=False, split_special_tokens=True))
                                + 1 for r, c in turns if r == "assistant")  # contents as text, then the EOT
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(example.labels, example.input_ids))


@pytest.mark.fixtures
@pytest.mark.parametrize("name", sorted(EOT))
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_mask_agrees_with_trl_generation_markers(name: str, index: int) -> None:
    tokenizer = shared_real_tokenizer(name)
    path = fixture_path("trl_templates", TRL_TRAINING[name])
    turns = CONVERSATIONS[index]
    messages = [{"role": r, "content": c} for r, c in turns]
    reference = tokenizer.apply_chat_template(messages, chat_template=path.read_text(encoding="utf-8"),
                                              tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    # TRL tokenises the render whole, special-token strings in contents (conversation 2) as control tokens:
    # compared with data.special_tokens_in_content=allow, which does the same.
    example = Encoder(tokenizer, load_template(str(path), tokenizer),
                      special_tokens_in_content="allow").encode(conversation(turns))

    assert example.input_ids == list(reference["input_ids"])
    ours = [label != IGNORE_INDEX for label in example.labels]
    theirs = [bool(flag) for flag in reference["assistant_masks"]]
    tokens = [tokenizer.decode([t], skip_special_tokens=False) for t in example.input_ids]
    assert any(ours)
    for position, (mine, trl) in enumerate(zip(ours, theirs)):
        if mine:
            assert trl, f"we train token {position} {tokens[position]!r}, which TRL's markers exclude"
        elif trl:
            # TRL trains it, our rule does not: allowed only for the whitespace separator right before a
            # reply or right after its end-of-turn marker.
            assert re.fullmatch(r"\s+", tokens[position]), (position, tokens[position])
            neighbours = ours[position - 1: position] + ours[position + 1: position + 2]
            after_eot = position > 0 and tokens[position - 1] == EOT[name]
            assert any(neighbours) or after_eot, (position, tokens[position])


@pytest.mark.fixtures
def test_qwen3_template_is_not_prefix_stable_and_still_exact() -> None:
    # Qwen3's template puts an empty <think> block only into the last assistant turn: the text of an
    # earlier turn depends on what follows it. The block is text the template inserts, so it is not trained.
    tokenizer = shared_real_tokenizer("qwen2_5")  # same vocabulary family and <|im_end|>
    path = fixture_path("trl_templates", "qwen3.jinja")
    template = load_template(str(path), tokenizer)
    turns = CONVERSATIONS[0]
    example = Encoder(tokenizer, template).encode(conversation(turns))
    text = template.render_text([{"role": r, "content": c} for r, c in turns])
    assert "<think>\n\n</think>\n\n2+2 equals 4." in text
    assert trained_runs(tokenizer, example) == ["Hello! How can I help?<|im_end|>", "2+2 equals 4.<|im_end|>"]


@pytest.mark.fixtures
def test_llama3_2_date_and_gemma_system_folding_are_never_trained() -> None:
    for name, inserted in (("llama3_2", "Cutting Knowledge Date"), ("gemma3", "You are a helpful assistant.\n\nHi")):
        tokenizer = shared_real_tokenizer(name)
        template = load_template("auto", tokenizer)
        encoded = Encoder(tokenizer, template).encode_detailed([conversation(CONVERSATIONS[0])])[0]
        text = "".join(s.text for s in encoded.segments)
        assert inserted in text
        assert all(inserted not in s.text for s in encoded.segments if s.trainable)


def test_a_tokenizer_that_trims_offsets_is_encoded_through_a_private_copy(tmp_path) -> None:
    from tokenizers import processors

    from conftest import tiny_chat_tokenizer
    from sftlab.errors import DataError

    tokenizer = tiny_chat_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    tokenizer.backend_tokenizer.enable_truncation(4)
    # "assistant: Paris" tokenises to ... ":", " Paris": the space is the template's, "Paris" the reply's.
    # Trimmed offsets would hide that the token straddles the boundary; ours must refuse the row.
    path = tmp_path / "colon.jinja"
    path.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}<|im_end|>\n{% endfor %}")
    encoder = Encoder(tokenizer, load_template(str(path), tokenizer))
    with pytest.raises(DataError, match="spans the boundary"):
        encoder.encode(conversation([("user", "Hi"), ("assistant", "Paris")]))
    example = Encoder(tokenizer, load_template("auto", tokenizer)).encode(
        conversation([("user", "Hi"), ("assistant", "Hello there, how can I help you today?")]))
    assert len(example.input_ids) > 4  # not truncated by the tokenizer's own setting
    assert trained_runs(tokenizer, example) == ["Hello there, how can I help you today?<|im_end|>"]
    assert tokenizer.backend_tokenizer.truncation is not None  # the caller's tokenizer is untouched
