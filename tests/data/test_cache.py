"""The encoded-dataset cache: a re-run reuses the encoding, any change to an input makes a new one."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import tiny_tokenizer

from sftlab.config import DataConfig
from sftlab.data import cache
from sftlab.data.dataset import build_dataset
from sftlab.data.encode import IGNORE_INDEX, Encoder
from sftlab.data.formats import read_conversations
from sftlab.data.templates import load_template

ROWS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "oops"}]},
]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


class CountingEncoder(Encoder):
    calls = 0

    def _render(self, conversations):  # every encoding path renders first
        CountingEncoder.calls += len(conversations)
        return super()._render(conversations)


def encoder(template: str = "chatml", tokenizer=None) -> CountingEncoder:
    tokenizer = tokenizer or tiny_tokenizer()
    return CountingEncoder(tokenizer, load_template(template, tokenizer), add_special_tokens=True)


@pytest.fixture
def setup(tmp_path: Path):
    data = write_rows(tmp_path / "train.jsonl", ROWS)
    config = DataConfig(on_bad_row="skip", cache_dir=str(tmp_path / "cache"))
    CountingEncoder.calls = 0
    return data, config


def entries(config: DataConfig) -> set[str]:
    root = Path(config.cache_dir) / "datasets"
    return {p.name for p in root.iterdir() if not p.name.startswith(".")}


def test_rerun_reuses_the_encoding_without_tokenising(setup, tmp_path: Path) -> None:
    data, config = setup
    first = build_dataset(data, config, encoder(), rejects_path=tmp_path / "r1.jsonl")
    assert CountingEncoder.calls == 2  # the third row is rejected while reading
    second = build_dataset(data, config, encoder(), rejects_path=tmp_path / "r2.jsonl")
    assert CountingEncoder.calls == 2
    assert first.directory == second.directory
    assert [e.input_ids for e in first] == [e.input_ids for e in second]
    # The rejected rows come back from the cache too.
    assert (tmp_path / "r1.jsonl").read_text() == (tmp_path / "r2.jsonl").read_text() != ""
    assert second.stats.rows == 3 and second.stats.examples == 2


def test_cached_examples_equal_fresh_encoding(setup) -> None:
    data, config = setup
    enc = encoder()
    dataset = build_dataset(data, config, enc)
    fresh = [enc.encode(c) for c in read_conversations(data, on_bad_row="skip")]
    assert [(e.input_ids, e.labels, e.where) for e in dataset] == [(e.input_ids, e.labels, e.where) for e in fresh]
    assert all(IGNORE_INDEX in e.labels for e in dataset)
    assert list(dataset.lengths) == [len(e.input_ids) for e in fresh]


@pytest.mark.parametrize("change", ["data", "template", "setting", "tokenizer"])
def test_any_change_makes_a_new_entry(setup, change: str) -> None:
    data, config = setup
    build_dataset(data, config, encoder())
    before = entries(config)
    enc = encoder()
    if change == "data":
        write_rows(data, ROWS + [ROWS[0]])
    elif change == "template":
        enc = encoder("llama3")
    elif change == "setting":
        config = replace(config, train_on="last_assistant")
    else:
        tokenizer = tiny_tokenizer()
        tokenizer.add_tokens(["<extra>"])
        enc = encoder(tokenizer=tokenizer)
    build_dataset(data, config, enc)
    assert len(entries(config) - before) == 1
    assert CountingEncoder.calls > 2  # encoded again


def test_a_failed_build_leaves_no_entry(setup) -> None:
    data, config = setup
    config = replace(config, on_bad_row="error")
    with pytest.raises(Exception, match="train.jsonl:3"):
        build_dataset(data, config, encoder())
    root = Path(config.cache_dir) / "datasets"
    assert list(root.iterdir()) == []


def test_uncached_build_cleans_up(setup) -> None:
    data, config = setup
    with build_dataset(data, replace(config, cache=False), encoder()) as dataset:
        directory = dataset.directory
        assert len(dataset) == 2 and directory.is_dir()
    assert not directory.exists()


def test_key_depends_on_every_input(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "d.jsonl", ROWS)
    tokenizer = tiny_tokenizer()
    base = dict(tokenizer=tokenizer, template_source="t", settings={"a": 1})
    key = cache.dataset_key(data, **base)
    assert key == cache.dataset_key(data, **base)
    assert key != cache.dataset_key(data, **{**base, "template_source": "u"})
    assert key != cache.dataset_key(data, **{**base, "settings": {"a": 2}})
