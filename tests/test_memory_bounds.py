"""Memory bounded by the limits, not by the input: oversized rows are rejected unread, renders are capped,
and data.max_seq_len is checked against (and defaults to) the model's position limit."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_chat_tokenizer, tiny_model_dir
from sftlab.config import load_config
from sftlab.data.encode import Encoder
from sftlab.data.formats import ROW_TOO_LARGE, bounded_lines, iter_rows, read_conversations, row_byte_limit
from sftlab.data.rejects import RejectLog
from sftlab.data.schema import Conversation, Message
from sftlab.data.templates import CHATML, MAX_TEMPLATE_TEXT, RENDER_TOO_LONG, ChatTemplate, load_template
from sftlab.errors import ConfigError, DataError
from sftlab.models.positions import FALLBACK_MAX_SEQ_LEN, position_limit, resolve_max_seq_len, with_max_seq_len

GOOD = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]}


def big_row(size: int) -> dict:
    return {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x" * size}]}


def config_file(directory: Path) -> Path:
    path = directory / "config.yaml"
    path.write_text("method: lora\n", encoding="utf-8")
    return path


def jsonl(*rows: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model"))  # llama: max_position_embeddings 2048


class CountingReader(io.BufferedReader):
    """A binary file that records the longest piece any one read returned."""

    longest = 0

    def readline(self, size: int = -1) -> bytes:
        line = super().readline(size)
        CountingReader.longest = max(CountingReader.longest, len(line))
        return line


# --- the bounded reader -------------------------------------------------------------------------------

def test_bounded_lines_never_holds_more_than_the_limit_of_a_giant_line() -> None:
    data = b'{"a": 1}\n' + b"y" * 5_000_000 + b"\n" + b'{"b": 2}\n' + b"z" * 3_000_000  # the last one unterminated
    CountingReader.longest = 0
    lines = list(bounded_lines(CountingReader(io.BytesIO(data)), 1000))
    assert lines == [(1, b'{"a": 1}\n'), (2, 5_000_001), (3, b'{"b": 2}\n'), (4, 3_000_000)]
    assert CountingReader.longest <= 1 << 20  # the skip reads chunks; the limit-sized first read is smaller


def test_bounded_lines_keeps_a_line_of_exactly_the_limit_and_reads_all_without_one() -> None:
    data = b"a" * 9 + b"\n" + b"b" * 10 + b"\n"
    assert list(bounded_lines(io.BytesIO(data), 10)) == [(1, b"a" * 9 + b"\n"), (2, 11)]
    assert list(bounded_lines(io.BytesIO(data), None)) == [(1, b"a" * 9 + b"\n"), (2, b"b" * 10 + b"\n")]


def test_row_byte_limit_is_derived_from_max_seq_len_or_set() -> None:
    assert row_byte_limit(2048) == 32 * 2048 + 64 * 1024
    assert row_byte_limit(2048, 5000) == row_byte_limit(None, 5000) == 5000
    assert row_byte_limit(None) is None
    assert Encoder(tiny_chat_tokenizer(), load_template("chatml"), max_seq_len=100).row_limit == row_byte_limit(100)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_a_row_over_the_limit_is_rejected_with_its_line_and_the_others_read(tmp_path: Path, suffix: str) -> None:
    rows = [GOOD, big_row(50_000), GOOD]
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text(jsonl(*rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n", encoding="utf-8")
    else:
        pyarrow = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pyarrow.Table.from_pylist(rows), path)
    log = RejectLog(tmp_path / "rejects.jsonl")
    with log:
        kept = list(read_conversations(path, on_bad_row="skip", rejects=log, max_row_bytes=10_000))
    assert len(kept) == 2 and log.counts == {ROW_TOO_LARGE: 1}
    record = json.loads((tmp_path / "rejects.jsonl").read_text(encoding="utf-8"))
    line = {".jsonl": "2", ".json": "3", ".parquet": "row 2"}[suffix]
    assert record["where"] == f"{path}:{line}" and record["row"] is None
    assert "more than the 10,000-byte row limit" in record["message"] and "data.max_row_bytes" in record["message"]
    with pytest.raises(DataError, match=f"{path}:{line}: the row is") as error:
        list(read_conversations(path, on_bad_row="error", max_row_bytes=10_000))
    assert error.value.reason == ROW_TOO_LARGE
    assert len(list(iter_rows(path))) == 3  # no limit given: all read


# --- the render cap ---------------------------------------------------------------------------------

RUNAWAY = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{{ 'x' * 9999999 }}{% endfor %}"


def test_a_template_emitting_a_huge_value_per_row_is_stopped_naming_the_row() -> None:
    template = ChatTemplate(RUNAWAY, name="runaway", end_of_turn=("<|im_end|>",))
    conversation = Conversation((Message("user", "Hi"), Message("assistant", "Hello")), "data.jsonl:7")
    with pytest.raises(DataError, match=r"data.jsonl:7: chat template 'runaway' rendered more than") as error:
        template.render(conversation)
    assert error.value.reason == RENDER_TOO_LONG
    with pytest.raises(DataError, match="rendered more than 1,000 characters"):
        template.render(conversation, max_chars=1000)
    ok = ChatTemplate(CHATML, name="chatml", end_of_turn=("<|im_end|>",))
    assert "".join(s.text for s in ok.render(conversation, max_chars=200)).startswith("<|im_start|>user")
    with pytest.raises(DataError, match="rendered more than 20 characters"):
        ok.render(conversation, max_chars=20)


def test_the_encoder_caps_each_render_at_its_row_limit_plus_template_text(tmp_path: Path) -> None:
    tokenizer = tiny_chat_tokenizer()
    runaway = ChatTemplate(RUNAWAY, name="runaway", end_of_turn=("<|im_end|>",))
    encoder = Encoder(tokenizer, runaway, max_seq_len=64)
    assert encoder.render_limit == row_byte_limit(64) + MAX_TEMPLATE_TEXT
    conversations = [Conversation((Message("user", "Hi"), Message("assistant", "Hello")), f"d.jsonl:{i}")
                     for i in (1, 2)]
    results = encoder.encode_batch(conversations)
    assert [(r.where, r.reason) for r in results] == [("d.jsonl:1", RENDER_TOO_LONG), ("d.jsonl:2", RENDER_TOO_LONG)]
    chatml = Encoder(tokenizer, load_template("chatml", tokenizer), max_seq_len=64)
    assert chatml.encode(conversations[0]).input_ids  # an ordinary render is far below the cap


# --- data.max_seq_len and the model's position limit --------------------------------------------------

def test_null_max_seq_len_means_the_models_limit_and_more_is_refused(model_dir: Path, tmp_path: Path) -> None:
    assert position_limit(str(model_dir)) == 2048
    gpt2 = tiny_model_dir(tmp_path / "gpt2", arch="gpt2")  # n_positions 512
    assert position_limit(str(gpt2)) == 512
    cfg = load_config(overrides=[f"model={gpt2}"])
    assert cfg.data.max_seq_len is None and with_max_seq_len(cfg).data.max_seq_len == 512
    assert with_max_seq_len(load_config(overrides=[f"model={gpt2}", "data.max_seq_len=300"])).data.max_seq_len == 300
    with pytest.raises(ConfigError, match=r"data.max_seq_len=513 is more than the 512 positions model .* takes.*"
                                          r"Set data.max_seq_len to 512 or less, or to null"):
        with_max_seq_len(load_config(overrides=[f"model={gpt2}", "data.max_seq_len=513"]))


def test_a_model_declaring_no_limit_gets_the_fallback_for_null(tmp_path: Path) -> None:
    config = json.loads((tiny_model_dir(tmp_path / "m") / "config.json").read_text(encoding="utf-8"))
    del config["max_position_embeddings"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert position_limit(str(tmp_path / "m")) is None
    length, note = resolve_max_seq_len(None, None, model="m")
    assert length == FALLBACK_MAX_SEQ_LEN and "declares no position limit" in note
    assert resolve_max_seq_len(100_000, None, model="m") == (100_000, None)
    assert resolve_max_seq_len(None, 4096, model="m")[0] == 4096


def test_train_with_null_max_seq_len_drops_a_row_past_the_models_limit(model_dir: Path, tmp_path: Path) -> None:
    """Before: max_seq_len null let a row past max_position_embeddings through to crash in the attention mask."""
    long_row = big_row(0)
    long_row["messages"][1]["content"] = "Hello! How can I help you today? " * 400  # ~3,600 tokens > 2048
    path = tmp_path / "data.jsonl"
    path.write_text(jsonl(GOOD, long_row, GOOD), encoding="utf-8")
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "sftlab", "train", str(config_file(tmp_path)), f"model={model_dir}",
                           f"data.train={path}", f"output_dir={out}", "data.max_seq_len=null", "train.max_steps=1",
                           "data.cache=false", "train.micro_batch_size=1", "data.on_bad_row=skip"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "data.max_seq_len: 2048 (the model's limit" in done.stderr
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["where"], r["reason"]) for r in rejects] == [(f"{path}:2", "too long")]


# --- peak memory of `sftlab train` with one giant row ---------------------------------------------------

MEASURE = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
           "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
           "sys.exit(rc)")


def peak_train(model_dir: Path, data: Path, out: Path, *overrides: str) -> tuple[int, int, str]:
    """(exit status, peak RSS in bytes, stderr) of `sftlab train` in a fresh process."""
    done = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "sftlab", "train",
                           str(config_file(out.parent)), f"model={model_dir}", f"data.train={data}",
                           f"output_dir={out}",
                           "train.max_steps=1", "data.cache=false", *overrides],
                          capture_output=True, text=True, timeout=600, check=False)
    peak = int(done.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0]) * 1024
    return done.returncode, peak, done.stderr


def test_peak_rss_of_train_with_a_30_mb_row_stays_near_the_file_without_it(model_dir: Path, tmp_path: Path) -> None:
    good = [GOOD] * 40
    plain, giant = tmp_path / "plain.jsonl", tmp_path / "giant.jsonl"
    plain.write_text(jsonl(*good), encoding="utf-8")
    giant.write_text(jsonl(*good[:20], big_row(30_000_000), *good[20:]), encoding="utf-8")
    rc, base, _ = peak_train(model_dir, plain, tmp_path / "a", "data.on_bad_row=skip")
    assert rc == 0
    rc, peak, stderr = peak_train(model_dir, giant, tmp_path / "b", "data.on_bad_row=skip")
    assert rc == 0, stderr[-2000:]
    # Before: the row was parsed, rendered and tokenised whole (a 20 MB row peaked at 7.4 GB).
    assert peak - base < 1.5e9
    assert peak - base < 100e6, f"{(peak - base) / 1e6:.0f} MB more than without the row"  # measured: ~1 MB
    rejects = [json.loads(line) for line in (tmp_path / "b" / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["where"], r["reason"]) for r in rejects] == [(f"{giant}:21", ROW_TOO_LARGE)]
    rc, peak, stderr = peak_train(model_dir, giant, tmp_path / "c")  # data.on_bad_row=error, the default
    assert rc == 2 and f"{giant}:21" in stderr.replace("\n", "") and "Traceback" not in stderr
    assert "data.max_row_bytes" in stderr
    assert peak - base < 100e6


def test_generate_refuses_a_prompt_that_fills_the_models_positions() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftlab.generate import sample

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    assert len(sample(model, [1] * 31, stop_ids=[], max_new_tokens=1, temperature=0)) == 1
    with pytest.raises(ConfigError, match="the prompt is 32 tokens, and the model takes at most 32 positions"):
        sample(model, [1] * 32, stop_ids=[], max_new_tokens=1, temperature=0)


def test_a_pair_row_over_two_sides_worth_is_rejected_unread(tmp_path: Path) -> None:
    from sftlab.data.preference import pair_row_limit, read_pairs

    pair = {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}
    path = tmp_path / "pairs.jsonl"
    path.write_text(jsonl(pair, {**pair, "chosen": "y" * 30_000}, pair), encoding="utf-8")
    encoder = Encoder(tiny_chat_tokenizer(), load_template("chatml"), max_row_bytes=10_000)
    assert pair_row_limit(encoder) == 20_000
    log = RejectLog()
    assert len(list(read_pairs(path, on_bad_row="skip", rejects=log, max_row_bytes=pair_row_limit(encoder)))) == 2
    assert log.counts == {ROW_TOO_LARGE: 1}
