"""Fuzzing (hypothesis) of the readers and of template rendering: whatever the input, the result is a
Conversation / Example or a `DataError` naming where — never another exception (issue 8, hardening).

Readers: every format (auto and the four named) over .jsonl, .json and .parquet files built from arbitrary
JSON values (null, bools, ints of any size, floats with NaN/Infinity, any unicode including lone surrogates
from escapes, NUL and other controls, nested lists/objects, deep nesting), rows shaped like each format with
wrong-typed fields, and raw broken lines (invalid JSON, truncated rows, invalid UTF-8, BOM, blank lines,
CRLF, a huge line). Rendering/encoding: chatml, llama3, a real tokenizer's own template (auto, Qwen2.5)
and a .jinja file, over conversations with wrong-typed fields, template syntax (`{{`, `{%`), special-token
text and unicode; the generate-time render of raw message dicts; and stage dpo's preference pairs through
read_pairs and the PairEncoder.

CI runs a fixed (derandomized) sample; SFTLAB_PROPERTY_EXAMPLES=2000 searches deeper.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from conftest import real_tokenizer, tiny_chat_tokenizer, tiny_tokenizer
from sftlab.data.encode import IGNORE_INDEX, Dropped, Encoder
from sftlab.data.formats import read_conversations
from sftlab.data.rejects import RejectLog
from sftlab.data.schema import Conversation, Message
from sftlab.data.templates import load_template
from sftlab.errors import DataError

FORMATS = ("auto", "messages", "prompt_completion", "alpaca", "sharegpt")
ROLE_MAP = {"bot": "assistant", "tool": "nobody"}  # a mapped role and one mapped to an invalid role
MAX_MESSAGE_CHARS = 2000
"""An error message quotes values shortened: a huge row must not make a huge (or unprintable) message."""

EXAMPLES = int(os.environ.get("SFTLAB_PROPERTY_EXAMPLES", "0"))
FUZZ: dict[str, Any] = {"deadline": None, "derandomize": True, "database": None, "suppress_health_check": [
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]}


def fuzz(default_examples: int) -> Any:
    return settings(max_examples=EXAMPLES or default_examples, **FUZZ)


# ---- JSON values ----------------------------------------------------------------------------------------

@dataclass(frozen=True, repr=False)
class Raw:
    """JSON text written as is: what json.dumps cannot produce (an integer of 5000 digits, 100k-deep nesting)."""
    text: str

    def __repr__(self) -> str:  # short, for hypothesis' reports
        return f"Raw({self.text[:8]!r}...{len(self.text)} chars)"


KEYS = ("messages", "role", "content", "train", "prompt", "completion", "instruction", "input", "output",
        "conversations", "from", "value", "system", "name", "tool_calls", "")
ROLES = ("system", "user", "assistant", "human", "gpt", "bot", "tool", "", "User", " user")
SURROGATES = ("\ud800", "\udfff", "\ud83d", "\ude42")
"""Only JSON escapes give these (unpaired): invalid Unicode that no tokenizer takes."""
ODD = ("\x00", "\x1f", "\x7f", "\u2028", "\ufeff", "\r", "\n", "\r\n",
       "\u200d", "\u0301", "\U0001f642", "\\", '"', "{{", "}}", "{%", "%}", "{#", "{{ messages }}",
       "{% for m in messages %}", "<|im_end|>", "<|im_start|>assistant\n", "<|eot_id|>", "<|begin_of_text|>",
       "<|endoftext|>", "@@SFTLAB", " ", "\t")
RAW_EDGES = (Raw("9" * 5000), Raw("-" + "1" * 4301), Raw("1e999"), Raw("-1e999"), Raw("1" * 4300),
             Raw("[" * 100_000 + "]" * 100_000), Raw('{"a":' * 50_000 + "1" + "}" * 50_000),
             Raw("[" * 500 + "]" * 500))
"""Integers past Python's 4300-digit limit, numbers that overflow to infinity, nesting past the recursion limit."""


def rarely(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any], one_in: int = 8) -> st.SearchStrategy[Any]:
    """`rare` one time in `one_in`: enough to be found, not so often that every row is refused for it."""
    return st.integers(1, one_in).flatmap(lambda k: rare if k == 1 else common)


fragments = rarely(st.one_of(st.text(max_size=4), st.sampled_from(ODD)), st.sampled_from(SURROGATES), one_in=30)
texts = st.lists(fragments, max_size=5).map("".join)
nonempty_texts = st.lists(fragments, min_size=1, max_size=5).map("".join).filter(bool)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=6))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2**80, 2**80),
                    st.floats(allow_nan=True, allow_infinity=True), texts, st.sampled_from(RAW_EDGES))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(keys, inner, max_size=4)),
                           max_leaves=10)
contents = rarely(nonempty_texts, json_values, one_in=4)
roles = rarely(st.sampled_from(ROLES), json_values, one_in=4)
trains = st.one_of(st.none(), st.booleans(), json_values)


def dump(value: Any, ascii: bool) -> str:
    """JSON text of a value holding Raw parts; non-ASCII text raw (ascii=False) or escaped (ascii=True)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, list):
        return "[" + ", ".join(dump(v, ascii) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=ascii)}: {dump(v, ascii)}"
                               for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=ascii)


def message_dicts(role_key: str, content_key: str) -> st.SearchStrategy[Any]:
    message = st.fixed_dictionaries({role_key: roles, content_key: contents},
                                    optional={"train": trains, "extra": json_values})
    alternating = st.lists(st.sampled_from(("user", "assistant")), min_size=1, max_size=4).flatmap(
        lambda names: st.tuples(*[st.fixed_dictionaries({role_key: st.just(n), content_key: contents})
                                  for n in names]).map(list))
    return st.one_of(st.lists(message, max_size=4), alternating, json_values)


shaped_rows = st.one_of(
    st.fixed_dictionaries({"messages": message_dicts("role", "content")}, optional={"extra": json_values}),
    st.fixed_dictionaries({"conversations": message_dicts("from", "value")}, optional={"extra": json_values}),
    st.fixed_dictionaries({"instruction": contents, "output": contents},
                          optional={"input": contents, "system": contents}),
    st.fixed_dictionaries({"prompt": st.one_of(contents, message_dicts("role", "content")),
                           "completion": st.one_of(contents, message_dicts("role", "content"))}),
)
good_rows = st.one_of(  # well-formed rows of each format, so readers also yield and stream conversations
    st.builds(lambda u, a: {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]},
              nonempty_texts, nonempty_texts),
    st.builds(lambda u, a: {"conversations": [{"from": "human", "value": u}, {"from": "gpt", "value": a}]},
              nonempty_texts, nonempty_texts),
    st.builds(lambda u, a: {"instruction": u, "output": a}, nonempty_texts, nonempty_texts),
    st.builds(lambda u, a: {"prompt": u, "completion": a}, nonempty_texts, nonempty_texts),
)
rows = st.one_of(shaped_rows, good_rows, json_values)


# ---- .jsonl -----------------------------------------------------------------------------------------------

BROKEN_LINES = (b"{", b'{"messages": [', b'{"messages": [{"role": "user", "content": "a"}', b"\xff\xfe",
                b"\xc3(", b"\xed\xa0\x80", b"\xef\xbb\xbf{}", b"\x00", b"   ", b"", b"\t\x0c", b"\xe3\x80\x80",
                b"null", b"[]", b"NaN", b"{} {}", b'{"a": 1,}', b"'x'", b"\xef\xbb\xbf", b"\r",
                b'{"messages": "\\ud800"}', b'{"prompt": "\\udfff", "completion": "a\\u0000"}')


@st.composite
def jsonl_lines(draw: st.DrawFn) -> list[bytes]:
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(("row",) * 6 + ("broken", "truncated") * 2 + ("huge",)))
        if kind == "broken":
            lines.append(draw(st.sampled_from(BROKEN_LINES)))
            continue
        text = dump(draw(rows), ascii=draw(st.booleans()))
        if kind == "truncated":
            text = text[: draw(st.integers(0, max(len(text) - 1, 0)))]
        elif kind == "huge":  # a valid row of about 300k characters
            text = json.dumps({"messages": [{"role": "user", "content": "q"},
                                            {"role": "assistant", "content": "\u00e9" * 300_000}]})
        lines.append(text.encode("utf-8", "surrogatepass"))  # a raw lone surrogate is invalid UTF-8
    return lines


@dataclass
class Outcome:
    conversations: list[Conversation]
    error: DataError | None
    rejects: list[dict[str, Any]]


def read(path: Path, fmt: str, on_bad_row: str) -> Outcome:
    """Consume the reader; a DataError is the only exception allowed out (anything else fails the test)."""
    log_path = path.with_suffix(".rejects.jsonl")
    conversations: list[Conversation] = []
    error = None
    with RejectLog(log_path) as log:
        try:
            for conversation in read_conversations(path, format=fmt, role_map=ROLE_MAP, on_bad_row=on_bad_row,
                                                   rejects=log):
                conversations.append(conversation)
        except DataError as exc:
            error = exc
        total = log.total
    lines = log_path.read_text(encoding="utf-8").split("\n")[:-1] if log_path.exists() else []
    rejects = [json.loads(line) for line in lines]  # split("\n"): a row may hold U+2028, which splitlines splits
    assert len(rejects) == total
    return Outcome(conversations, error, rejects)


def check_message(error: DataError, path: Path) -> None:
    """Names where (the file, or file:line), reads as text and stays short."""
    assert error.where.startswith(str(path)), error
    assert str(error).startswith(f"{error.where}: ")
    assert str(error).encode("utf-8")  # printable: no lone surrogate from the row
    assert 0 < len(error.detail) < MAX_MESSAGE_CHARS
    assert error.reason


def line_number(where: str, path: Path) -> int:
    prefix = f"{path}:"
    assert where.startswith(prefix), where
    return int(where[len(prefix):])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@fuzz(150)
@given(lines=jsonl_lines(), fmt=st.sampled_from(FORMATS), newline=st.sampled_from((b"\n", b"\r\n")),
       bom=st.booleans(), final_newline=st.booleans())
@example(lines=[b'{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
                b"9" * 5000, b"[" * 100_000, b"\xed\xa0\x80"], fmt="auto", newline=b"\r\n", bom=True,
         final_newline=False)
def test_jsonl_reader_gives_conversations_or_data_errors_naming_the_line(
        workdir: Path, lines: list[bytes], fmt: str, newline: bytes, bom: bool, final_newline: bool) -> None:
    path = workdir / "data.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + newline.join(lines) + (newline if final_newline else b""))
    skipped = read(path, fmt, "skip")
    assert skipped.error is None, f"skip raised for a bad row: {skipped.error}"

    # Every line with text becomes a conversation or a reject with its line number; blank lines neither.
    stored = path.read_bytes().split(b"\n")
    texts_by_line = {}
    for number, line in enumerate(stored, start=1):
        line = line[3:] if number == 1 and line.startswith(b"\xef\xbb\xbf") else line
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        if text.strip():
            texts_by_line[number] = text
    kept = [line_number(c.where, path) for c in skipped.conversations]
    event(f"conversations read: {min(len(kept), 2)}{'+' if len(kept) > 2 else ''}")
    rejected = [line_number(r["where"], path) for r in skipped.rejects]
    assert kept == sorted(kept) and rejected == sorted(rejected)
    assert sorted(kept + rejected) == sorted(texts_by_line), "a row was dropped without a trace"
    for record in skipped.rejects:
        event(f"rejected: {record['reason']}")
        assert record["row"] == texts_by_line[line_number(record["where"], path)]
        assert record["reason"] and 0 < len(record["message"]) < MAX_MESSAGE_CHARS

    # error mode: the same conversations up to the first bad row, then a DataError naming its line.
    strict = read(path, fmt, "error")
    if not skipped.rejects:
        assert strict.error is None and strict.conversations == skipped.conversations
        return
    assert strict.error is not None
    check_message(strict.error, path)
    assert strict.error.where == skipped.rejects[0]["where"]
    first_bad = rejected[0]
    assert strict.conversations == [c for c in skipped.conversations if line_number(c.where, path) < first_bad]


# ---- .json arrays ---------------------------------------------------------------------------------------

def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):  # an integer too long for Python, nesting too deep
        return False
    return True


@st.composite
def json_arrays(draw: st.DrawFn) -> tuple[bytes, int, bool]:
    """(file bytes, number of rows, whether the file may be refused as a whole: corrupted after it was
    built, or holding a row Python's json cannot read, after which the array cannot be read on)."""
    items = [dump(row, ascii=True) for row in draw(st.lists(rows, max_size=5))]
    text = ("[\n" + ",\n".join(items) + "\n]").encode("utf-8")
    corruption = draw(st.sampled_from(("none", "none", "none", "truncate", "bytes", "bom", "not array")))
    if corruption == "truncate":
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif corruption == "bytes":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(BROKEN_LINES)) + text[at:]
    elif corruption == "bom":
        text = b"\xef\xbb\xbf" + text
    elif corruption == "not array":
        text = draw(st.sampled_from((b"{}", b"null", b"  ", b'"x"'))) + text
    return text, len(items), corruption not in ("none", "bom") or not all(_parses(i) for i in items)


@fuzz(120)
@given(array=json_arrays(), fmt=st.sampled_from(FORMATS))
def test_json_array_reader_gives_conversations_or_data_errors_naming_where(
        workdir: Path, array: tuple[bytes, int, bool], fmt: str) -> None:
    text, count, corrupted = array
    path = workdir / "data.json"
    path.write_bytes(text)
    skipped = read(path, fmt, "skip")
    kept = [line_number(c.where, path) for c in skipped.conversations]
    rejected = [line_number(r["where"], path) for r in skipped.rejects]
    assert kept == sorted(kept) and rejected == sorted(rejected)  # in file order
    if skipped.error is not None:  # a whole-file problem: the array cannot be read on past it
        event(f"whole file: {skipped.error.reason}")
        assert corrupted, f"an intact array was refused as a whole: {skipped.error}"
        check_message(skipped.error, path)
    elif not corrupted:  # row k of the array is on line k + 2; each row is read or rejected
        assert sorted(kept + rejected) == list(range(2, count + 2))

    strict = read(path, fmt, "error")
    first = skipped.rejects[0]["where"] if skipped.rejects else skipped.error.where if skipped.error else None
    if first is None:
        assert strict.error is None and strict.conversations == skipped.conversations
    else:
        assert strict.error is not None and strict.error.where == first
        check_message(strict.error, path)


# ---- .parquet ---------------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """A value pyarrow can hold: Raw parts become their text."""
    if isinstance(value, Raw):
        return value.text[:100]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@fuzz(60)
@given(values=st.lists(shaped_rows, min_size=1, max_size=3), fmt=st.sampled_from(FORMATS))
def test_parquet_reader_gives_conversations_or_data_errors_naming_the_row(workdir: Path, values: list[Any],
                                                                        fmt: str) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = workdir / "data.parquet"
    try:
        pq.write_table(pa.Table.from_pylist([_plain(v) for v in values]), path)
    except Exception:  # broad on purpose: a row set pyarrow cannot store (mixed types) is no parquet file
        assume(False)
    skipped = read(path, fmt, "skip")
    assert skipped.error is None
    numbers = sorted([c.where for c in skipped.conversations] + [r["where"] for r in skipped.rejects])
    assert numbers == sorted(f"{path}:row {n}" for n in range(1, len(values) + 1))
    strict = read(path, fmt, "error")
    if skipped.rejects:
        assert strict.error is not None and strict.error.where == skipped.rejects[0]["where"]
        check_message(strict.error, path)
    else:
        assert strict.error is None


@functools.cache
def _parquet_bytes(directory: Path) -> bytes:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = directory / "good.parquet"
    rows = [{"messages": [{"role": "user", "content": f"Grüße {i} 🙂"}, {"role": "assistant", "content": "ok"}],
             "source": f"s{i}"} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path.read_bytes()


@fuzz(100)
@given(patches=st.lists(st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=16)), min_size=1, max_size=4),
       keep=st.one_of(st.none(), st.floats(0, 1)), on_bad_row=st.sampled_from(("error", "skip")))
@example(patches=[(0.0, b"{")], keep=0.0, on_bad_row="skip")
def test_corrupted_parquet_files_give_data_errors_naming_the_file(workdir: Path, patches: list[tuple[float, bytes]],
                                                                  keep: float | None, on_bad_row: str) -> None:
    """Bytes overwritten or cut off: pyarrow's ArrowInvalid/OSError/UnicodeDecodeError become a DataError."""
    data = bytearray(_parquet_bytes(workdir))
    for at, patch in patches:
        start = int(at * (len(data) - 1))
        data[start:start + len(patch)] = patch
    path = workdir / "corrupt.parquet"
    path.write_bytes(bytes(data[: int(keep * len(data))] if keep is not None else data))
    outcome = read(path, "auto", on_bad_row)
    if outcome.error is not None:
        event(f"refused: {outcome.error.reason}")
        check_message(outcome.error, path)
        assert outcome.error.where == str(path) or on_bad_row == "error"


# ---- rendering and encoding -------------------------------------------------------------------------------

CUSTOM_JINJA = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}{{ message['content'] | trim }}{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEMPLATES = ("chatml-tiny", "llama3-tiny", "chatml-qwen2_5", "auto-qwen2_5", "auto-llama3_2", "custom-tiny")
"""template-tokenizer; auto is the real tokenizer's own Jinja template, custom a .jinja file."""
VARIANTS = (("assistant", None, "drop"), ("all", None, "drop"), ("last_assistant", 24, "truncate"),
            ("assistant", 24, "drop"))


def _tokenizer(name: str) -> Any:
    """One tokenizer per template for the tiny ones (an Encoder adds its template's tokens to it), one
    copy per real tokenizer (Qwen2.5 has the ChatML tokens already)."""
    tokenizer = name.split("-")[1]
    return _tokenizer_by_key(name if tokenizer == "tiny" else tokenizer)


@functools.cache
def _tokenizer_by_key(key: str) -> Any:
    if key == "custom-tiny":
        return tiny_chat_tokenizer()
    return tiny_tokenizer() if key.endswith("tiny") else real_tokenizer(key)


@functools.cache
def _template(name: str, directory: Path) -> Any:
    kind = name.split("-")[0]
    if kind == "custom":
        path = directory / "custom.jinja"
        path.write_text(CUSTOM_JINJA, encoding="utf-8")
        kind = str(path)
    return load_template(kind, _tokenizer(name))


@functools.cache
def _encoder(name: str, directory: Path, variant: tuple[str, int | None, str]) -> Encoder:
    train_on, max_seq_len, truncation = variant
    tokenizer = _tokenizer(name)
    return Encoder(tokenizer, _template(name, directory), train_on=train_on, max_seq_len=max_seq_len,
                   truncation=truncation, add_special_tokens=name.endswith("tiny"))


@st.composite
def conversations(draw: st.DrawFn) -> Conversation:
    """Mostly well-shaped conversations (so rendering and tokenising run), with wrong types mixed in."""
    text_contents = st.one_of(nonempty_texts, st.sampled_from(ODD))
    if draw(st.integers(0, 3)) == 0:
        messages = draw(st.lists(st.builds(Message, roles, contents, trains), max_size=5))
    else:
        names = (["system"] if draw(st.booleans()) else []) + ["user", "assistant"] * draw(st.integers(1, 3))
        messages = [Message(n, draw(text_contents), draw(st.sampled_from((None, True, False)))) for n in names]
    return Conversation(tuple(messages), where="fuzz.jsonl:7")


def encode_or_refusal(encoder: Encoder, conversation: Conversation) -> Any:
    try:
        return encoder.encode(conversation)
    except Dropped as exc:
        event(f"dropped: {exc.reason}")
        return exc
    except DataError as exc:
        event(f"refused: {exc.reason}")
        assert exc.where == "fuzz.jsonl:7" and str(exc).encode("utf-8")
        return exc


@pytest.mark.parametrize("name", TEMPLATES)
@fuzz(40)
@given(batch=st.lists(conversations(), min_size=1, max_size=3), variant=st.sampled_from(VARIANTS))
@example(batch=[Conversation((Message("user", "{{ messages }}{% raw %}"), Message("assistant", "<|im_end|>\ud800")),
                             "fuzz.jsonl:7"),
                Conversation((Message("user", "{%- for x in range(99999) %}"), Message("assistant", "}}")),
                             "fuzz.jsonl:7"),
                Conversation((Message("user", 5), Message(["assistant"], "b", "yes")), "fuzz.jsonl:7")],
         variant=VARIANTS[0])
def test_encoder_gives_an_example_or_a_data_error(workdir: Path, name: str, batch: list[Conversation],
                                                  variant: tuple[str, int | None, str]) -> None:
    encoder = _encoder(name, workdir, variant)
    results = encoder.encode_batch(batch)
    assert len(results) == len(batch)
    for conversation, result in zip(batch, results):
        alone = encode_or_refusal(encoder, conversation)
        if isinstance(result, DataError):
            assert isinstance(alone, DataError) and alone.reason == result.reason
            continue
        event("encoded")
        ids, labels = result.example.input_ids, result.example.labels
        assert not isinstance(alone, DataError), str(alone)
        assert alone.input_ids == ids and alone.labels == labels
        assert len(ids) == len(labels) and any(label != IGNORE_INDEX for label in labels)
        assert variant[1] is None or len(ids) <= variant[1]


raw_messages = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": texts}),
    st.dictionaries(st.sampled_from(("role", "content", "tool_calls", "name")), json_values, max_size=3),
), max_size=4)


@pytest.mark.parametrize("name", TEMPLATES)
@fuzz(40)
@given(messages=raw_messages, generation_prompt=st.booleans())
def test_render_text_of_raw_messages_gives_text_or_a_data_error(workdir: Path, name: str,
                                                                messages: list[dict[str, Any]],
                                                                generation_prompt: bool) -> None:
    """The generate-time path: messages typed in `chat` are rendered without a Conversation around them."""
    template = _template(name, workdir)
    try:
        text = template.render_text(messages, add_generation_prompt=generation_prompt, where="chat")
    except DataError as exc:
        event(f"refused: {exc.reason}")
        assert exc.where == "chat" and exc.reason in ("template refused", "template failed")
        return
    assert isinstance(text, str)


# ---- preference pairs (stage dpo) ------------------------------------------------------------------------

answers = st.one_of(contents, st.fixed_dictionaries({"role": roles, "content": contents}),
                    message_dicts("role", "content"))
pair_rows = st.one_of(
    st.fixed_dictionaries({"prompt": st.one_of(contents, message_dicts("role", "content")),
                           "chosen": answers, "rejected": answers}, optional={"extra": json_values}),
    st.fixed_dictionaries({"chosen": message_dicts("role", "content"), "rejected": message_dicts("role", "content")}),
    st.builds(lambda p, c, r: {"prompt": p, "chosen": c, "rejected": r}, nonempty_texts, nonempty_texts,
              nonempty_texts),  # well formed (identical answers are a bad row too)
    json_values,
)


@fuzz(120)
@given(rows=st.lists(st.one_of(pair_rows.map(lambda r: dump(r, ascii=False).encode("utf-8", "surrogatepass")),
                               st.sampled_from(BROKEN_LINES)), max_size=6))
def test_pair_reader_and_encoder_give_pairs_or_data_errors_naming_the_line(workdir: Path, rows: list[bytes]) -> None:
    from sftlab.data.preference import PairEncoder, read_pairs

    path = workdir / "pairs.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    with RejectLog(path.with_suffix(".rejects.jsonl")) as log:
        pairs = list(read_pairs(path, on_bad_row="skip", rejects=log))  # a bad row never raises under skip
        lines = path.read_bytes().split(b"\n")
        lines[0] = lines[0].removeprefix(b"\xef\xbb\xbf")
        assert log.total + len(pairs) == sum(1 for line in lines if line.decode("utf-8", "replace").strip())
    try:
        list(read_pairs(path, on_bad_row="error"))
    except DataError as exc:
        check_message(exc, path)
    encoder = PairEncoder(_encoder("chatml-tiny", workdir, ("assistant", 64, "drop")))
    for pair, result in zip(pairs, encoder.encode_batch(pairs)):
        if isinstance(result, DataError):
            assert result.where == pair.where
            continue
        for side in (result.chosen, result.rejected):
            assert len(side.input_ids) == len(side.labels)
            assert side.input_ids[:result.prompt_tokens] == result.chosen.input_ids[:result.prompt_tokens]
            assert all(label == IGNORE_INDEX for label in side.labels[:result.prompt_tokens])
