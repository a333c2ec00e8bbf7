"""Golden renders of the built-in templates, with trained spans marked [[...]].

The golden files under tests/golden/ were checked by eye against the masking rule: only each assistant
message's content and the end-of-turn marker after it are inside [[...]]. Regenerate them after a
deliberate change with SFTLAB_UPDATE_GOLDEN=1 and read the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import tiny_tokenizer
from sftlab.data.encode import Encoder
from sftlab.data.inspect import marked_text
from sftlab.data.schema import Conversation, Message
from sftlab.data.templates import load_template
from sftlab.errors import ConfigError, TemplateError

GOLDEN = Path(__file__).resolve().parent.parent / "golden"

CASES = {
    "single_turn": [("user", "Hi"), ("assistant", "Hello!")],
    "single_turn_system": [("system", "You are a helpful AI."), ("user", "Hi"), ("assistant", "Hello!")],
    "multi_turn": [("user", "Hi"), ("assistant", "Hello!"), ("user", "What is 2+2?"), ("assistant", "4")],
    "multi_turn_system": [("system", "You are a helpful physics teacher."),
                          ("user", "Explain quantum entanglement."), ("assistant", "Imagine two magic dice..."),
                          ("user", "And then?"), ("assistant", "They always agree.")],
}


def conversation(case: str) -> Conversation:
    return Conversation(tuple(Message(role, content) for role, content in CASES[case]), f"{case}:1")


@pytest.mark.parametrize("template", ["chatml", "llama3"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_render(template: str, case: str) -> None:
    tokenizer = tiny_tokenizer()
    encoder = Encoder(tokenizer, load_template(template, tokenizer), add_special_tokens=True)
    encoded = encoder.encode_detailed([conversation(case)])[0]
    got = marked_text(encoded, tokenizer)
    path = GOLDEN / f"{template}_{case}.txt"
    if os.environ.get("SFTLAB_UPDATE_GOLDEN"):
        path.write_text(got, encoding="utf-8")
    assert got == path.read_text(encoding="utf-8")


def test_chatml_renders_the_seed_example_exactly() -> None:
    template = load_template("chatml")
    messages = [{"role": "system", "content": "You are a helpful physics teacher."},
                {"role": "user", "content": "Explain quantum entanglement."},
                {"role": "assistant", "content": "Imagine two magic dice..."}]
    assert template.render_text(messages) == (
        "<|im_start|>system\nYou are a helpful physics teacher.<|im_end|>\n"
        "<|im_start|>user\nExplain quantum entanglement.<|im_end|>\n"
        "<|im_start|>assistant\nImagine two magic dice...<|im_end|>\n")
    assert template.render_text(messages[:2], add_generation_prompt=True).endswith(
        "<|im_start|>user\nExplain quantum entanglement.<|im_end|>\n<|im_start|>assistant\n")


def test_llama3_renders_the_seed_example_exactly() -> None:
    template = load_template("llama3")
    messages = [{"role": "system", "content": "You are a helpful AI."},
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ho"}]
    assert template.render_text(messages) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful AI.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHo<|eot_id|>")


def test_segments_join_to_the_render_and_mark_only_assistant_content_and_end_of_turn() -> None:
    template = load_template("chatml")
    segments = template.render(conversation("multi_turn_system"))
    assert "".join(s.text for s in segments) == template.render_text(
        [{"role": r, "content": c} for r, c in CASES["multi_turn_system"]])
    assert [s.text for s in segments if s.trainable] == [
        "Imagine two magic dice...", "<|im_end|>", "They always agree.", "<|im_end|>"]


@pytest.mark.parametrize("train_on, overrides, expected", [
    ("assistant", {}, ["Hello!", "4"]),
    ("last_assistant", {}, ["4"]),
    ("assistant", {1: False}, ["4"]),
    ("last_assistant", {1: True}, ["Hello!", "4"]),
    ("assistant", {0: True}, ["Hi", "Hello!", "4"]),
])
def test_train_on_policies_and_per_message_overrides(train_on: str, overrides: dict[int, bool],
                                                      expected: list[str]) -> None:
    messages = tuple(Message(role, content, overrides.get(i)) for i, (role, content) in enumerate(CASES["multi_turn"]))
    segments = load_template("chatml").render(Conversation(messages), train_on)
    trained = [s.text for s in segments if s.trainable and s.text != "<|im_end|>"]
    assert trained == expected


def test_train_on_all_trains_every_character_except_messages_marked_false() -> None:
    messages = (Message("user", "Hi", train=False), Message("assistant", "Hello!"))
    segments = load_template("chatml").render(Conversation(messages), "all")
    assert [s.text for s in segments if not s.trainable] == ["Hi"]


def test_builtin_template_on_a_base_tokenizer_needs_add_special_tokens() -> None:
    tokenizer = tiny_tokenizer()
    with pytest.raises(ConfigError, match="data.add_special_tokens=true"):
        Encoder(tokenizer, load_template("chatml", tokenizer))
    encoder = Encoder(tokenizer, load_template("chatml", tokenizer), add_special_tokens=True)
    assert encoder.added_tokens == ["<|im_start|>", "<|im_end|>"]
    assert len(tokenizer.encode("<|im_start|>", add_special_tokens=False)) == 1


def test_auto_without_a_chat_template_is_a_clear_error() -> None:
    with pytest.raises(TemplateError, match="has no chat template"):
        load_template("auto", tiny_tokenizer())


def test_template_from_a_jinja_file(tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}### {{ m.role }}: {{ m.content }}{{ eos_token }}\n{% endfor %}")
    tokenizer = tiny_tokenizer()  # its only special token, the eos <|endoftext|>, closes each turn
    template = load_template(str(path), tokenizer)
    segments = template.render(conversation("single_turn"))
    assert "".join(s.text for s in segments) == "### user: Hi<|endoftext|>\n### assistant: Hello!<|endoftext|>\n"
    assert [s.text for s in segments if s.trainable] == ["Hello!", "<|endoftext|>"]
    with pytest.raises(TemplateError, match="expected chatml, llama3, auto"):
        load_template(str(tmp_path / "missing.jinja"), tokenizer)
