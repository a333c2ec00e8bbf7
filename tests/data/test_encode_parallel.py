"""data.num_workers (data/parallel.py): worker processes give byte-identical datasets, rejects, stats and errors
to one process, in input order; they start without the parent's main script, stop with the stream, and die with
the parent (SIGTERM, SIGKILL, Ctrl-C) — no orphans, no hangs."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import fixture_path, real_tokenizer
from sftlab.config import DataConfig, build
from sftlab.data import cache, dataset, parallel
from sftlab.data.encode import Encoder
from sftlab.data.parallel import EncodePool, WorkerError, encoding_ranks, worker_count
from sftlab.data.templates import load_template
from sftlab.errors import ConfigError, DataError

SRC = Path(__file__).resolve().parents[2] / "src"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}, "required": ["city"]}}}]


def _rows(count: int) -> list[str]:
    """Chat, tool-calling and reasoning rows, with bad ones among them (invalid JSON, no assistant message,
    a special token in content, an unknown role), each kind recurring so every batch holds several."""
    rows = []
    for i in range(count):
        kind = i % 9
        if kind == 0:
            row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"q{i} é 東京"},
                                {"role": "assistant", "content": f"answer {i}"}]}
        elif kind == 1:
            row = {"tools": TOOLS, "messages": [
                {"role": "user", "content": f"Weather in city {i}?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"type": "function", "id": f"c{i}", "function": {"name": "get_weather",
                                                                     "arguments": {"city": f"C{i} \"x\""}}}]},
                {"role": "tool", "tool_call_id": f"c{i}", "content": json.dumps({"t": i})},
                {"role": "assistant", "content": f"It is {i} degrees.", "reasoning_content": f"look up {i}"}]}
        elif kind == 2:
            row = {"messages": [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": f"<think>t{i}</think>ok"},
                                {"role": "user", "content": "more"}, {"role": "assistant", "content": f"sure {i}"}]}
        elif kind == 3:
            row = "not json {"
        elif kind == 4:
            row = {"messages": [{"role": "user", "content": f"only a question {i}"}]}
        elif kind == 5:
            row = {"messages": [{"role": "user", "content": "say it"},
                                {"role": "assistant", "content": "a<|im_end|>b"}], "metadata": {"i": i}}
        elif kind == 6:
            row = {"messages": [{"role": "user", "content": "x " * (i % 50 + 1)},  # over max_seq_len
                                {"role": "assistant", "content": "y " * 400}]}
        elif kind == 7:
            row = {"messages": [{"role": "narrator", "content": "?"}, {"role": "assistant", "content": "!"}]}
        else:
            row = {"messages": [{"role": "user", "content": f"Write code {i}"},
                                {"role": "assistant", "content": "```python\nprint(1)\n```", "train": False},
                                {"role": "user", "content": "again"}, {"role": "assistant", "content": "print(2)"}]}
        rows.append(row if isinstance(row, str) else json.dumps(row, ensure_ascii=False))
    return rows


@pytest.fixture(scope="module")
def qwen() -> Encoder:
    tokenizer = real_tokenizer("qwen2_5")
    return Encoder(tokenizer, load_template("auto", tokenizer), max_seq_len=300)


def _build(path: Path, encoder: Encoder, workers: int, **settings) -> tuple[dict[str, bytes], str]:
    data = DataConfig(cache=False, num_workers=workers, **settings)
    with dataset.build_dataset(path, data, encoder) as built:
        files = {p.name: p.read_bytes() for p in sorted(built.directory.iterdir())}
    return files, json.dumps(json.loads(files["meta.json"])["stats"])


@pytest.mark.parametrize("settings", [
    {"on_bad_row": "skip"},
    {"on_bad_row": "skip", "reasoning_turns": "split", "truncation": "truncate"},
    {"on_bad_row": "skip", "train_on": "all", "special_tokens_in_content": "allow", "reasoning": "drop"},
])
def test_workers_write_exactly_what_one_process_writes(tmp_path: Path, qwen: Encoder, monkeypatch, settings) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(_rows(150)) + "\n", encoding="utf-8")
    monkeypatch.setattr(dataset, "BATCH_ROWS", 7)  # many batches, several in flight per worker
    one, stats = _build(path, qwen, 1, **settings)
    for workers in (2, 3):
        many, many_stats = _build(path, qwen, workers, **settings)
        assert many_stats == stats
        assert many == one  # every file, byte for byte: arrays, where.txt, rejects, meta, quality report
    meta = json.loads(one["meta.json"])
    assert meta["stats"]["examples"] > 50 and meta["stats"]["rejected"] and meta["stats"]["truncated"] >= 0
    assert b"rows.jsonl:4" in one["rejects.jsonl"]  # the invalid JSON row, named by file:line
    assert "num_workers" not in meta["settings"]  # the setting does not change the result, nor the cache key


def test_the_cache_key_does_not_depend_on_num_workers(tmp_path: Path, qwen: Encoder, monkeypatch) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(_rows(40)) + "\n", encoding="utf-8")
    data = DataConfig(cache=True, cache_dir=str(tmp_path / "cache"), num_workers=2, on_bad_row="skip")
    with dataset.build_dataset(path, data, qwen) as first:
        built = first.directory
    calls = []
    monkeypatch.setattr(dataset, "_write", lambda *args: calls.append(args))
    with dataset.build_dataset(path, DataConfig(cache=True, cache_dir=str(tmp_path / "cache"), num_workers=1,
                                                on_bad_row="skip"), qwen) as again:
        assert again.directory == built
    assert not calls and cache.cache_root(str(tmp_path / "cache")).is_dir()


def _children() -> set[int]:
    found = set()
    for task in Path("/proc/self/task").iterdir():
        found |= {int(pid) for pid in (task / "children").read_text().split()}
    return found


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def test_a_data_error_mid_stream_raises_as_in_one_process_and_stops_the_workers(tmp_path: Path, monkeypatch) -> None:
    tokenizer = real_tokenizer("qwen2_5")
    template = tmp_path / "t.jinja"  # refuses one row at render time: an error only encoding finds
    template.write_text("{% for m in messages %}{% if m.content == 'BOOM' %}{{ raise_exception('no boom') }}"
                        "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
                        encoding="utf-8")
    encoder = Encoder(tokenizer, load_template(str(template), tokenizer))
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(60)]
    rows[37]["messages"][1]["content"] = "BOOM"
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    monkeypatch.setattr(dataset, "BATCH_ROWS", 4)
    errors = []
    for workers in (1, 2):
        before = _children()
        with pytest.raises(DataError) as caught:
            dataset.build_dataset(path, DataConfig(cache=False, num_workers=workers), encoder)
        errors.append((str(caught.value), caught.value.where, caught.value.reason))
        assert not [pid for pid in _children() - before if _alive(pid)]  # the workers are gone
    assert errors[0] == errors[1] and errors[0][1].endswith("rows.jsonl:38")


def test_a_worker_that_dies_is_an_error_not_a_hang(tmp_path: Path, qwen: Encoder) -> None:
    from sftlab.data.schema import Conversation, Message

    conversation = Conversation((Message("user", "q"), Message("assistant", "a")), where="x:1")
    pool = EncodePool(qwen, 2)
    stream = pool.encode_stream(iter(lambda: [conversation] * 3, None))
    next(stream)
    os.kill(pool._processes[1].pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(WorkerError, match="killed by signal 9"):
        for _ in range(20):
            next(stream)
    assert time.monotonic() - started < 30
    assert all(p.poll() is not None for p in pool._processes)


SCRIPT = textwrap.dedent("""
    # no `if __name__ == "__main__"` guard, on purpose: workers must not run this script again
    import signal
    import sys
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal (a background job inherits SIG_IGN)
    from sftlab.config import DataConfig
    from sftlab.data.dataset import build_dataset
    from sftlab.data.encode import Encoder
    from sftlab.data.templates import load_template
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    encoder = Encoder(tokenizer, load_template("auto", tokenizer))
    print("building", flush=True)
    with build_dataset(sys.argv[2], DataConfig(cache=False, num_workers=2), encoder) as built:
        print("built", len(built), flush=True)
""")


def _script(tmp_path: Path, rows: int) -> subprocess.Popen:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i} " * 30},
                                                     {"role": "assistant", "content": f"answer {i} " * 30}]}) + "\n"
                            for i in range(rows)), encoding="utf-8")
    script = tmp_path / "build.py"
    script.write_text(SCRIPT, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(SRC))
    return subprocess.Popen([sys.executable, str(script), str(fixture_path("tokenizers", "qwen2_5")), str(data)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)


def _workers_of(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def test_a_script_without_a_main_guard_builds(tmp_path: Path) -> None:
    process = _script(tmp_path, 300)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "built 300" in out and "Traceback" not in err


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT])
def test_workers_die_with_their_parent(tmp_path: Path, how: signal.Signals) -> None:
    process = _script(tmp_path, 30_000)  # tens of seconds of work at least: it is stopped long before the end
    try:
        deadline = time.monotonic() + 120
        workers: list[int] = []
        while len(workers) < 2 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
            workers = _workers_of(process.pid) if _alive(process.pid) else []
        # Two encoding workers, and (the input is over 16 MiB) the validating process while it reads.
        assert len(workers) >= 2, process.stderr.read() if process.poll() is not None else "no workers started"
        time.sleep(0.5)  # workers started (on a loaded machine 2 s was once enough for 30,000 rows to finish)
        assert process.poll() is None, "the build ended before the signal: give the script more rows"
        process.send_signal(how)
        process.wait(timeout=60)  # no hang: Ctrl-C and SIGTERM end the build, and the process exits
        deadline = time.monotonic() + 30
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers)  # no orphans
        if how == signal.SIGINT:
            assert "KeyboardInterrupt" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_worker_count(monkeypatch) -> None:
    cores = len(os.sched_getaffinity(0))
    assert worker_count(3, 10) == 3 and worker_count(1, None) == 1
    assert worker_count("auto", 1000) == 1  # a small input: starting workers costs more than it saves
    assert worker_count("auto", None) == (min(cores, 8) if cores >= 3 else 1)  # 2 cores: the threaded pipeline
    assert worker_count("auto", 1 << 40, ranks=cores) == 1  # every local rank encoding at once: one core each
    monkeypatch.setattr(parallel, "usable_cores", lambda: 16)
    assert worker_count("auto", 1 << 30) == 8 and worker_count("auto", 1 << 30, ranks=4) == 4
    assert worker_count("auto", 1 << 30, ranks=8) == 1
    for bad in (0, -1, True, "4"):
        with pytest.raises(ConfigError, match="num_workers"):
            worker_count(bad, 10)


def test_encoding_ranks(monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert encoding_ranks(shared_cache=True) == 1  # rank 0 encodes into the shared cache; the others wait
    assert encoding_ranks(shared_cache=False) == 4


def test_num_workers_config_key() -> None:
    from sftlab.config import DataConfig as Data

    assert build(Data, {"num_workers": 2}, prefix="data.").num_workers == 2
    assert build(Data, {"num_workers": "auto"}, prefix="data.").num_workers == "auto"
    for bad in (0, "many", 1.5):
        with pytest.raises(ConfigError, match="num_workers"):
            build(Data, {"num_workers": bad}, prefix="data.")


def _boom_encoder(tmp_path: Path) -> Encoder:
    """An Encoder whose template refuses a row whose content is BOOM: an error only encoding finds."""
    tokenizer = real_tokenizer("qwen2_5")
    template = tmp_path / "boom.jinja"
    template.write_text("{% for m in messages %}{% if m.content == 'BOOM' %}{{ raise_exception('no boom') }}"
                        "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
                        encoding="utf-8")
    return Encoder(tokenizer, load_template(str(template), tokenizer))


@pytest.mark.parametrize("errors", ["read", "encode then read", "encode", "none"])
def test_the_validation_pass_apart_fails_and_writes_as_in_this_process(tmp_path: Path, monkeypatch,
                                                                        errors: str) -> None:
    """For a large input the validation pass runs in a process of its own beside the encoding: the same first
    error (a bad row found by reading comes before an encoding error on an earlier row, as when the whole file
    was validated first), the same dataset when there is none, and the process is gone afterwards."""
    encoder = _boom_encoder(tmp_path)
    rows = [json.dumps({"messages": [{"role": "user", "content": f"q{i} é"},
                                     {"role": "assistant", "content": f"a{i}"}]}) for i in range(400)]
    if "encode" in errors:
        rows[3] = rows[3].replace('"a3"', '"BOOM"')
    if "read" in errors:
        rows[350] = rows[350].replace('"user"', '"usr"')
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    monkeypatch.setattr(dataset, "BATCH_ROWS", 8)
    outcomes = []
    for apart in (False, True):
        monkeypatch.setattr(parallel, "MIN_APART_BYTES", 0 if apart else 1 << 40)
        started = []
        monkeypatch.setattr(parallel.Validator, "__init__", _recording(parallel.Validator.__init__, started))
        before = _children()
        if errors == "none":
            outcomes.append(_build(path, encoder, 1))
        else:
            with pytest.raises(DataError) as caught:
                dataset.build_dataset(path, DataConfig(cache=False), encoder)
            outcomes.append((str(caught.value), caught.value.where, caught.value.reason))
        assert bool(started) == apart
        assert not [pid for pid in _children() - before if _alive(pid)]  # the validating process is gone
    assert outcomes[0] == outcomes[1]
    if errors != "none":
        assert outcomes[0][1].endswith("rows.jsonl:351" if "read" in errors else "rows.jsonl:4")


def _recording(init, calls: list):
    def wrapped(self, *args, **kwargs):
        calls.append(args)
        init(self, *args, **kwargs)
    return wrapped


def test_the_validation_pass_stays_in_this_process_when_it_would_not_pay(monkeypatch) -> None:
    monkeypatch.setattr(parallel, "usable_cores", lambda: 2)
    assert parallel.Validator.wanted("error", 64 << 20)
    assert not parallel.Validator.wanted("skip", 64 << 20)  # no validation pass at all
    assert not parallel.Validator.wanted("error", 1 << 20)  # small: starting a process costs more
    assert not parallel.Validator.wanted("error", None)  # a Hub dataset: read once more over the network, here
    assert not parallel.Validator.wanted("error", 64 << 20, ranks=2)  # two ranks encoding at once: no core spare
    monkeypatch.setattr(parallel, "usable_cores", lambda: 1)
    assert not parallel.Validator.wanted("error", 64 << 20)


def test_a_validating_process_that_cannot_start_leaves_the_pass_here(tmp_path: Path, monkeypatch) -> None:
    rows = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]})
            for i in range(30)]
    rows[20] = rows[20].replace('"user"', '"usr"')
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    monkeypatch.setattr(parallel, "MIN_APART_BYTES", 0)

    def refuse(self, reader):
        raise pickle.PicklingError("a reader that does not pickle")

    monkeypatch.setattr(parallel.Validator, "__init__", refuse)
    monkeypatch.setattr(dataset, "BATCH_ROWS", 4)
    encoded = []
    monkeypatch.setattr(Encoder, "encode_stream", lambda self, batches: encoded.append(1) or iter(()))
    with pytest.raises(DataError, match="rows.jsonl:21"):
        dataset.build_dataset(path, DataConfig(cache=False), _boom_encoder(tmp_path))
    assert not encoded  # validated here, before any encoding, as for a small input
