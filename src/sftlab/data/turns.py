"""Where each assistant turn of a tool-calling or reasoning conversation sits in its render, exactly.

A template renders an assistant turn from more than its content: the reasoning wrapped in think tags,
the tool calls in the template's own syntax (`<tool_call>{...}</tool_call>`, `{"name": ..., "parameters":
...}`, `[TOOL_CALLS]...`). Sentinels in the content alone cannot find that text, so each trained turn k
is found by difference: render the conversation again with turn k's fields replaced by two sentinels
(content X; reasoning Y when it has one; no tool calls). Everything before the first difference and
after the last one is text both renders share: the context, the role header, and what the template
inserts whatever the model writes (an empty think block). What differs is the text the model generates
at that turn. Because X and Y hold a character absent from the real render, the differences end exactly
at them; the alternative render's differing text must be exactly `[Y ... ]X`, or the template's change
reaches outside the turn and the conversation is refused naming the turn. With rendered reasoning the
turn starts right after the role header (its think tags are the model's to write); the end-of-turn
marker that closes the turn is trained with it.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import TYPE_CHECKING, Any

from sftlab.data.schema import Conversation, Message
from sftlab.errors import DataError

if TYPE_CHECKING:
    from sftlab.data.templates import ChatTemplate

Span = tuple[int, int, str, bool, bool]
"""(start, end, role, trainable, content) of a located piece of the render; role is a message role,
'reasoning' or 'tool_call'; content is True for text the row wrote (a content, reasoning, a tool call's name
and arguments), False for the template's own (think tags, tool-call syntax, the end-of-turn marker), so
special-token strings the row wrote stay text (Segment.content)."""
_MARK = "\ue000"
"""A private-use character: a sentinel starts and ends with it, and a real render never holds it."""
_TOKEN = secrets.token_hex(4)
_SENTINEL = re.compile(f"{_MARK}([CR])(\\d+)\\.{_TOKEN}{_MARK}")
"""A sentinel of the all-turns render: C (content) or R (reasoning), then the message index."""


def locate_spans(template: ChatTemplate, conversation: Conversation, dicts: list[dict[str, Any]], text: str,
                 flags: Sequence[bool], *, max_chars: int | None = None) -> list[Span]:
    """Spans of every trained assistant turn (split into reasoning / content / tool calls / marker) and,
    for the report only, of the other messages' contents found between them. `max_chars` caps each render
    with sentinels (default: as render_text measures its inputs)."""
    messages, where = conversation.messages, conversation.where
    if _MARK in text:
        raise DataError("the row holds the private-use character U+E000, which sftlab uses to locate turns; "
                        "remove it from the row.", where=where, reason="template changes content")
    for index, message in enumerate(messages):
        if flags[index] and message.role != "assistant":
            raise DataError(f"message {index + 1} ({message.role}) is marked to be trained, but in a tool-calling "
                            "or reasoning conversation only assistant turns are trained (tool results, schemas "
                            "and prompts never). Remove its \"train\": true or use data.train_on=all.",
                            where=where, reason="trained message not assistant")
    trained = [i for i, flag in enumerate(flags) if flag]
    regions = _regions_at_once(template, conversation, dicts, text, trained, max_chars) if trained else {}
    turns: dict[int, list[Span]] = {}
    pos = 0
    for index in trained:
        region = regions[index] if regions else _region_alone(template, conversation, dicts, text, index, max_chars)
        turns[index] = _turn(template, conversation, text, index, region, pos)
        pos = turns[index][-1][1]
    return _with_untrained(text, messages, turns)


def _with_untrained(text: str, messages: Sequence[Message], turns: dict[int, list[Span]]) -> list[Span]:
    """The trained turns plus, between them, the untrained messages' contents where they are found."""
    spans: list[Span] = []
    pos = 0
    for index, message in enumerate(messages):
        if index in turns:
            spans += turns[index]
            pos = turns[index][-1][1]
            continue
        limit = next((turns[k][0][0] for k in sorted(turns) if k > index), len(text))
        found = _find_content(text, message, pos)
        if found is not None and found[1] <= limit:
            spans.append((found[0], found[1], message.role, False, True))
            pos = found[1]
    return spans


def _find_content(text: str, message: Message, pos: int) -> tuple[int, int] | None:
    """Where an untrained message's content first appears from `pos` (its colour in reports; masks never
    depend on it)."""
    for form in (message.content, message.content.strip()):
        start = text.find(form, pos) if form else -1
        if start >= 0:
            return start, start + len(form)
    return None


@dataclass(frozen=True)
class _Region:
    """Where a turn's generated text lies in the real render: text[head:end], with its reasoning rendered
    (then `between` is the template text between reasoning and content) or not."""
    head: int
    end: int
    rendered_reasoning: bool
    between: str


def _regions_at_once(template: ChatTemplate, conversation: Conversation, dicts: list[dict[str, Any]], text: str,
                     trained: list[int], max_chars: int | None) -> dict[int, _Region] | None:
    """All trained turns from one render with every trained turn replaced by sentinels, or None when the
    two renders do not line up unambiguously (then each turn is located by its own render).

    The variant reads O_0 [R_1 m_1] C_1 O_1 ... C_n O_n; the real render must read O_0 G_1 O_1 ... G_n O_n.
    A middle O_j must start with an end-of-turn marker (after whitespace) and G_j hold none, so the first
    O_j after G_j's start is the one that closes it: the split is exact, never a guess."""
    variant = list(dicts)
    for index in trained:
        variant[index] = {"role": "assistant", "content": f"{_MARK}C{index}.{_TOKEN}{_MARK}"}
        if conversation.messages[index].reasoning is not None:
            variant[index]["reasoning_content"] = f"{_MARK}R{index}.{_TOKEN}{_MARK}"
    other = template.render_text(variant, where=conversation.where, tools=conversation.tools,
                                 max_chars=max_chars)
    pieces = _SENTINEL.split(other)  # literal, kind, index, literal, ...
    literals, marks = pieces[0::3], list(zip(pieces[1::3], (int(i) for i in pieces[2::3])))
    expected = [m for i in trained for m in ([("R", i)] if ("R", i) in marks else []) + [("C", i)]]
    if marks != expected or not text.startswith(literals[0]):
        return None
    regions: dict[int, _Region] = {}
    head, k = len(literals[0]), 0
    for number, index in enumerate(trained):
        between = ""
        if marks[k] == ("R", index):
            between, k = literals[k + 1], k + 1
        after, k = literals[k + 1], k + 1
        if number == len(trained) - 1:
            end = len(text) - len(after)
            if not text.endswith(after) or end < head:
                return None
        else:
            end = text.find(after, head)
            if end < 0 or not after.lstrip().startswith(template.end_of_turn) or \
                    any(marker in text[head:end] for marker in template.end_of_turn):
                return None
        regions[index] = _Region(head, end, bool(between) or ("R", index) in marks, between)
        head = end + len(after)
    return regions


def _region_alone(template: ChatTemplate, conversation: Conversation, dicts: list[dict[str, Any]], text: str,
                  index: int, max_chars: int | None) -> _Region:
    """One turn by difference: its fields replaced by sentinels, the rest of the render must not change."""
    message, where = conversation.messages[index], conversation.where
    content_mark, reasoning_mark = f"{_MARK}C{_TOKEN}{_MARK}", f"{_MARK}R{_TOKEN}{_MARK}"
    variant: dict[str, Any] = {"role": "assistant", "content": content_mark}
    if message.reasoning is not None:
        variant["reasoning_content"] = reasoning_mark
    other = template.render_text(dicts[:index] + [variant] + dicts[index + 1:], where=where,
                                 tools=conversation.tools, max_chars=max_chars)
    first, last = other.find(_MARK), other.rfind(_MARK) + 1
    head = first if text.startswith(other[:first]) else _common_prefix(text, other)
    tail = len(other) - last if text.endswith(other[last:]) and len(other) - last <= len(text) - head \
        else _common_suffix(text, other, limit=min(len(text), len(other)) - head)
    changed = other[head:len(other) - tail]
    rendered_reasoning = changed.startswith(reasoning_mark)
    if not changed.endswith(content_mark) or (changed != content_mark and not rendered_reasoning):
        raise _unlocatable(template, index, where, "what the template renders for it changes text outside the "
                           "turn (or it transforms the content)")
    between = changed[len(reasoning_mark):-len(content_mark)] if rendered_reasoning else ""
    return _Region(head, len(text) - tail, rendered_reasoning, between)


def _turn(template: ChatTemplate, conversation: Conversation, text: str, index: int, region: _Region,
          pos: int) -> list[Span]:
    """The located turn checked (rendered whole, closed by its marker) and cut into its pieces."""
    message, where = conversation.messages[index], conversation.where
    start, head, end = region.head, region.head, region.end
    if start < pos:
        raise _unlocatable(template, index, where, "it overlaps the turn before it")
    if region.rendered_reasoning:
        start = _after_header(template, text, pos, head, index, where)
    _check_rendered(template, message, text[head:end], index, where)
    closing = template._eot_after(text, end, len(text))
    if closing is None:
        raise DataError(f"message {index + 1} (assistant) is trained but the chat template puts no end-of-turn "
                        "marker after it, so the model would never learn to stop. Use a template that closes "
                        "every turn.", where=where, reason="no end-of-turn marker")
    return _turn_pieces(text, message, start, head, end, closing, region.between if region.rendered_reasoning else "")


def _after_header(template: ChatTemplate, text: str, pos: int, head: int, index: int, where: str) -> int:
    """Start of a turn with rendered reasoning: right after the role header that opens it, so the think
    tags before the reasoning are trained as the model writes them."""
    header = template.generation_header()
    found = text.rfind(header, pos, head) if header else -1
    if found < 0:
        raise _unlocatable(template, index, where, "its reasoning is rendered but the role header that opens "
                           "the turn (the generation prompt) cannot be found before it")
    return found + len(header)


def _check_rendered(template: ChatTemplate, message: Message, region: str, index: int, where: str) -> None:
    """Refuse a turn the template renders without its content or a tool call: training it would teach
    the model an empty or wrong turn."""
    if not region.strip():
        raise _unlocatable(template, index, where, "the template renders it as nothing (no content, no tool "
                           "call text)")
    if message.content.strip() and message.content.strip() not in region:
        raise _unlocatable(template, index, where, "the template drops its content (e.g. it renders only the "
                           "tool call of a message that has both); move the text to its own message")
    for call in message.tool_calls:
        if call.name not in region:
            raise _unlocatable(template, index, where, f"the template renders its tool call {call.name!r} as "
                               "nothing (it may expect another tool-call shape, or support fewer calls)")


def _turn_pieces(text: str, message: Message, start: int, head: int, end: int, closing: int,
                 between: str) -> list[Span]:
    """The located turn split for reports: reasoning (with its tags), content, tool calls, end marker;
    all trained."""
    pieces: list[Span] = []
    content_at = head
    if between:
        after = text.find(between, head)
        content_at = after + len(between) if after >= 0 else head
        reasoning = message.reasoning or ""
        found = _find_written(text, (reasoning, reasoning.strip("\n"), reasoning.strip()), start, content_at)
        pieces += _written_pieces(start, content_at, "reasoning", [found] if found else [])
    content_end = content_at
    for form in (message.content, message.content.strip(), message.content.lstrip()):
        if form and text.startswith(form, content_at) and content_at + len(form) <= end:
            content_end = content_at + len(form)
            break
    pieces.append((content_at, content_end, "assistant", True, True))
    pieces += _written_pieces(content_end, end, "tool_call", _call_ranges(text, message, content_end, end))
    pieces.append((end, closing, "assistant", True, False))
    return [p for p in pieces if p[1] > p[0]] or [(start, closing, "assistant", True, False)]


def _written_pieces(start: int, end: int, role: str, written: Sequence[tuple[int, int]]) -> list[Span]:
    """text[start:end] as trained pieces of one role, those at `written` (sorted, inside) marked content."""
    pieces: list[Span] = []
    pos = start
    for a, b in written:
        pieces += [(pos, a, role, True, False), (a, b, role, True, True)]
        pos = b
    pieces.append((pos, end, role, True, False))
    return [p for p in pieces if p[1] > p[0]]


def _call_ranges(text: str, message: Message, start: int, end: int) -> list[tuple[int, int]]:
    """Where the row's own strings of the tool calls (names, argument keys and values) lie in the
    template's tool-call text[start:end]: each call's name searched after the last, its arguments' strings
    after its name, in the forms a template writes them (as given, or JSON-escaped)."""
    ranges: list[tuple[int, int]] = []
    pos = start
    for call in message.tool_calls:
        name = _find_written(text, _forms(call.name), pos, end)
        if name is None:
            continue
        ranges.append(name)
        pos = name[1]
        for value in _strings(call.arguments):
            found = _find_written(text, _forms(value), pos, end)
            if found is not None:
                ranges.append(found)
    return _merged(ranges)


def _strings(value: Any) -> list[str]:
    """The strings a JSON value holds, keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def _forms(value: str) -> tuple[str, ...]:
    """A string as a template may write it: as given, JSON-escaped (tojson), ASCII-escaped."""
    return tuple(dict.fromkeys((value, encode_basestring(value)[1:-1], encode_basestring_ascii(value)[1:-1],
                                value.strip())))  # what json.dumps(value, ensure_ascii=False / True) gives


def _find_written(text: str, forms: Sequence[str], start: int, end: int) -> tuple[int, int] | None:
    """The first of `forms` found in text[start:end], as (start, end)."""
    for form in forms:
        found = text.find(form, start, end) if form else -1
        if found >= 0:
            return found, found + len(form)
    return None


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _unlocatable(template: ChatTemplate, index: int, where: str, why: str) -> DataError:
    return DataError(f"chat template {template.name!r}: the text of message {index + 1} (assistant) cannot be "
                     f"located exactly: {why}. The turn is refused, not guessed. Use another template (e.g. a "
                     ".jinja file) or mark the message \"train\": false.", where=where, reason="turn not located")


def _common_prefix(a: str, b: str) -> int:
    low, high = 0, min(len(a), len(b))
    while low < high:  # binary search on slices: C-speed compares instead of a Python loop per character
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _common_suffix(a: str, b: str, *, limit: int) -> int:
    low, high = 0, max(limit, 0)
    while low < high:
        middle = (low + high + 1) // 2
        if a[len(a) - middle:] == b[len(b) - middle:]:
            low = middle
        else:
            high = middle - 1
    return low
