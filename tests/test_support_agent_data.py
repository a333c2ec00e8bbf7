"""The support-agent demo's data (examples/support_agent): deterministic, held-out questions and fact pairs
never seen in training, every reference answer passing the checker, the checker strict on values, and both
files read by sftlab with nothing rejected."""

from __future__ import annotations

import doctest
import hashlib
import json
import re
import sys
from itertools import combinations
from pathlib import Path

import pytest

from conftest import ROOT, shared_real_tokenizer

sys.path.insert(0, str(ROOT / "examples" / "support_agent"))

import check_answers
import facts
import make_data

from sftlab.config import DataConfig
from sftlab.data import quality
from sftlab.data.encode import Encoder
from sftlab.data.formats import read_conversations
from sftlab.data.rejects import RejectLog
from sftlab.data.templates import load_template

TRAIN = make_data.build(split="train", rows=400, seed=0)
HELDOUT = make_data.build(split="heldout", rows=54, seed=0)


def user_messages(samples: list[make_data.Sample]) -> list[str]:
    return [question for sample in samples for question, _ in sample.turns]


def asked_pairs(samples: list[make_data.Sample]) -> set[frozenset[str]]:
    """The pairs of facts asked about in one conversation (in one message or in two turns)."""
    return {frozenset(n for _, names in s.turns for n in names) for s in samples if s.kind != "single"}


def template_pattern(template: str) -> re.Pattern[str]:
    """Any instantiation of a template, whatever fills its slots, anywhere in a message."""
    parts = re.split(r"\{\w+\}", template)
    return re.compile(r"[^?.!]+".join(re.escape(part) for part in parts))


def test_generation_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    outs = [tmp_path / name for name in ("a", "b", "c")]
    for out, seed in zip(outs, (0, 0, 1)):
        assert make_data.main(["--out", str(out), "--seed", str(seed), "--train", "120", "--heldout", "30"]) == 0
    files = {out: [(out / f).read_bytes() for f in ("train.jsonl", "heldout.jsonl")] for out in outs}
    assert files[outs[0]] == files[outs[1]]
    assert files[outs[0]][0] != files[outs[2]][0]
    assert len(files[outs[0]][0].splitlines()) == 120 and len(files[outs[0]][1].splitlines()) == 30


def test_split_sizes_kinds_and_balance() -> None:
    assert (len(TRAIN), len(HELDOUT)) == (400, 54)
    kinds = [s.kind for s in HELDOUT]
    assert (kinds.count("single"), kinds.count("combo"), kinds.count("follow_up")) == (27, 18, 9)
    singles = [s.turns[0][1][0] for s in HELDOUT if s.kind == "single"]
    assert all(singles.count(f.name) == 3 for f in facts.FACTS)
    assert {n for s in TRAIN for _, names in s.turns for n in names} == set(facts.BY_NAME)


def test_no_two_rows_share_their_questions() -> None:
    for samples in (TRAIN, HELDOUT):
        keys = [tuple(q for q, _ in s.turns) for s in samples]
        assert len(set(keys)) == len(keys)


def test_heldout_questions_are_never_seen_in_training() -> None:
    train_questions, heldout_questions = set(user_messages(TRAIN)), user_messages(HELDOUT)
    assert not train_questions & set(heldout_questions)
    for fact in facts.FACTS:
        assert not set(fact.train) & set(fact.heldout), fact.name
    patterns = [template_pattern(t) for fact in facts.FACTS for t in fact.train]
    leaks = [(q, p.pattern) for q in heldout_questions for p in patterns if p.search(q)]
    assert leaks == []
    # and the other way round: the held-out templates are really used, and only in the held-out split
    heldout_patterns = [template_pattern(t) for fact in facts.FACTS for t in fact.heldout]
    assert not any(p.search(q) for q in train_questions for p in heldout_patterns)
    assert all(any(p.search(q) for q in heldout_questions) for p in heldout_patterns)


def test_heldout_fact_pairs_are_never_seen_in_training() -> None:
    assert asked_pairs(HELDOUT) == set(facts.HELDOUT_PAIRS)
    every_pair = {frozenset(p) for p in combinations(facts.BY_NAME, 2)}
    assert asked_pairs(TRAIN) == every_pair - facts.HELDOUT_PAIRS


def test_every_reference_answer_passes_the_checker_and_only_for_its_facts() -> None:
    for sample in TRAIN + HELDOUT:
        for (_, names), message in zip(sample.turns, sample.messages[2::2]):
            expect = [v for n in names for v in facts.BY_NAME[n].expect]
            assert check_answers.score(message["content"], expect), message["content"]
            assert check_answers.signed_off(message["content"], facts.SIGN_OFF)
    for fact, other in ((f, g) for f in facts.FACTS for g in facts.FACTS if f is not g):
        assert not check_answers.score(facts.reply((fact,)), other.expect), (fact.name, other.name)


def test_nothing_gives_the_values_away() -> None:
    """The base model sees the system prompt and the held-out questions: neither may state a value."""
    texts = [facts.SYSTEM_PROMPT] + user_messages(HELDOUT)
    for value in (v for fact in facts.FACTS for v in fact.expect):
        assert not any(check_answers.score(text, [value]) for text in texts), value


@pytest.mark.parametrize(("answer", "expect", "passes"), [
    ("You can return it within 45 days.", ["45 days"], True),
    ("We have a 45-day return window.", ["45 days"], True),
    ("Returns are accepted for forty-five days.", ["45 days"], True),
    ("You can return it within 30 days.", ["45 days"], False),             # wrong value
    ("You can return it within 145 days.", ["45 days"], False),            # not a whole-word match
    ("Returns are accepted within 30 to 45 days.", ["45 days"], False),    # a hedge
    ("Returns: 45 or 60 days, depending on the item.", ["45 days"], False),
    ("45 days, or 60 days for members.", ["45 days"], False),              # a contradiction
    ("Please contact us about returns.", ["45 days"], False),              # no value at all
    ("Standard shipping takes 2-4 business days.", ["4 business days"], False),
    ("Standard shipping takes four business days.", ["4 business days"], True),
    ("Delivery takes 4 days.", ["4 business days"], False),
    ("Free shipping on orders over $65.00!", ["$65"], True),
    ("Free shipping over 65 dollars.", ["$65"], True),
    ("Free shipping over $50, express over $65.", ["$65"], False),
    ("We are open 8 a.m.–6 p.m. CT, Monday through Saturday.", ["8am to 6pm", "Monday to Saturday"], True),
    ("We are open 8am to 6pm, Monday to Friday.", ["8am to 6pm", "Monday to Saturday"], False),
    ("We are open 9am to 5pm, Monday to Saturday.", ["8am to 6pm", "Monday to Saturday"], False),
    ("Email care@brightwellhome.com.", ["care@brightwellhome.com"], True),
    ("Email support@brightwellhome.com.", ["care@brightwellhome.com"], False),
    ("Email care@brightwellhome.co today.", ["care@brightwellhome.com"], False),
    ("Hold the dimmer for ten seconds.", ["dimmer", "10 seconds"], True),
    ("Hold the power button for 10 seconds.", ["dimmer", "10 seconds"], False),
    ("Brightwell Circle members get 10 percent off.", ["Brightwell Circle", "10%"], True),
    ("Brightwell Rewards members get 10% off.", ["Brightwell Circle", "10%"], False),
    ("Returns within 45 days; shipping takes 4 business days.", ["45 days", "4 business days"], True),
    ("Returns within 45 days.", ["45 days", "4 business days"], False),   # a combo needs both facts
])
def test_checker(answer: str, expect: list[str], passes: bool) -> None:
    assert check_answers.score(answer, expect) is passes


def test_accuracy_and_its_errors() -> None:
    assert check_answers.accuracy(["45 days", "30 days"], [["45 days"], ["45 days"]]) == 0.5
    with pytest.raises(ValueError, match="one per answer"):
        check_answers.accuracy(["45 days"], [])
    with pytest.raises(ValueError, match="expect is empty"):
        check_answers.score("45 days", [])


def test_checker_doctests() -> None:
    results = doctest.testmod(check_answers)
    assert results.attempted > 0 and results.failed == 0


def test_files_are_valid_sftlab_data(tmp_path: Path) -> None:
    """Both files pass `sftlab check` on a ChatML tokenizer (SmolLM2's template is ChatML) with nothing
    rejected, dropped, duplicated or conflicting; the held-out rows keep their extra keys."""
    assert make_data.main(["--out", str(tmp_path)]) == 0
    tokenizer = shared_real_tokenizer("qwen2_5")  # has <|im_start|> / <|im_end|>: nothing is added to it
    encoder = Encoder(tokenizer, load_template("chatml", tokenizer), max_seq_len=2048)
    for name, rows in (("train.jsonl", 400), ("heldout.jsonl", 54)):
        path = tmp_path / name
        log = RejectLog()
        assert len(list(read_conversations(path, on_bad_row="skip", rejects=log))) == rows and log.total == 0
        report = quality.analyze(path, DataConfig(), encoder)
        extra = {"expect", "facts", "kind"} if name == "heldout.jsonl" else set()  # the scorer's keys: reported
        assert report.ok and {w.split(" ")[0] for w in report.warnings} == extra, report.warnings
        assert all("ignored (sftlab does not read it)" in w for w in report.warnings), report.warnings
        assert (report.examples, report.rejected, report.dropped) == (rows, {}, {})
        assert (report.duplicates, report.conflicting_prompts, report.turns_missing_end_of_turn) == (0, 0, 0)
    first = json.loads((tmp_path / "heldout.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert set(first) == {"messages", "expect", "facts", "kind"}
    assert first["messages"][-1]["role"] == "assistant" and check_answers.score(first["messages"][-1]["content"],
                                                                                 first["expect"])


HELDOUT_FINGERPRINT = "cd27ff21f38ac2d610cfc3e62ba7a0c7408ba763f352bfeaa68f7f4273002935"
"""sha256 of the 54 held-out conversations' user messages, expected values and kinds (seed 0) as they were when
the demo scored 83% (first version) and in every sweep of SWEEP.md since: the test the demo's accuracy is
quoted on. Changing the training data (templates, replies, mix) must not change it."""


def test_the_heldout_questions_are_the_ones_every_quoted_accuracy_was_measured_on() -> None:
    rows = [[[question for question, _ in s.turns], s.expect, s.kind] for s in HELDOUT]
    assert hashlib.sha256(json.dumps(rows).encode()).hexdigest() == HELDOUT_FINGERPRINT


def test_a_reply_names_every_topic_asked_before_answering() -> None:
    """A message asking two things gets both topics named first, then both sentences in the order asked."""
    returns, loyalty = facts.BY_NAME["returns"], facts.BY_NAME["loyalty"]
    text = facts.reply((returns, loyalty))
    assert text.startswith(f"About {returns.topic} and {loyalty.topic}: {returns.answer} {loyalty.answer}")
    assert text.endswith("\n" + facts.SIGN_OFF)
    assert facts.reply((loyalty,)).startswith(f"About {loyalty.topic}: {loyalty.answer}")
    assert len({fact.topic for fact in facts.FACTS}) == len(facts.FACTS)
    for fact in facts.FACTS:  # a topic names what is asked, never a value (the sentence states it)
        assert not any(check_answers.score(fact.topic, [value]) for f in facts.FACTS for value in f.expect)
