"""The support-agent demo's replay source (examples/support_agent/replay.jsonl, written by make_replay.py):
general prompts none of which is the forgetting probe's (so the probe still measures drift on prompts never
trained on), answered by the base model, valid sftlab data, and mixed into the demo's training data."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from conftest import ROOT, shared_real_tokenizer

sys.path.insert(0, str(ROOT / "examples" / "support_agent"))

import make_replay

from sftlab.config import DataConfig, load_config
from sftlab.data import quality
from sftlab.data.encode import Encoder
from sftlab.data.formats import read_conversations
from sftlab.data.rejects import RejectLog
from sftlab.data.templates import load_template

REPLAY = ROOT / "examples" / "support_agent" / "replay.jsonl"
PROBE = ROOT / "src" / "sftlab" / "train" / "probe_prompts.jsonl"
STOPWORDS_TEXT = ("a an the is are was what which who how do does did in of to for and or on at by with me my i you "
                  "your it its be can should into from this that there some one two three four five as when whether "
                  "about give write s")  # "s": what's
STOPWORDS = set(STOPWORDS_TEXT.split())


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"\w+", text.lower()) if w not in STOPWORDS}


def overlap(a: str, b: str) -> float:
    """Jaccard similarity of two prompts' content words: 1.0 for a reworded copy that keeps its words."""
    x, y = content_words(a), content_words(b)
    return len(x & y) / len(x | y) if x | y else 1.0


def probe_prompts() -> list[str]:
    return [m["content"] for line in PROBE.read_text(encoding="utf-8").splitlines()
            for m in json.loads(line)["messages"] if m["role"] == "user"]


def replay_rows() -> list[dict]:
    return [json.loads(line) for line in REPLAY.read_text(encoding="utf-8").splitlines()]


def test_no_replay_prompt_is_a_probe_prompt_or_a_near_paraphrase_of_one() -> None:
    probe = probe_prompts()
    assert len(probe) >= 100
    prompts = [text for texts in make_replay.PROMPTS.values() for text in texts]
    assert len(prompts) == len(set(prompts)) == 150
    normal = {" ".join(re.findall(r"\w+", p.lower())) for p in probe}
    assert not [p for p in prompts if " ".join(re.findall(r"\w+", p.lower())) in normal]
    # the closest pairs today are different questions of a like form (0.6: "the difference between == and =
    # in Python" / "between a list and a tuple in Python"); a paraphrase keeps the content words
    close = [(round(overlap(p, q), 2), p, q) for p in prompts for q in probe if overlap(p, q) > 0.6]
    assert not close, close


def test_the_overlap_measure_catches_a_paraphrase() -> None:
    """The check above would fail for a reworded probe prompt (it is not vacuous)."""
    assert overlap("What's the capital city of Australia?", "What is the capital of Australia?") > 0.6
    assert overlap("Compose a haiku about the sea.", "Write a haiku about the sea.") > 0.6
    assert overlap("Write a short poem about the moon.", "Write a haiku about the sea.") <= 0.6


def test_replay_rows_are_the_scripts_prompts_answered_and_nothing_else() -> None:
    rows = replay_rows()
    prompts = [text for texts in make_replay.PROMPTS.values() for text in texts]
    assert 80 <= len(rows) <= len(prompts)  # the rest had no end-of-turn within the cap (make_replay.py says which)
    asked = [row["messages"][0]["content"] for row in rows]
    assert asked == [p for p in prompts if p in set(asked)]  # in the script's order, each at most once
    for row in rows:
        assert set(row) == {"messages"}
        # no system message: the template's default is used, as the forgetting probe does
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert row["messages"][1]["content"].strip() == row["messages"][1]["content"] != ""


def test_replay_is_valid_sftlab_data() -> None:
    """replay.jsonl passes `sftlab check` on a ChatML tokenizer (SmolLM2's template is ChatML) with nothing
    rejected, dropped, duplicated or conflicting, every turn ending with the end-of-turn token."""
    rows = len(replay_rows())
    tokenizer = shared_real_tokenizer("qwen2_5")  # has <|im_start|> / <|im_end|>: nothing is added to it
    encoder = Encoder(tokenizer, load_template("chatml", tokenizer), max_seq_len=512)
    log = RejectLog()
    assert len(list(read_conversations(REPLAY, on_bad_row="skip", rejects=log))) == rows and log.total == 0
    report = quality.analyze(REPLAY, DataConfig(), encoder)
    assert report.ok and not report.warnings, report.warnings
    assert (report.examples, report.rejected, report.dropped) == (rows, {}, {})
    assert (report.duplicates, report.conflicting_prompts, report.turns_missing_end_of_turn) == (0, 0, 0)


def test_the_demo_config_mixes_the_replay_source_in() -> None:
    """config.yaml's data.train is the support data and the committed replay source, the replay the smaller
    share; demo.py (and sweep.py) pass that list with the support path pointed at make_data.py's output."""
    import demo

    cfg = load_config(ROOT / "examples" / "support_agent" / "config.yaml", overrides=["model=x"])
    support, replay = cfg.data.train
    assert Path(support.path).name == "train.jsonl"
    assert (ROOT / replay.path).resolve() == REPLAY.resolve()
    assert replay.weight < support.weight and abs(support.weight + replay.weight - 1) < 1e-9
    sources = demo.training_sources(Path("/data/run-data"))
    assert sources == [{"path": "/data/run-data/train.jsonl", "weight": support.weight},
                       {"path": str(REPLAY), "weight": replay.weight}]
    # what demo.py passes as its override reads back as the same mixture
    passed = load_config(ROOT / "examples" / "support_agent" / "config.yaml",
                         overrides=["model=x", f"data.train={json.dumps(sources)}"]).data.train
    assert [(s.path, s.weight) for s in passed] == [(s["path"], s["weight"]) for s in sources]
