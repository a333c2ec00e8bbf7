"""Readers: .jsonl (streamed), .json arrays and .parquet rows in four formats -> Conversation.

A row longer than the row byte limit (`row_byte_limit`: data.max_row_bytes, or derived from
data.max_seq_len) is rejected before it is parsed, so one giant row costs no more memory than the limit:
a .jsonl line is read at most limit + 1 bytes far and the rest skipped in chunks, never held. A .json
array is parsed whole (the file is in memory anyway: memory ~ file size), and a .parquet row is read as its
row group holds it (pyarrow's unit); an oversized row of either is still rejected before rendering.

Formats (detected from the first row's keys, or set with `data.format`):
- messages:          {"messages": [{"role", "content", "train"?}, ...], "tools"?}
- prompt_completion: {"prompt": str, "completion": str}, or both lists of messages
- alpaca:            {"instruction", "input"?, "output", "system"?, "history"?}
- sharegpt:          {"conversations": [{"from", "value"}, ...], "system"?, "tools"?} (human/gpt/system,
                     function_call/observation, plus data.role_map)

A message may carry OpenAI's tool-calling and reasoning fields: `tool_calls` (content then empty or
null), `reasoning_content` (or `reasoning` / `thinking`), and for a `tool` result `tool_call_id` / `name`.
Content may be a list of text parts, joined in order. `field_usage` says which fields a row's format reads,
so `check` can report every field that is ignored.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sftlab.data.rejects import RejectLog
from sftlab.data.schema import TOOL_POOL, Conversation, Message, ToolCall, validate
from sftlab.errors import ConfigError, DataError, shown

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                  "assistant": "assistant", "observation": "tool", "tool": "tool"}
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
"""Where datasets and OpenAI-compatible servers put an assistant's reasoning, in order of preference."""
MESSAGE_KEYS = {"role", "content", "train", "tool_calls", "tool_call_id", "name", *REASONING_KEYS}
ROW_KEYS = {"messages": {"messages", "tools"}, "sharegpt": {"conversations", "system", "tools"},
            "alpaca": {"instruction", "input", "output", "system", "history"},
            "prompt_completion": {"prompt", "completion", "tools"}}
"""The fields each format reads from a row (and, for lists of messages, from a message)."""


BYTES_PER_TOKEN = 32
"""Bytes of a row's JSON per token of its encoding, generously: English is ~4 bytes a token, and a token is
at most a few dozen bytes even as JSON escapes (an emoji escaped as two \\uXXXX is 12 bytes; a CJK character
6) or a long whitespace run some tokenizers hold as one token. A row over this many bytes per token of
data.max_seq_len would be (far) too long anyway."""
ROW_SLACK_BYTES = 64 * 1024
"""Added to the derived limit: the JSON keys, roles and structure of a row, and short max_seq_len values."""
ROW_TOO_LARGE = "row too large"
SKIP_CHUNK = 1 << 20
"""Bytes read at a time while skipping past an oversized line."""


def row_byte_limit(max_seq_len: int | None, max_row_bytes: int | None = None) -> int | None:
    """The most bytes a row's text may have: `max_row_bytes` when set, else BYTES_PER_TOKEN x max_seq_len +
    ROW_SLACK_BYTES (max_seq_len=2048: 128 KiB), else None (no limit: max_seq_len is null too).

    >>> row_byte_limit(2048), row_byte_limit(2048, 10_000), row_byte_limit(None)
    (131072, 10000, None)
    """
    if max_row_bytes is not None:
        return max_row_bytes
    return None if max_seq_len is None else BYTES_PER_TOKEN * max_seq_len + ROW_SLACK_BYTES


@dataclass(frozen=True)
class Row:
    """One input row: its location, its raw text (for rejects.jsonl) and the parsed value."""
    where: str
    raw: str | None
    value: Any = None
    error: DataError | None = None


def iter_rows(path: str | Path, *, max_row_bytes: int | None = None) -> Iterator[Row]:
    """Yield every row of a .jsonl / .json / .parquet file; unreadable rows, and rows of more than
    `max_row_bytes` bytes (not parsed; their `raw` is None), carry their DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check data.train / data.eval or the DATA argument.",
                        reason="missing file")
    suffix = path.suffix.lower()
    readers: dict[str, Callable[[Path, int | None], Iterator[Row]]] = {
        ".jsonl": _jsonl_rows, ".json": _json_array_rows, ".parquet": _parquet_rows}
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type {suffix!r}; expected .jsonl, .json or .parquet.",
                        reason="unsupported file")
    return readers[suffix](path, max_row_bytes)


def _too_large(where: str, size: int, limit: int) -> Row:
    return Row(where, None, error=DataError(
        f"the row is {size:,} bytes, more than the {limit:,}-byte row limit, so it was rejected before rendering "
        f"(it could not fit data.max_seq_len tokens: the limit is data.max_row_bytes, or {BYTES_PER_TOKEN} bytes "
        f"per token of data.max_seq_len + {ROW_SLACK_BYTES // 1024} KiB). Split or shorten the row, or raise "
        "data.max_row_bytes (or data.max_seq_len).", where=where, reason=ROW_TOO_LARGE))


def bounded_lines(file: IO[bytes], limit: int | None) -> Iterator[tuple[int, bytes | int]]:
    """(line number, line) for each line of a binary file; a line of more than `limit` bytes (its line
    break included) comes as its size in bytes instead: it is skipped SKIP_CHUNK bytes at a time, so at
    most limit + 1 bytes of it are ever held."""
    number = 0
    while True:
        line = file.readline() if limit is None else file.readline(limit + 1)
        if not line:
            return
        number += 1
        if limit is None or len(line) <= limit:
            yield number, line
            continue
        size = len(line)
        while not line.endswith(b"\n"):
            line = file.readline(SKIP_CHUNK)
            if not line:
                break
            size += len(line)
        yield number, size


def _jsonl_rows(path: Path, limit: int | None) -> Iterator[Row]:
    try:
        file = path.open("rb")
    except OSError as exc:
        raise _unreadable(path, exc) from None
    with file:
        for number, line in bounded_lines(file, limit):
            where = f"{path}:{number}"
            if isinstance(line, int):
                yield _too_large(where, line, limit or 0)
                continue
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


def _json_array_rows(path: Path, limit: int | None) -> Iterator[Row]:
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
        # The row is parsed before its size is known (the whole file is in memory already); a too-large
        # one is still rejected before it is rendered. Its size counted in characters, a lower bound of bytes.
        yield _too_large(where, end - start, limit) if limit is not None and end - start > limit \
            else Row(where, text[start:end], value)
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


def _parquet_rows(path: Path, limit: int | None) -> Iterator[Row]:
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
                raw = json.dumps(value, ensure_ascii=False, default=str)  # as big as the row group's share
                size = len(raw.encode("utf-8", "surrogatepass")) if limit is not None else 0
                yield _too_large(f"{path}:row {number}", size, limit) if limit is not None and size > limit \
                    else Row(f"{path}:row {number}", raw, value)
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
                       on_bad_row: str = "error", rejects: RejectLog | None = None,
                       max_row_bytes: int | None = None) -> Iterator[Conversation]:
    """Stream valid conversations from a file. A bad row, or one of more than `max_row_bytes` bytes (never
    parsed), raises DataError (`error`) or goes to `rejects` (`skip`); with `skip` and no RejectLog given,
    rejected rows are still counted by a private log."""
    return conversations_from_rows(iter_rows(path, max_row_bytes=max_row_bytes), format=format, role_map=role_map,
                                   on_bad_row=on_bad_row, rejects=rejects)


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


def items_from_rows(rows: Iterable[Row], convert: Callable[[Any, str], Any], *, accepts: Callable[[Any], bool],
                    kind: str, expected: str, reason: str, on_bad_row: str = "error",
                    rejects: RejectLog | None = None) -> Iterator[Any]:
    """Rows of one kind other than conversations (preference pairs, feedback) converted by `convert(value, where)`:
    a row `accepts` refuses is "not {kind}; expected {expected}". A bad row raises DataError (`error`) or goes to
    `rejects` (`skip`; with no RejectLog given, to a private one that still counts it)."""
    if on_bad_row not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_row must be error or skip; found {on_bad_row!r}")
    log = rejects if rejects is not None else RejectLog()
    for row in rows:
        try:
            if row.error is not None:
                raise row.error
            if not accepts(row.value):
                found = (f"an object with keys {', '.join(repr(k)[:40] for k in list(row.value)[:6])}"
                         if isinstance(row.value, Mapping) else f"a JSON {type(row.value).__name__}")
                raise DataError(f"the row is {found}, not {kind}; expected {expected}.", where=row.where,
                                reason=reason)
            yield convert(row.value, row.where)
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
        at = f"{field}[{number - 1}]"
        if not isinstance(item, Mapping):
            raise DataError(f"{at} is a {type(item).__name__}; expected an object with "
                            f"{role_key!r} and {content_key!r}.", where=where, reason="message not an object")
        if role_key not in item:
            raise DataError(f"{at} has no {role_key!r} field; expected one of system, user, "
                            "assistant, tool.", where=where, reason="missing role")
        role = item[role_key]
        if isinstance(role, str):  # a list or object role is unhashable; validate() reports it
            role = role_map.get(role, (builtin_roles or {}).get(role, role))
        if role == "function_call" and content_key == "value":  # LLaMA-Factory's sharegpt tool call
            messages.append(_sharegpt_function_call(item.get(content_key), at, where))
            continue
        calls = _tool_calls(item.get("tool_calls"), at, where)
        content = _content(item.get(content_key), at, content_key, where, optional=bool(calls))
        messages.append(Message(role=role, content=content, train=item.get("train"), tool_calls=calls,
                                reasoning=_reasoning(item), tool_call_id=item.get("tool_call_id"),
                                name=item.get("name") if role == "tool" else None))
    return messages


def _content(value: Any, at: str, key: str, where: str, *, optional: bool) -> Any:
    """A message's text: a string, or a list of text parts joined in order; null/absent is "" where the
    message makes tool calls (validate() reports anything else)."""
    if value is None:
        if optional:
            return ""
        raise DataError(f"{at} field {key!r} is missing or null; expected a non-empty string. Add the "
                        "message's text or remove the message.", where=where, reason="missing content")
    if not isinstance(value, list):
        return value
    texts = []
    for index, part in enumerate(value):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
            continue
        found = f"a part of type {kind!r}" if kind is not None else f"a {type(part).__name__}"
        raise DataError(f"{at} {key}[{index}] is {found}; expected text parts ({{\"type\": \"text\", \"text\": "
                        "...}). Images, audio and other non-text parts are not supported: remove them or "
                        "train a text-only version of the row.", where=where, reason="non-text content part")
    return "".join(texts)


def _reasoning(item: Mapping[str, Any]) -> Any:
    for key in REASONING_KEYS:
        value = item.get(key)
        if value is not None and value != "":
            return value
    return None


def _tool_calls(value: Any, at: str, where: str) -> tuple[ToolCall, ...]:
    """OpenAI's `[{"type": "function", "id", "function": {"name", "arguments"}}]`; a call given flat as
    {"name", "arguments"} is read the same way. Arguments given as a JSON string are parsed."""
    if value is None or value == []:
        return ()
    if not isinstance(value, list):
        raise DataError(f"{at} field 'tool_calls' is a {type(value).__name__}; expected a list of "
                        "{\"type\": \"function\", \"function\": {\"name\", \"arguments\"}} objects.",
                        where=where, reason="tool_calls not a list")
    calls = []
    for index, call in enumerate(value):
        function = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            raise DataError(f"{at} tool_calls[{index}] is {shown(call)}; expected an object with a 'function' "
                            "holding 'name' and 'arguments'.", where=where, reason="tool call not an object")
        call_id = call.get("id")
        calls.append(ToolCall(function.get("name"), _arguments(function.get("arguments"), f"{at} tool_calls[{index}]",
                                                              where), call_id if isinstance(call_id, str) else None))
    return tuple(calls)


def _arguments(value: Any, at: str, where: str) -> Any:
    if value is None:
        return {}
    if not isinstance(value, str):
        return value  # validate() requires an object
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):
        raise DataError(f"{at} arguments {shown(value)} are not valid JSON; expected a JSON object (or a "
                        "string holding one). Fix the arguments.", where=where,
                        reason="tool arguments not an object") from None
    return parsed


def _sharegpt_function_call(value: Any, at: str, where: str) -> Message:
    """LLaMA-Factory's `{"from": "function_call", "value": "{\"name\": ..., \"arguments\": ...}"}` (one
    call, or a list of them) as an assistant message making those calls."""
    try:
        parsed = json.loads(value) if isinstance(value, str) else value
    except (ValueError, RecursionError):
        parsed = None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not all(isinstance(c, Mapping) and "name" in c for c in calls):
        raise DataError(f"{at} (function_call) value is {shown(value)}; expected a JSON object "
                        "{\"name\": ..., \"arguments\": {...}} (or a list of them) as a string.",
                        where=where, reason="tool call not an object")
    return Message("assistant", "", tool_calls=_tool_calls(calls, at, where))


def _tools(row: Mapping[str, Any], where: str) -> tuple[Any, ...] | None:
    """A row's tool definitions: a list of JSON schemas, or a JSON string of one (LLaMA-Factory)."""
    value = row.get("tools") if isinstance(row, Mapping) else None
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise DataError(f"field 'tools' is a string that is not JSON: {shown(value)}; expected a list of "
                            "function definitions (JSON schemas).", where=where, reason="tools not a list") from None
    if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
        raise DataError(f"field 'tools' is {shown(value)}; expected a list of function definitions, e.g. "
                        "[{\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": {...}}}].",
                        where=where, reason="tools not a list")
    return tuple(map(TOOL_POOL.pooled, value))


def tool_names(tools: tuple[Any, ...] | None) -> set[str]:
    """Function names a row's tools define (OpenAI's wrapped shape or a bare function schema)."""
    names = set()
    for tool in tools or ():
        function = tool.get("function", tool)
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return names


def _from_messages(row: Any, where: str, role_map: Mapping[str, str]) -> Conversation:
    items = _require(row, "messages", "a list of {role, content} objects", where)
    return Conversation(tuple(_message_list(items, "messages", where, role_map)), where, _tools(row, where))


def _from_sharegpt(row: Any, where: str, role_map: Mapping[str, str]) -> Conversation:
    items = _require(row, "conversations", "a list of {from, value} objects", where)
    messages = _message_list(items, "conversations", where, role_map, "from", "value", SHAREGPT_ROLES)
    system = row.get("system")
    if system is not None and system != "" and not (messages and messages[0].role == "system"):
        messages.insert(0, Message("system", system))
    return Conversation(tuple(messages), where, _tools(row, where))


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
    messages += _alpaca_history(row.get("history"), where)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages += [Message("user", prompt), Message("assistant", output)]
    return Conversation(tuple(messages), where)


def _alpaca_history(value: Any, where: str) -> list[Message]:
    """Earlier turns as [[instruction, output], ...] (the alpaca layout LLaMA-Factory reads)."""
    if value is None or value == []:
        return []
    pairs = value if isinstance(value, list) else None
    if pairs is None or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise DataError(f"field 'history' is {shown(value)}; expected a list of [instruction, output] pairs.",
                        where=where, reason="history not a list")
    return [Message(role, text) for pair in pairs for role, text in zip(("user", "assistant"), pair)]


def _from_prompt_completion(row: Any, where: str, role_map: Mapping[str, str]) -> Conversation:
    prompt = _require(row, "prompt", "a string or a list of messages", where)
    completion = _require(row, "completion", "a string or a list of messages", where)
    if isinstance(prompt, list) or isinstance(completion, list):
        before = _message_list(prompt, "prompt", where, role_map)
        after = _message_list(completion, "completion", where, role_map)
        if any(m.role != "assistant" for m in after):
            raise DataError("field 'completion' holds a non-assistant message; expected only assistant "
                            "messages after the prompt.", where=where, reason="completion not assistant")
        return Conversation(tuple(before + after), where, _tools(row, where))
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


MESSAGE_LISTS = {"messages": ("messages",), "sharegpt": ("conversations",),
                 "prompt_completion": ("prompt", "completion")}
"""The fields of each format that hold a list of messages."""


def field_usage(value: Any, format: str) -> dict[str, bool]:
    """Each field of a row, and of its messages (as `messages[].KEY`), mapped to whether `format` reads
    it: what `check` counts so that nothing a row holds is dropped without a word."""
    if not isinstance(value, Mapping) or format not in ROW_KEYS:
        return {}
    usage = {str(key): key in ROW_KEYS[format] for key in value}
    known = MESSAGE_KEYS | ({"from", "value"} if format == "sharegpt" else set())
    for name in MESSAGE_LISTS.get(format, ()):
        usage.update({f"{name}[].{key}": key in known for key in _message_keys(value.get(name))})
    return usage


def _message_keys(items: Any) -> set[Any]:
    """The keys any message of a list holds (a row counts once per key, however many of its messages hold it)."""
    if not isinstance(items, list):
        return set()
    if all(type(item) is dict for item in items):  # the JSON readers' messages: no ABC check per message
        return set().union(*items)
    return {key for item in items if isinstance(item, Mapping) for key in item}


class FieldTally:
    """Counts, row by row as a reader streams them, how many rows hold each field and whether `format` (auto:
    detected from the first readable row) reads it, so the pass that encodes the rows reports them too."""

    def __init__(self, format: str = "auto") -> None:
        self.counts: dict[str, list[Any]] = {}
        self.chosen = None if format == "auto" else format

    def add(self, row: Row) -> None:
        if row.error is not None:
            return
        self.chosen = self.chosen or detect_format(row.value)
        if self.chosen is None:
            return
        for name, used in field_usage(row.value, self.chosen).items():
            self.counts.setdefault(name, [0, used])[0] += 1

    def tallied(self, rows: Iterable[Row]) -> Iterator[Row]:
        """The rows unchanged, each counted as it passes."""
        for row in rows:
            self.add(row)
            yield row

    def report(self) -> dict[str, dict[str, Any]]:
        return {name: {"rows": rows, "used": used} for name, (rows, used) in sorted(self.counts.items())}


def field_report(source: str | Path | Iterable[Row], format: str = "auto", *,
                 max_row_bytes: int | None = None) -> dict[str, dict[str, Any]]:
    """How many rows of a file (or of a stream of rows) hold each field, and whether the reader uses it:
    {"tools": {"rows": 1200, "used": True}, "metadata": {"rows": 50, "used": False}}. Unreadable rows and
    rows over `max_row_bytes` are skipped (they are rejected, and counted, by the reader)."""
    tally = FieldTally(format)
    rows = iter_rows(source, max_row_bytes=max_row_bytes) if isinstance(source, (str, Path)) else source
    for row in rows:
        tally.add(row)
    return tally.report()
