"""Data sources: every kind of source gives the examples the same rows give as JSONL; per-source options; Hub
errors. Real `datasets` objects and a real Hugging Face cache laid out in tmp, no mocks, no network."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import tiny_chat_tokenizer
from sftlab.config import DataConfig, SourceConfig, load_config
from sftlab.data.dataset import build_dataset
from sftlab.data.encode import IGNORE_INDEX, Encoder
from sftlab.data.sources import read, resolve, resolve_all
from sftlab.data.templates import load_template
from sftlab.errors import ConfigError, DataError

ROWS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(7)]
RENAMED = [{"conversation": r["messages"], "id": i} for i, r in enumerate(ROWS)]
"""The same rows as a hub dataset might name them."""
SHA = "0123456789abcdef0123456789abcdef01234567"


def encoder() -> Encoder:
    tokenizer = tiny_chat_tokenizer()
    return Encoder(tokenizer, load_template("chatml", tokenizer), max_seq_len=256)


def examples(source: object, data: DataConfig | None = None, enc: Encoder | None = None) -> list[tuple]:
    with build_dataset(source, data or DataConfig(cache=False), enc or encoder()) as built:
        return [(tuple(e.input_ids), tuple(e.labels)) for e in built]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def dataset_repo(root: Path, rows: list[dict]) -> Path:
    """A dataset repo as the Hub serves it: README with a `configs:` section and two parquet shards."""
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:4]), root / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:]), root / "data" / "train-00001-of-00002.parquet")
    (root / "README.md").write_text("---\nconfigs:\n- config_name: chat\n  data_files:\n  - split: train\n"
                                    "    path: data/train-*.parquet\n---\n# a tiny chat set\n", encoding="utf-8")
    return root


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An offline Hugging Face cache holding dataset org/chat at commit SHA (as `huggingface-cli download`
    leaves it: snapshots/<sha>/..., refs/main)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    repo = cache / "datasets--org--chat"
    dataset_repo(repo / "snapshots" / SHA, RENAMED)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_every_kind_of_source_gives_the_examples_of_the_same_rows_as_jsonl(tmp_path, hub_cache) -> None:
    import datasets

    expected = examples(write_jsonl(tmp_path / "rows.jsonl", ROWS))
    assert len(expected) == len(ROWS)
    saved = datasets.Dataset.from_list(ROWS)
    saved.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": saved, "test": saved.select([0])}).save_to_disk(str(tmp_path / "saved_dict"))
    arrow = tmp_path / "rows.arrow"
    arrow.write_bytes(next((tmp_path / "saved").glob("*.arrow")).read_bytes())
    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts" / "a-1.jsonl", ROWS[:3])
    write_jsonl(tmp_path / "parts" / "a-2.jsonl", ROWS[3:])
    sources = {
        "save_to_disk dir": str(tmp_path / "saved"),
        "save_to_disk DatasetDict": str(tmp_path / "saved_dict"),
        "dataset repo dir": SourceConfig(path=str(dataset_repo(tmp_path / "repo", RENAMED)), name="chat",
                                         columns={"messages": "conversation"}),
        ".arrow file": str(arrow),
        "glob": str(tmp_path / "parts" / "a-*.jsonl"),
        "hub id": SourceConfig(path="org/chat", name="chat", columns={"messages": "conversation"}),
        "hf:// hub id": SourceConfig(path="hf://datasets/org/chat", name="chat", columns={"messages": "conversation"}),
    }
    for kind, source in sources.items():
        assert examples(source) == expected, kind
    hub = resolve(SourceConfig(path="org/chat", name="chat"))
    assert hub.hub == f"org/chat@{SHA}" and hub.label == "org/chat:chat"


def test_a_csv_gives_the_examples_of_the_same_rows_as_jsonl_with_columns_mapped(tmp_path) -> None:
    pairs = [{"question": f"Name {i}?", "answer": f"Name {i} is n{i}."} for i in range(5)]
    expected = examples(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": p["question"], "completion": p["answer"]}
                                                             for p in pairs]))
    (tmp_path / "qa.csv").write_text("question,answer\n" + "".join(f"{p['question']},{p['answer']}\n" for p in pairs),
                                     encoding="utf-8")
    source = SourceConfig(path=str(tmp_path / "qa.csv"), columns={"prompt": "question", "completion": "answer"})
    assert examples(source) == expected
    where = [c.where for c in read(resolve(source), DataConfig(), on_bad_row="error")]
    assert where[0] == "qa.csv[0]" and where[-1] == "qa.csv[4]"  # provenance: the source and row index


def test_a_missing_mapped_column_names_the_row_and_the_mapping(tmp_path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    with pytest.raises(DataError) as caught:
        list(read(resolve(SourceConfig(path=str(path), columns={"messages": "conversation"})), DataConfig(),
                  on_bad_row="error"))
    message = str(caught.value)
    assert f"{path}:1" in message and "'conversation'" in message and "'messages'" in message


def test_a_source_system_prompt_is_added_where_a_conversation_has_none(tmp_path) -> None:
    own = {"messages": [{"role": "system", "content": "Be terse."}, *ROWS[0]["messages"]]}
    path = write_jsonl(tmp_path / "rows.jsonl", [ROWS[1], own])
    got = list(read(resolve(SourceConfig(path=str(path), system_prompt="You add numbers.")), DataConfig(),
                    on_bad_row="error"))
    assert got[0].messages[0].content == "You add numbers."
    assert [m.content for m in got[1].messages] == ["Be terse.", *[m["content"] for m in ROWS[0]["messages"]]]
    with_prompt = write_jsonl(tmp_path / "explicit.jsonl", [
        {"messages": [{"role": "system", "content": "You add numbers."}, *ROWS[1]["messages"]]}])
    assert examples(SourceConfig(path=str(path), system_prompt="You add numbers.", max_samples=1))[0] == \
        examples(with_prompt)[0]


def test_a_source_train_on_trains_that_source_only_its_way(tmp_path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS[:2])
    enc = encoder()
    default = examples(str(path), enc=enc)
    everything = examples(SourceConfig(path=str(path), train_on="all"), enc=enc)
    assert [ids for ids, _ in default] == [ids for ids, _ in everything]
    trained = [sum(label != IGNORE_INDEX for label in labels) for _, labels in everything]
    assert all(t == len(ids) for t, (ids, _) in zip(trained, everything))  # every token
    assert all(sum(label != IGNORE_INDEX for label in labels) < len(ids) for ids, labels in default)
    assert enc.train_on == "assistant"  # the shared encoder is left as it was


def test_each_source_encodes_under_its_own_cache_key(tmp_path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    data = DataConfig(cache_dir=str(tmp_path / "cache"))
    enc = encoder()
    with build_dataset(str(path), data, enc) as a, build_dataset(SourceConfig(path=str(path), train_on="all"), data,
                                                                    enc) as b, build_dataset(str(path), data, enc) as c:
        assert a.directory != b.directory and a.directory == c.directory


def test_config_takes_a_string_a_mapping_or_a_list_and_names_mistakes() -> None:
    cfg = load_config(overrides=["data.train=[a.jsonl, {path: org/chat, max_samples: 2, name: chat}]",
                                 "data.eval={path: e.csv, columns: {prompt: q}}"])
    assert cfg.data.train[0] == SourceConfig(path="a.jsonl") and cfg.data.train[1].max_samples == 2
    assert cfg.data.eval == SourceConfig(path="e.csv", columns={"prompt": "q"})
    assert load_config(overrides=["data.train=a.jsonl"]).data.train == "a.jsonl"
    with pytest.raises(ConfigError, match="'data.train.wieght': did you mean 'data.train.weight'"):
        load_config(overrides=["data.train=[{path: a.jsonl, wieght: 2}]"])
    with pytest.raises(ConfigError, match="give every source a weight"):
        load_config(overrides=["data.train=[{path: a.jsonl, weight: 2}, b.jsonl]"])
    with pytest.raises(ConfigError, match="must be a positive number"):
        load_config(overrides=["data.train=[{path: a.jsonl, weight: 0}]"])


def test_local_path_problems_are_named(tmp_path) -> None:
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        resolve(str(tmp_path / "x.txt"))
    with pytest.raises(DataError, match="does not exist"):
        resolve(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="matches no file"):
        resolve(str(tmp_path / "none-*.jsonl"))
    write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    (tmp_path / "b.csv").write_text("prompt,completion\nx,y\n")
    with pytest.raises(DataError, match="several types"):
        resolve(str(tmp_path / "[ab].*"))
    twice = (SourceConfig(path=str(tmp_path / "a.jsonl")),) * 2
    assert [s.label for s in resolve_all(twice)] == ["a.jsonl", "a.jsonl#2"]


def test_a_hub_id_missing_from_the_cache_offline_says_so_fast(hub_cache) -> None:
    started = time.monotonic()
    with pytest.raises(DataError) as caught:
        resolve("org/not-downloaded")
    message = str(caught.value)
    assert time.monotonic() - started < 10
    assert "not in the local Hugging Face cache" in message and "HF_HUB_OFFLINE" in message
    assert "huggingface-cli download --repo-type dataset org/not-downloaded" in message
    assert "does not exist" not in message


def test_an_unreachable_hub_says_so_fast(hub_cache, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    started = time.monotonic()
    with pytest.raises(DataError) as caught:
        resolve(SourceConfig(path="org/elsewhere", revision="v1"))
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert "cannot reach the Hugging Face Hub" in message and "at revision v1" in message
    assert "does not exist" not in message
    # A cached dataset is read from the cache, network or not.
    assert resolve("org/chat").hub == f"org/chat@{SHA}"


def test_a_hub_dataset_and_a_saved_dataset_train_together(tmp_path, hub_cache) -> None:
    import datasets
    from rich.console import Console

    from conftest import tiny_model_dir
    from sftlab.runs import prepare, train

    datasets.Dataset.from_list(ROWS[:3]).save_to_disk(str(tmp_path / "saved"))
    listed = f"[{{path: org/chat, name: chat, columns: {{messages: conversation}}}}, {tmp_path / 'saved'}]"
    out = tmp_path / "run"
    setup = prepare(load_config(overrides=[f"model={tiny_model_dir(tmp_path / 'model')}", f"data.train={listed}",
                                           f"output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}",
                                           "train.max_steps=2", "lora.rank=4"]), console=Console(quiet=True))
    assert len(setup.train_data) == len(ROWS) + 3
    assert setup.train_data.where(0) == "org/chat:chat[0]" and setup.train_data.where(len(ROWS)) == "saved[0]"
    result = train(setup, console=Console(quiet=True))
    assert result.steps == 2 and result.final_loss is not None
    facts = json.loads((out / "report.json").read_text())
    assert facts["data"]["train"]["file"] == ["org/chat", str(tmp_path / "saved")]


def test_a_dataset_row_over_the_byte_limit_is_rejected_as_a_jsonl_row_would_be(tmp_path) -> None:
    from sftlab.data.formats import ROW_TOO_LARGE
    from sftlab.data.rejects import RejectLog

    (tmp_path / "qa.csv").write_text(f"prompt,completion\nshort?,yes.\nlong?,{'x' * 5000}\n", encoding="utf-8")
    log = RejectLog()
    got = list(read(resolve(str(tmp_path / "qa.csv")), DataConfig(), on_bad_row="skip", rejects=log,
                    max_row_bytes=1000))
    assert [c.where for c in got] == ["qa.csv[0]"] and dict(log.counts) == {ROW_TOO_LARGE: 1}
