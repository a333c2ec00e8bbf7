"""data.reasoning and data.reasoning_turns on the real Qwen3 template (issue 15, Build 3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import fixture_path, shared_real_tokenizer
from sftlab.config import DataConfig
from sftlab.data.dataset import build_dataset
from sftlab.data.encode import Encoder
from sftlab.data.inspect import runs
from sftlab.data.reasoning import prepare, split_reasoning_turns
from sftlab.data.schema import Conversation, Message
from sftlab.data.templates import load_template

REASONS = ["First I add one and one.", "Then two and two make four.", "Finally three and three."]
ANSWERS = ["2", "4", "6"]


def three_turns() -> Conversation:
    messages = []
    for question, reason, answer in zip(["1+1?", "2+2?", "3+3?"], REASONS, ANSWERS):
        messages += [Message("user", question), Message("assistant", answer, reasoning=reason)]
    return Conversation(tuple(messages), "r.jsonl:1")


def qwen3():
    tokenizer = shared_real_tokenizer("qwen2_5")
    return tokenizer, load_template(str(fixture_path("trl_templates", "qwen3.jinja")), tokenizer)


def trained(tokenizer, template, conversation: Conversation) -> str:
    example = Encoder(tokenizer, template).encode(conversation)
    return "".join(tokenizer.decode(ids) for flag, ids in runs(example.input_ids, example.labels) if flag)


@pytest.mark.fixtures
def test_split_trains_every_turns_reasoning_exactly_once() -> None:
    tokenizer, template = qwen3()
    pieces = list(prepare([three_turns()], template, reasoning_turns="split"))
    assert len(pieces) == 3
    texts = [trained(tokenizer, template, piece) for piece in pieces]
    for k, text in enumerate(texts):  # piece k trains turn k only: its reasoning and its answer
        assert text == f"<think>\n{REASONS[k]}\n</think>\n\n{ANSWERS[k]}<|im_end|>"
    joined = "".join(texts)
    assert all(joined.count(reason) == 1 for reason in REASONS)


@pytest.mark.fixtures
def test_rendered_keeps_only_what_the_template_shows_and_drop_removes_all() -> None:
    tokenizer, template = qwen3()
    text = trained(tokenizer, template, three_turns())
    assert text == f"2<|im_end|>4<|im_end|><think>\n{REASONS[2]}\n</think>\n\n6<|im_end|>"
    [dropped] = prepare([three_turns()], template, reasoning="drop")
    assert trained(tokenizer, template, dropped) == "2<|im_end|>4<|im_end|>6<|im_end|>"  # empty block untrained


def test_split_marks_turns_trained_earlier_and_keeps_trailing_plain_turns() -> None:
    conversation = Conversation((Message("user", "a"), Message("assistant", "b", reasoning="r"),
                                 Message("user", "c"), Message("assistant", "d")), "x:1")
    first, second = split_reasoning_turns(conversation)
    assert [m.content for m in first.messages] == ["a", "b"]
    assert [m.train for m in second.messages] == [None, False, None, None]
    assert split_reasoning_turns(Conversation(conversation.messages[:2] + (), "x:1"))[0].messages[-1].train is None


@pytest.mark.fixtures
def test_build_dataset_with_split_gives_one_example_per_reasoning_turn(tmp_path: Path) -> None:
    tokenizer, template = qwen3()
    row = {"messages": [{"role": m.role, "content": m.content, **({"reasoning_content": m.reasoning}
                                                                  if m.reasoning else {})}
                        for m in three_turns().messages]}
    data_path = tmp_path / "r.jsonl"
    data_path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    for turns, examples in (("split", 3), ("rendered", 1)):
        data = DataConfig(train=str(data_path), reasoning_turns=turns, cache=False)
        with build_dataset(data_path, data, Encoder(tokenizer, template)) as dataset:
            assert (len(dataset), dataset.stats.rows) == (examples, 1)
