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


DAMAGE = {
    "truncated_ids": lambda entry: (entry / "input_ids.bin").write_bytes((entry / "input_ids.bin").read_bytes()[:-4]),
    "emptied_ids": lambda entry: (entry / "input_ids.bin").write_bytes(b""),
    "edited_ids": lambda entry: (entry / "input_ids.bin").write_bytes(
        b"\xff\xff\x00\x00" + (entry / "input_ids.bin").read_bytes()[4:]),  # same size, another token
    "missing_offsets": lambda entry: (entry / "offsets.bin").unlink(),
    "truncated_offsets": lambda entry: (entry / "offsets.bin").write_bytes((entry / "offsets.bin").read_bytes()[:8]),
    "no_manifest": lambda entry: (entry / cache.MANIFEST).unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_entry_is_rebuilt_and_said(setup, capsys, damage: str) -> None:
    data, config = setup
    enc = encoder()
    first = build_dataset(data, config, enc)
    expected = [(e.input_ids, e.labels, e.where) for e in first]
    entry = first.directory
    first.close()
    manifest = json.loads((entry / cache.MANIFEST).read_text())["files"]
    assert {"input_ids.bin", "trained.bin", "offsets.bin", "where.txt", "meta.json"} <= set(manifest)
    DAMAGE[damage](entry)
    calls = CountingEncoder.calls
    second = build_dataset(data, config, encoder())
    assert CountingEncoder.calls == 2 * calls  # encoded again, not read from the damaged files
    assert second.directory == entry and cache.damage(entry) is None
    assert [(e.input_ids, e.labels, e.where) for e in second] == expected
    err = " ".join(capsys.readouterr().err.split())
    assert f"data cache: {entry} is damaged (" in err and "encoding the data again" in err
    reason = {"truncated_ids": "input_ids.bin has", "emptied_ids": "input_ids.bin has 0 bytes",
              "edited_ids": "input_ids.bin was changed after it was written",
              "missing_offsets": "offsets.bin is missing", "truncated_offsets": "offsets.bin has 8 bytes",
              "no_manifest": "no entry.json"}[damage]
    assert reason in err
    assert [p.name for p in entry.parent.iterdir() if p.name.startswith(".")] == []  # nothing left aside


def test_a_whole_entry_is_reused_without_a_word(setup, capsys) -> None:
    data, config = setup
    build_dataset(data, config, encoder())
    calls = CountingEncoder.calls
    build_dataset(data, config, encoder())
    assert CountingEncoder.calls == calls
    assert "data cache" not in capsys.readouterr().err


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_a_cache_dir_that_is_a_file_is_a_config_error(setup, tmp_path: Path, where: str) -> None:
    from sftlab.errors import ConfigError

    data, config = setup
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("the user's file\n")
    cache_dir = blocker if where == "file" else blocker / "cache"
    with pytest.raises(ConfigError, match=f"the data cache dir {cache_dir} cannot be used: {blocker} is a file, not "
                                          r"a directory\. Set data.cache_dir"):
        build_dataset(data, replace(config, cache_dir=str(cache_dir)), encoder())
    assert blocker.read_text() == "the user's file\n"


def test_sftlab_train_with_a_file_as_cache_dir_exits_with_the_message(tmp_path: Path, capsys) -> None:
    from conftest import tiny_model_dir
    from sftlab.cli import main

    model = tiny_model_dir(tmp_path / "model")
    data = write_rows(tmp_path / "train.jsonl", ROWS[:2])
    blocker = tmp_path / "notes.txt"
    blocker.write_text("the user's notes\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {model}\nmethod: lora\noutput_dir: {tmp_path / 'run'}\n"
                      f"data:\n  train: {data}\n  cache_dir: {blocker}\ntrain:\n  max_steps: 1\n", encoding="utf-8")
    assert main(["train", str(config)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"error: the data cache dir {blocker} cannot be used: {blocker} is a file" in err
    assert "Traceback" not in err and blocker.read_text() == "the user's notes\n"
