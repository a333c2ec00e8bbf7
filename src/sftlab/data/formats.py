"""Readers: .jsonl (streamed), .json arrays and .parquet rows in four formats -> Conversation.

Formats (detected from the first row's keys, or set with `data.format`):
- messages:          {"messages": [{"role", "content", "train"?}, ...]}
- prompt_completion: {"prompt": str, "completion": str}, or both lists of messages
- alpaca:            {"instruction", "input"?, "output", "system"?}
- sharegpt:          {"conversations": [{"from", "value"}, ...]} (human/gpt/system, plus data.role_map)
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from sftlab.data.rejects import RejectLog
from sftlab.data.schema import Conversation, Message, shown, validate
from sftlab.errors import ConfigError, DataError

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                  "assistant": "assistant"}


@dataclass(frozen=True)
class Row:
    """One input row: its location, its raw text (for rejects.jsonl) and the parsed value."""
    where: str
    raw: str | None
    value: Any = None
    error: DataError | None = None


def iter_rows(path: str | Path) -> Iterator[Row]:
    """Yield every row of a .jsonl / .json / .parquet file; unreadable rows carry their DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check data.train / data.eval or the DATA argument.",
                        reason="missing file")
    suffix = path.suffix.lower()
    readers: dict[str, Callable[[Path], Iterator[Row]]] = {
        ".jsonl": _jsonl_rows, ".json": _json_array_rows, ".parquet": _parquet_rows}
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type {suffix!r}; expected .jsonl, .json or .parquet.",
                        reason="unsupported file")
    return readers[suffix](path)


def _jsonl_rows(path: Path) -> Iterator[Row]:
    try:
        file = path.open("rb")
    except OSError as exc:
        raise _unreadable(path, exc) from None
    with file:
        for number, line in enumerate(file, start=1):
            where = f"{path}:{number}"
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a UTF-8 byte-order mark some editors write
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Row(where, line.decode("utf-8", "replace").rstrip("\r\n"), error=DataError(
                    f"invalid UTF-8 at byte {exc.start} of the line; expected UTF-8 text. Re-encode the "
                    "file as UTF-8 (e.g. iconv -t UTF-8).", where=where, reason="invalid UTF-8"))
                continue
            if not text.strip():
                continue  # a blank line is not a row
            text = text.rstrip("\r\n")
            try:
                value = json.loads(text)
            except (ValueError, RecursionError) as exc:
                yield Row(where, text, error=DataError(
                    _unparsable(exc, "one JSON object per line"), where=where, reason="invalid JSON"))
                continue
            yield Row(where, text, value)


def _json_array_rows(path: Path) -> Iterator[Row]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise _unreadable(path, exc) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"invalid UTF-8 at byte {exc.start}; expected a UTF-8 JSON file.",
                        where=str(path), reason="invalid UTF-8") from None
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)
    if not text.startswith("[", pos):
        raise DataError("expected a JSON array of rows ([{...}, {...}]); for one object per line use .jsonl.",
                        where=f"{path}:1", reason="invalid JSON")
    pos, line = pos + 1, text.count("\n", 0, pos) + 1
    while True:
        start = _skip_space(text, pos)
        line += text.count("\n", pos, start)
        if text.startswith("]", start):
            return
        where = f"{path}:{line}"
        try:
            value, end = decoder.raw_decode(text, start)
        except (ValueError, RecursionError) as exc:
            raise DataError(_unparsable(exc, "a JSON array of row objects"), where=where,
                            reason="invalid JSON") from None
        yield Row(where, text[start:end], value)
        line += text.count("\n", start, end)
        pos = _skip_space(text, end)
        line += text.count("\n", end, pos)
        if text.startswith(",", pos):
            pos += 1
        elif not text.startswith("]", pos):
            raise DataError("expected ',' or ']' after a row of the JSON array.",
                            where=f"{path}:{line}", reason="invalid JSON")


def _unreadable(path: Path, exc: OSError) -> DataError:
    return DataError(f"cannot read the file: {exc.strerror or exc}; expected a readable data file. Check its "
                     "permissions and that it is a regular file.", where=str(path), reason="unreadable file")


def _unparsable(exc: ValueError | RecursionError, expected: str) -> str:
    """Why json could not read a row: bad syntax, an integer too long for Python, or nesting too deep."""
    if isinstance(exc, json.JSONDecodeError):
        at = f"column {exc.colno}" if exc.lineno == 1 else f"line {exc.lineno}, column {exc.colno} of the file"
        return f"invalid JSON at {at}: {exc.msg}; expected {expected}."
    if isinstance(exc, RecursionError):
        return (f"the JSON nests lists/objects too deeply to read; expected {expected} of ordinary depth. "
                "Flatten the row.")
    return (f"a number has more than {sys.get_int_max_str_digits()} digits, more than Python reads as an "
            f"integer; expected {expected} with numbers of ordinary size. Quote the number as a string or "
            "remove it.")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _parquet_rows(path: Path) -> Iterator[Row]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet needs pyarrow: pip install 'sftlab[parquet]'.",
                        where=str(path), reason="missing dependency") from None
    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for value in _parquet_values(batch, path, number):
                number += 1
                yield Row(f"{path}:row {number}", json.dumps(value, ensure_ascii=False, default=str), value)
    except (pyarrow.ArrowException, OSError, UnicodeDecodeError) as exc:  # not (or no longer) valid Parquet
        after = f" after row {number}" if number else ""
        raise DataError(f"cannot read the file as Parquet{after}: {str(exc).strip()}; expected a Parquet file as "
                        "pyarrow, pandas or datasets write it. Re-export the file, or convert it to .jsonl.",
                        where=str(path), reason="invalid parquet") from None


def _parquet_values(batch: Any, path: Path, before: int) -> list[Any]:
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:  # a string column is checked as UTF-8 only when it is read
        raise DataError(f"a string column holds invalid UTF-8 in rows {before + 1}-{before + batch.num_rows}; "
                        "expected UTF-8 text. Re-export the file with its text as UTF-8.",
                        where=str(path), reason="invalid UTF-8") from None


def detect_format(value: Any) -> str | None:
    """The format a row's keys announce, or None."""
    if not isinstance(value, Mapping):
        return None
    if "messages" in value:
        return "messages"
    if "conversations" in value:
        return "sharegpt"
    if "instruction" in value and "output" in value:
        return "alpaca"
    if "prompt" in value and "completion" in value:
        return "prompt_completion"
    return None


def read_conversations(path: str | Path, *, format: str = "auto", role_map: Mapping[str, str] | None = None,
                       on_bad_row: str = "error", rejects: RejectLog | None = None) -> Iterator[Conversation]:
    """Stream valid conversations from a file. A bad row raises DataError (`error`) or goes to `rejects`
    (`skip`); with `skip` and no RejectLog given, rejected rows are still counted by a private log."""
    return conversations_from_rows(iter_rows(path), format=format, role_map=role_map, on_bad_row=on_bad_row,
                                   rejects=rejects)


def conversations_from_rows(rows: Iterable[Row], *, format: str = "auto", role_map: Mapping[str, str] | None = None,
                            on_bad_row: str = "error", rejects: RejectLog | None = None) -> Iterator[Conversation]:
    """read_conversations over any rows (data/sources.py gives them for every kind of source)."""
    if on_bad_row not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_row must be error or skip; found {on_bad_row!r}")
    role_map = dict(role_map or {})
    log = rejects if rejects is not None else RejectLog()
    chosen = None if format == "auto" else format
    if chosen is not None and chosen not in CONVERTERS:
        raise ConfigError(f"data.format must be one of auto, {', '.join(CONVERTERS)}; found {format!r}")
    for row in rows:
        try:
            if row.error is not None:
                raise row.error
            if chosen is None:
                chosen = detect_format(row.value)
                if chosen is None:
                    raise DataError(_undetected(row.value), where=row.where, reason="unknown format")
            yield validate(CONVERTERS[chosen](row.value, row.where, role_map))
        except DataError as exc:
            if on_bad_row == "error":
                raise
            log.add(where=row.where, reason=exc.reason, message=exc.detail, row=row.raw)


def _undetected(value: Any) -> str:
    if not isinstance(value, Mapping):
        return f"the row is a JSON {type(value).__name__}; expected an object such as {{\"messages\": [...]}}."
    return (f"cannot tell the row's format from its keys {shown(sorted(value))}; expected 'messages', "
            "'conversations' (sharegpt), 'instruction'+'output' (alpaca) or 'prompt'+'completion'. "
            "Set data.format if the first row is unusual.")


def _require(row: Mapping[str, Any], key: str, expected: str, where: str) -> Any:
    if not isinstance(row, Mapping):
        raise DataError(f"the row is a JSON {type(row).__name__}; expected an object with field {key!r}.",
                        where=where, reason="not an object")
    if key not in row or row[key] is None:
        raise DataError(f"field {key!r} is missing; expected {expected}.", where=where, reason=f"missing {key}")
    return row[key]


def _message_list(items: Any, field: str, where: str, role_map: Mapping[str, str],
                  role_key: str = "role", content_key: str = "content",
                  builtin_roles: Mapping[str, str] | None = None) -> list[Message]:
    if not isinstance(items, list):
        raise DataError(f"field {field!r} is a {type(items).__name__}; expected a list of "
                        f"{{{role_key}, {content_key}}} objects.", where=where, reason=f"{field} not a list")
    messages = []
    for number, item in enumerate(items, start=1):
        if not isinstance(item, Mapping):
            raise DataError(f"{field}[{number - 1}] is a {type(item).__name__}; expected an object with "
                            f"{role_key!r} and {content_key!r}.", where=where, reason="message not an object")
        if role_key not in item:
            raise DataError(f"{field}[{number - 1}] has no {role_key!r} field; expected one of system, user, "
                            "assistant.", where=where, reason="missing role")
        if item.get(content_key) is None:
            raise DataError(f"{field}[{number - 1}] field {content_key!r} is missing or null; expected a non-empty "
                            "string. Add the message's text or remove the message.",
                            where=where, reason="missing content")
        role = item[role_key]
        if isinstance(role, str):  # a list or object role is unhashable; validate() reports it
            role = role_map.get(role, (builtin_roles or {}).get(role, role))
        messages.append(Message(role=role, content=item.get(content_key), train=item.get("train")))
    return messages


def _from_messages(row: Any, where: str, role_map: Mapping[str, str]) -> Conversation:
    items = _require(row, "messages", "a list of {role, content} objects", where)
    return Conversation(tuple(_message_list(items, "messages", where, role_map)), where)


def _from_sharegpt(row: Any, where: str, role_map: Mapping[str, str]) -> Conversation:
    items = _require(row, "conversations", "a list of {from, value} objects", where)
    messages = _message_list(items, "conversations", where, role_map, "from", "value", SHAREGPT_ROLES)
    return Conversation(tuple(messages), where)


def _from_alpaca(row: Any, where: str, role_map: Mapping[str, str]) -> Conversation:
    instruction = _text_field(row, "instruction", where)
    output = _text_field(row, "output", where)
    extra = row.get("input")
    extra = "" if extra is None else extra
    if not isinstance(extra, str):
        raise DataError(f"field 'input' is a {type(extra).__name__}; expected a string (or leave it out).",
                        where=where, reason="content not a string")
    system = row.get("system")
    messages = [] if system is None or system == "" else [Message("system", system)]
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages += [Message("user", prompt), Message("assistant", output)]
    return Conversation(tuple(messages), where)


def _from_prompt_completion(row: Any, where: str, role_map: Mapping[str, str]) -> Conversation:
    prompt = _require(row, "prompt", "a string or a list of messages", where)
    completion = _require(row, "completion", "a string or a list of messages", where)
    if isinstance(prompt, list) or isinstance(completion, list):
        before = _message_list(prompt, "prompt", where, role_map)
        after = _message_list(completion, "completion", where, role_map)
        if any(m.role != "assistant" for m in after):
            raise DataError("field 'completion' holds a non-assistant message; expected only assistant "
                            "messages after the prompt.", where=where, reason="completion not assistant")
        return Conversation(tuple(before + after), where)
    return Conversation((Message("user", _text_field(row, "prompt", where)),
                         Message("assistant", _text_field(row, "completion", where))), where)


def _text_field(row: Any, key: str, where: str) -> str:
    value = _require(row, key, "a non-empty string", where)
    if not isinstance(value, str):
        raise DataError(f"field {key!r} is a {type(value).__name__}; expected a non-empty string.",
                        where=where, reason="content not a string")
    if not value:
        raise DataError(f"field {key!r} is empty; expected a non-empty string.", where=where,
                        reason="empty content")
    return value


CONVERTERS: dict[str, Callable[[Any, str, Mapping[str, str]], Conversation]] = {
    "messages": _from_messages,
    "prompt_completion": _from_prompt_completion,
    "alpaca": _from_alpaca,
    "sharegpt": _from_sharegpt,
}
