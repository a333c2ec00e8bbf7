"""Chat templates: a Conversation -> [Segment(text, trainable)], exact for built-in and real Jinja templates.

The only home of template strings. Every template, built-in or the tokenizer's own, goes through one
mechanism, so the masking rule is implemented once:

1. render the conversation with the real contents -> the text the model sees;
2. render it again with each message's content replaced by a unique sentinel -> where each message sits;
3. put the contents back into the sentinel render (as given, or as the template trimmed them) and require
   the result to equal the real render character for character. Any template that transforms contents
   in another way, drops a trained message or repeats it is refused with a TemplateError/DataError —
   never guessed around;
4. trained = each trainable message's content span + the end-of-turn marker that closes it (after
   optional whitespace the template puts between them). Everything else — system, user, role headers,
   BOS, text the template inserts by itself (dates, default system prompts, empty think blocks) — is not.

Because the whole conversation is rendered once, templates need not be prefix-stable and need no
`{% generation %}` markers.

Tool calling and reasoning (`Conversation.rich`) follow the same rule with one more render per trained
assistant turn (`_locate_turn`): the turn's reasoning, content and tool calls are replaced by two sentinels
and the two renders compared; what differs is exactly the text the model generates at that turn (its
reasoning as the template wraps it, its content, its tool calls), and the end-of-turn marker must follow.
Text the template renders either way (a role header, an empty think block) is template text, never
trained; a template whose change reaches outside the turn, or that renders a content or a tool call as
nothing, is refused naming the turn.

A template is user code (a .jinja file, or whatever a model's tokenizer ships): every render, for training
and for generation, runs in one strict jinja2 sandbox (`_Sandbox`). Reaching for Python internals, changing
a value or running away (huge ranges, endless recursion, giant values) is a TemplateError; a template
refusing or failing on one conversation is a DataError naming that row. A render's total output is capped
(`render_text`'s max_chars: by default the contents + MAX_TEMPLATE_TEXT), streamed and stopped at the cap,
so a template emitting a big value once per row cannot exhaust memory over a dataset either. (Text a
macro or `{% set %}` block builds is bounded by the per-value and loop-step limits, not by the cap.)
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.exceptions import TemplateError as JinjaTemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sftlab.data.schema import TOOL_POOL, Conversation, Message, validate
from sftlab.errors import DataError, TemplateError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@dataclass(frozen=True)
class BuiltinTemplate:
    source: str
    end_of_turn: str
    special_tokens: tuple[str, ...]
    """Tokens the template's markup needs as single (special) tokens in the tokenizer."""


BUILTIN: dict[str, BuiltinTemplate] = {
    "chatml": BuiltinTemplate(CHATML, "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    "llama3": BuiltinTemplate(LLAMA3, "<|eot_id|>", ("<|begin_of_text|>", "<|start_header_id|>",
                                                     "<|end_header_id|>", "<|eot_id|>")),
}

END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|return|>", "<|eom_id|>",
                       "<turn|>", "<|END_OF_TURN_TOKEN|>", "</s>", "<|endoftext|>", "<｜end▁of▁sentence｜>",
                       "<|end_of_text|>", "<eos>")
"""Markers that close a turn in known templates; for `auto`, those the tokenizer has as special tokens
(plus its eos token) are the candidates looked for right after a trained message."""

TRAIN_ON = ("assistant", "last_assistant", "all")


class Segment(NamedTuple):
    """A piece of a render. A named tuple, not a frozen dataclass: a tool-calling row makes ~30 of them and a
    frozen dataclass took twice as long to make."""
    text: str
    trainable: bool
    role: str = ""
    """'system' / 'user' / 'assistant' for a message's content (and its end-of-turn marker), '' for
    template text."""
    content: bool = False
    """True for text that is a message's content (as given or as the template trimmed it): user text, whose
    special-token strings the Encoder keeps as ordinary text; False for the template's own markup."""


class _GenerationTag(Extension):
    """Accepts `{% generation %}...{% endgeneration %}` blocks (TRL/transformers markers) and renders their
    body unchanged: sftlab finds assistant spans itself and needs no markers."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise JinjaTemplateError(message)


MAX_LOOP_STEPS = 1_000_000
"""Most items all `range(...)` calls of one render may hold together: a chat template loops over a few
messages, so a template past this is runaway (e.g. nested loops over range(99999)), refused, not waited on."""
MAX_VALUE_SIZE = 10_000_000
"""Longest string or list `*` may build, and the most bits `**` may give an integer, in a template."""


MAX_TEMPLATE_TEXT = 64 * 1024
"""Most characters a render may hold besides the messages' contents: the template's own text (headers,
markers, a default system prompt) is a few hundred, so past this the template is runaway."""
RENDER_TOO_LONG = "render too long"


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox (no attribute starting with '_', no method that changes a value), made
    strict: an unsafe attribute fails the render at once (jinja2 renders it as an empty string and only
    fails on further use), and `*` / `**` are bounded so a template cannot exhaust memory or the CPU."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        for name in SIZED_FILTERS:  # their size arguments (widths, counts) are bounded like `*`
            self.filters[name] = _bounded_filter(self.filters[name])

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format_string(getattr(value, "__self__", ""))
        return wrapped

    def getattr(self, obj: Any, attribute: str) -> Any:
        """jinja2's lookup, with a shortcut for `message.role` on a plain dict (the commonest lookup of a chat
        template): a name that is no attribute of dict is the key or undefined, exactly as jinja2 ends up after
        raising and catching AttributeError."""
        kind = type(obj)
        if kind is dict and attribute not in _DICT_ATTRIBUTES:
            return obj[attribute] if attribute in obj else self.undefined(obj=obj, name=attribute)
        safe = _SAFE_ATTRIBUTES.get((kind, attribute)) if attribute not in _FORMAT_METHODS else None
        if safe is not None:  # `loop.last`, `content.strip`: jinja2's answer known for this type and name
            try:
                value = getattr(obj, attribute)
            except AttributeError:
                return super().getattr(obj, attribute)
            return value if safe else self.unsafe_undefined(obj, attribute)
        return super().getattr(obj, attribute)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        """jinja2's answer, remembered per (type, attribute) for the plain types templates read: it depends on
        nothing else (the attribute's name, and the object's type against jinja2's type lists and the
        mutable ABCs), and computing it each time was a fifth of a tool template's render."""
        kind = type(obj)
        if kind not in _PLAIN_TYPES:
            return super().is_safe_attribute(obj, attr, value)
        key = (kind, attr)
        known = _SAFE_ATTRIBUTES.get(key)
        if known is None:
            known = _SAFE_ATTRIBUTES[key] = super().is_safe_attribute(obj, attr, value)
        return known

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"access to attribute {attribute!r} of an object of type {type(obj).__name__!r} is "
                            "unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            sequence, count = (left, right) if isinstance(right, int) else (right, left)
            if (isinstance(sequence, (str, list, tuple)) and isinstance(count, int)
                    and len(sequence) * count > MAX_VALUE_SIZE):
                raise SecurityError(f"'*' would build a value of more than {MAX_VALUE_SIZE} items")
        elif operator == "%":
            _check_format_string(left)
        elif (isinstance(left, int) and isinstance(right, int) and right > 0
              and abs(left).bit_length() * right > MAX_VALUE_SIZE):
            raise SecurityError(f"'**' would build an integer of more than {MAX_VALUE_SIZE} bits")
        return super().call_binop(context, operator, left, right)


_DICT_ATTRIBUTES = frozenset(dir(dict))
_PLAIN_TYPES = frozenset({str, dict, list, tuple, int, float, bool, type(None), LoopContext})
_SAFE_ATTRIBUTES: dict[tuple[type, str], bool] = {}
"""_Sandbox.is_safe_attribute's answers for _PLAIN_TYPES; once known, getattr skips jinja2's checks for that type
and name (its str.format wrapping applies to `format` and `format_map` only, which never take the shortcut)."""
_FORMAT_METHODS = frozenset({"format", "format_map"})
SIZED_FILTERS = ("center", "indent", "wordwrap", "batch", "slice", "format")
"""Filters whose arguments say how big a result to build (a width, a line or slice count, a format string)."""
_HUGE_WIDTH = re.compile(r"[%:][^a-zA-Z%{}]*?\d{8,}")
"""A %-format or str.format spec with a width or precision of 10,000,000 or more."""


def _check_format_string(text: Any) -> None:
    if isinstance(text, str) and _HUGE_WIDTH.search(text):
        raise SecurityError(f"the format string {text[:40]!r} asks for a field of more than {MAX_VALUE_SIZE} "
                            "characters")


def _bounded_filter(function: Any) -> Any:
    @functools.wraps(function)  # keeps jinja's pass_context / pass_eval_context marks
    def bounded(*args: Any, **kwargs: Any) -> Any:
        # Sizes are ints after the filtered value (a passed environment / context comes first: ints never).
        for value in (*args[1:], *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_VALUE_SIZE:
                raise SecurityError(f"the {function.__name__} filter was asked for a size of {value}, more than "
                                    f"{MAX_VALUE_SIZE}")
        if function.__name__ == "do_format" and args:  # `'%9d'|format(x)`: the value is the format string
            _check_format_string(args[0])
        return function(*args, **kwargs)

    return bounded


def _bounded_range() -> Any:
    """A `range` for one render: all the ranges it makes hold at most MAX_LOOP_STEPS items together."""
    left = MAX_LOOP_STEPS

    def bounded_range(*args: int) -> range:
        nonlocal left
        items = range(*args)
        try:
            size = len(items)
        except OverflowError:  # more items than len() can count
            size = sys.maxsize
        if size > left:
            raise SecurityError(f"a range of {size} items would take the template past {MAX_LOOP_STEPS} loop "
                                "steps in one render")
        left -= size
        return items

    return bounded_range


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


JSON_MEMO = 256
"""Most values `_JsonMemo` remembers (then it starts again): a few conversations' tools and tool arguments."""


class _JsonMemo:
    """`tojson` of the same object again (a row's tool schemas and call arguments: each conversation is rendered
    twice, as itself and with sentinels) from a memo keyed by the object's identity. It holds each object, so
    an id is never reused while remembered; rows and the values templates see are never changed in place (the
    sandbox is immutable), so an object's JSON cannot change either."""

    def __init__(self) -> None:
        self._memo: dict[tuple[int, Any], tuple[Any, str]] = {}

    def __call__(self, value: Any, ensure_ascii: bool = False, indent: int | None = None,
                 separators: Any = None, sort_keys: bool = False) -> str:
        if not isinstance(value, (dict, list, tuple)):
            return _tojson(value, ensure_ascii, indent, separators, sort_keys)
        try:
            key = (id(value), (ensure_ascii, indent, separators, sort_keys))
            hash(key)
        except TypeError:  # unhashable separators: not remembered
            return _tojson(value, ensure_ascii, indent, separators, sort_keys)
        found = self._memo.get(key)
        if found is not None and found[0] is value:
            return found[1]
        text = _tojson(value, ensure_ascii, indent, separators, sort_keys)
        if len(self._memo) >= JSON_MEMO:
            self._memo.clear()
        self._memo[key] = (value, text)
        return text


class ChatTemplate:
    """A compiled Jinja chat template plus what sftlab needs to mask it: end-of-turn markers and the
    special-token variables (bos_token, eos_token, ...) the template may use."""

    def __init__(self, source: str, *, name: str, end_of_turn: Sequence[str],
                 variables: Mapping[str, Any] | None = None, special_tokens: Sequence[str] = (),
                 clock: datetime | None = None) -> None:
        env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag])
        env.filters["tojson"] = _JsonMemo()
        now = clock or datetime.now()  # one clock per template: renders of one dataset agree on "today"
        self._clock = now
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = now.strftime
        self._globals: dict[str, Any] | None = None  # the compiled template's globals, copied on first render
        try:
            self._compiled = env.from_string(source)
        except JinjaTemplateError as exc:
            raise TemplateError(f"chat template {name!r} is not valid Jinja: {exc}") from None
        except RecursionError:
            raise TemplateError(f"chat template {name!r} nests expressions or blocks too deeply to compile; "
                                "expected an ordinary chat template. Simplify the template.") from None
        self.source = source
        self.name = name
        self.end_of_turn = tuple(sorted(set(end_of_turn), key=len, reverse=True))
        self.special_tokens = tuple(special_tokens)
        self.variables = dict(variables or {})
        self._sentinel = f"@@SFTLAB{secrets.token_hex(6)}M"
        self._sentinel_re = re.compile(re.escape(self._sentinel) + r"(\d+)@@")
        self._marked_cache: dict[tuple[str, ...], str] = {}
        self.reasons = "reasoning_content" in source or "</think>" in source
        """Whether the template renders reasoning (reads `reasoning_content` or splits `<think>` blocks)."""
        self._header: str | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as what compiles it again, its clock included (an encoding worker renders the same dates)."""
        return (_rebuild_template, (self.source, self.name, self.end_of_turn, self.variables, self.special_tokens,
                                    self._clock))

    def render_text(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                    where: str = "", max_chars: int | None = None, tools: Sequence[Any] | None = None) -> str:
        """The template's plain render, as `tokenizer.apply_chat_template(..., tokenize=False)` gives it; a
        DataError (reason RENDER_TOO_LONG) once it passes `max_chars` characters (default: the contents'
        length + MAX_TEMPLATE_TEXT)."""
        if max_chars is None:
            max_chars = _input_chars(messages, tools) + MAX_TEMPLATE_TEXT
        try:
            return self._capped(max_chars, where, messages=list(messages), add_generation_prompt=add_generation_prompt,
                                tools=None if tools is None else list(tools), documents=None, **self.variables,
                                range=_bounded_range())
        except SecurityError as exc:
            raise TemplateError(
                f"chat template {self.name!r} was stopped by sftlab's sandbox: {exc}. Templates may read the "
                "messages and the special-token variables, but not attributes starting with '_', methods "
                f"that change a value, more than {MAX_LOOP_STEPS} loop steps or values of more than "
                f"{MAX_VALUE_SIZE} items. Remove that expression from the template.") from None
        except _RenderTooLong:
            raise DataError(f"chat template {self.name!r} rendered more than {max_chars:,} characters for the "
                            f"conversation (its contents may take data.max_row_bytes, or the limit derived from "
                            f"data.max_seq_len, plus {MAX_TEMPLATE_TEXT:,} of template text), so it was "
                            "stopped: the template emits runaway text, or the row is too long. Fix the template, "
                            "or shorten the row.", where=where, reason=RENDER_TOO_LONG) from None
        except JinjaTemplateError as exc:
            raise DataError(f"chat template {self.name!r} refused the conversation: {_brief(exc)}",
                            where=where, reason="template refused") from None
        except RecursionError:
            raise TemplateError(f"chat template {self.name!r} recursed too deeply (a macro or a recursive loop "
                                "that does not end?). Fix the template's recursion.") from None
        except Exception as exc:  # broad on purpose: a template is user code: what it raises is reported, no traceback
            raise DataError(f"chat template {self.name!r} failed on the conversation with "
                            f"{type(exc).__name__}: {_brief(exc)}; expected it to render every valid conversation. Fix "
                            "the template or use data.template=chatml or llama3.",
                            where=where, reason="template failed") from None

    def _capped(self, max_chars: int, where: str, **context: Any) -> str:
        """The render, streamed and stopped as soon as it passes `max_chars` characters."""
        pieces: list[str] = []
        size = 0
        for piece in self._generate(context):
            size += len(piece)
            if size > max_chars:
                raise _RenderTooLong(where)
            pieces.append(piece)
        return "".join(pieces)

    def _generate(self, context: dict[str, Any]) -> Iterator[str]:
        """jinja2's `Template.generate`, with the globals copied once per template instead of once per render
        (jinja2 copies its ChainMap of globals into every render's context, twice: a tenth of a render)."""
        compiled = self._compiled
        if self._globals is None:
            self._globals = dict(compiled.globals)
        environment = compiled.environment
        ctx = environment.context_class(environment, {**self._globals, **context}, compiled.name, compiled.blocks,
                                        globals=self._globals)
        try:
            yield from compiled.root_render_func(ctx)
        except Exception:
            yield environment.handle_exception()  # raises, with the template's lines in the traceback

    def render(self, conversation: Conversation, train_on: str = "assistant", *,
               max_chars: int | None = None) -> list[Segment]:
        """Segments whose texts join to the rendered conversation, each marked trainable or not; a render
        of more than `max_chars` characters (default: see `render_text`) is a DataError naming the row."""
        if train_on not in TRAIN_ON:
            raise TemplateError(f"data.train_on must be one of {', '.join(TRAIN_ON)}; found {train_on!r}")
        conversation = self.with_inline_reasoning(validate(conversation))  # a hand-built one may hold anything
        if conversation.rich:
            return self._render_rich(conversation, train_on, max_chars)
        messages = conversation.messages
        where = conversation.where
        text = self.render_text([_as_dict(m) for m in messages], where=where, max_chars=max_chars)
        marked = self._marked(tuple(m.role for m in messages), where)
        spans = self._content_spans(text, marked, messages, where)
        flags = trainable_flags(messages, train_on)
        return _segments(text, spans, flags, messages, self._eot_after, train_on == "all", where)

    def render_prompt(self, messages: Sequence[Mapping[str, Any]], *, where: str = "",
                      tools: Sequence[Any] | None = None) -> list[Segment]:
        """What `render_text(messages, add_generation_prompt=True, tools=tools)` gives, as untrained segments
        with each message's content marked (Segment.content), so a prompt's contents are tokenised by the
        same rule as training data's: special-token strings typed by a user stay text."""
        parsed = [Message(str(m["role"]), str(m["content"])) for m in messages]
        text = self.render_text(messages, add_generation_prompt=True, where=where, tools=tools)
        roles = tuple(m.role for m in parsed)
        marked = self._marked(roles, where, add_generation_prompt=True) if tools is None else \
            self._sentinel_render(roles, where, add_generation_prompt=True, tools=tools)  # tools: not cached
        spans = self._content_spans(text, marked, parsed, where)
        return _segments(text, spans, [False] * len(parsed), parsed, self._eot_after, False, where)

    def with_inline_reasoning(self, conversation: Conversation) -> Conversation:
        """Inline `<think>...</think>` at the start of an assistant content moved to its reasoning field,
        for a template that renders reasoning (it would split the content itself, which sentinels cannot
        map back); unchanged otherwise."""
        if not self.reasons or not any(m.role == "assistant" and m.reasoning is None and "</think>" in m.content
                                       for m in conversation.messages):
            return conversation
        return replace(conversation, messages=tuple(map(inline_reasoning, conversation.messages)))

    def generation_header(self) -> str:
        """The text the template's generation prompt adds after a user turn (e.g. `<|im_start|>assistant\n`):
        the role header that opens an assistant turn."""
        if self._header is None:
            probe = [{"role": "user", "content": "u"}]
            plain, prompted = self.render_text(probe), self.render_text(probe, add_generation_prompt=True)
            self._header = prompted[len(plain):] if prompted.startswith(plain) else ""
        return self._header

    def _render_rich(self, conversation: Conversation, train_on: str, max_chars: int | None) -> list[Segment]:
        from sftlab.data.turns import locate_spans  # turns builds on this module's renders

        messages = conversation.messages
        if conversation.tools and "tools" not in self.source:
            raise DataError(f"the row has tools, but chat template {self.name!r} does not render tool definitions, "
                            "so the model would be trained to call functions it was never shown. Use the model's "
                            "own template (data.template=auto) or a .jinja template that renders `tools`.",
                            where=conversation.where, reason="template ignores tools")
        dicts = [_as_dict(m) for m in messages]
        text = self.render_text(dicts, where=conversation.where, tools=conversation.tools, max_chars=max_chars)
        flags = trainable_flags(messages, train_on)
        # the renders with sentinels hold less of the row than this one: capped by its length and the usual slack
        spans = locate_spans(self, conversation, dicts, text, flags, max_chars=len(text) + MAX_TEMPLATE_TEXT)
        return _span_segments(text, spans, train_on == "all")

    def _marked(self, roles: tuple[str, ...], where: str, add_generation_prompt: bool = False) -> str:
        """The render with a sentinel for each content: it depends only on the roles (the template's other
        variables and its clock are fixed per template), so it is computed once per role sequence."""
        key = roles + ("+generation prompt",) if add_generation_prompt else roles  # never a role name
        cached = self._marked_cache.get(key)
        if cached is None:
            cached = self._sentinel_render(roles, where, add_generation_prompt=add_generation_prompt)
            if len(self._marked_cache) < 4096:
                self._marked_cache[key] = cached
        return cached

    def _sentinel_render(self, roles: tuple[str, ...], where: str, *, add_generation_prompt: bool = False,
                         tools: Sequence[Any] | None = None) -> str:
        return self.render_text([{"role": role, "content": f"{self._sentinel}{i}@@"} for i, role in enumerate(roles)],
                                add_generation_prompt=add_generation_prompt, where=where, tools=tools)

    def _content_spans(self, text: str, marked: str, messages: Sequence[Message],
                       where: str) -> list[tuple[int, int, int]]:
        """(start, end, message index) of each message content in `text`, in text order."""
        pieces = self._sentinel_re.split(marked)  # literal, index, literal, index, ..., literal
        literals, indices = pieces[0::2], [int(i) for i in pieces[1::2]]
        if not text.startswith(literals[0]):
            raise self._mismatch(where, 0)
        pos, spans = len(literals[0]), []
        for k, index in enumerate(indices):
            after = literals[k + 1]
            last = k == len(indices) - 1
            for emitted in _emitted_forms(messages[index].content):
                end = pos + len(emitted)
                if text.startswith(emitted, pos) and (text[end:] == after if last else text.startswith(after, end)):
                    break
            else:
                raise self._mismatch(where, index)
            spans.append((pos, end, index))
            pos = end + len(after)
        if not indices and text != marked:
            raise self._mismatch(where, 0)
        return spans

    def _mismatch(self, where: str, index: int) -> DataError:
        return DataError(
            f"chat template {self.name!r} transforms message {index + 1}'s content in a way sftlab cannot map "
            "back to the text exactly (it is neither emitted as given nor trimmed), so the trained span "
            "cannot be located. Use data.template=chatml or llama3, or a .jinja template that emits each "
            "content as given.", where=where, reason="template changes content")

    def _eot_after(self, text: str, end: int, limit: int) -> int | None:
        """End of the end-of-turn marker that closes a message ending at `end`, searching only in
        text[end:limit] and allowing whitespace before the marker; None if there is none."""
        gap = end
        while True:
            for marker in self.end_of_turn:
                if text.startswith(marker, gap) and gap + len(marker) <= limit:
                    return gap + len(marker)
            if gap >= limit or not text[gap].isspace():
                return None
            gap += 1


def _rebuild_template(source: str, name: str, end_of_turn: Sequence[str], variables: Mapping[str, Any],
                      special_tokens: Sequence[str], clock: datetime) -> ChatTemplate:
    return ChatTemplate(source, name=name, end_of_turn=end_of_turn, variables=variables,
                        special_tokens=special_tokens, clock=clock)


class _RenderTooLong(Exception):
    """A render passed its cap (an Exception of ours, so the template's own error handling cannot catch it)."""


def _brief(exc: Exception) -> str:
    """An exception's message for ours, cut short: a template may raise with a whole message's content."""
    text = str(exc)
    return text if len(text) <= 300 else text[:300] + "..."


def _emitted_forms(content: str) -> list[str]:
    forms = [content, content.strip(), content.rstrip(), content.lstrip()]
    return [f for i, f in enumerate(forms) if f not in forms[:i]]


def _as_dict(message: Message) -> dict[str, Any]:
    """A message as templates read it (the keys `apply_chat_template` users pass); optional keys only when
    set, since templates test `'tool_calls' in message`."""
    item: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        item["tool_calls"] = [call.as_dict() for call in message.tool_calls]
    if message.reasoning is not None:
        item["reasoning_content"] = message.reasoning
    if message.tool_call_id is not None:
        item["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        item["name"] = message.name
    return item


THINK = re.compile(r"\s*<think>(.*?)</think>\s*", re.DOTALL)


def inline_reasoning(message: Message) -> Message:
    """`<think>R</think>answer` as content -> reasoning R, content `answer` (assistant messages only)."""
    found = THINK.match(message.content) if message.role == "assistant" and message.reasoning is None else None
    if found is None:
        return message
    reasoning = found.group(1).strip("\n")
    return replace(message, content=message.content[found.end():], reasoning=reasoning if reasoning.strip() else None)


def _span_segments(text: str, spans: list[tuple[int, int, str, bool, bool]],
                   template_trained: bool) -> list[Segment]:
    """Segments from located (start, end, role, trainable, content) spans in text order; the gaps are
    template text (trained only under train_on=all)."""
    segments: list[Segment] = []
    pos = 0
    for start, end, role, trainable, content in spans:
        if start > pos:
            segments.append(Segment(text[pos:start], template_trained))
        if end > start:
            segments.append(Segment(text[start:end], trainable or template_trained, role, content))
        pos = max(pos, end)
    if pos < len(text):
        segments.append(Segment(text[pos:], template_trained))
    return segments


def trainable_flags(messages: Sequence[Message], train_on: str) -> list[bool]:
    """Which messages are trained under a policy, after each message's own `train` override."""
    last_assistant = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
    defaults = {
        "assistant": [m.role == "assistant" for m in messages],
        "last_assistant": [i == last_assistant for i in range(len(messages))],
        "all": [True] * len(messages),
    }[train_on]
    return [m.train if m.train is not None else d for m, d in zip(messages, defaults)]


def _segments(text: str, spans: list[tuple[int, int, int]], flags: list[bool], messages: Sequence[Message],
              eot_after: Any, template_trained: bool, where: str) -> list[Segment]:
    seen: dict[int, int] = {}
    for _, _, index in spans:
        seen[index] = seen.get(index, 0) + 1
    for index, flag in enumerate(flags):
        if flag and seen.get(index, 0) != 1:
            how = "drops" if index not in seen else "repeats"
            raise DataError(f"the chat template {how} message {index + 1} ({messages[index].role}), which is "
                            "to be trained, so its tokens cannot be located exactly. Use a built-in "
                            "template (data.template=chatml|llama3) or mark the message \"train\": false.",
                            where=where, reason=f"template {how} a trained message")
    segments: list[Segment] = []
    pos = 0
    for k, (start, end, index) in enumerate(spans):
        if start > pos:
            segments.append(Segment(text[pos:start], template_trained))
        role, flag = messages[index].role, flags[index]
        segments.append(Segment(text[start:end], flag, role, content=True))
        pos = end
        if flag:
            limit = spans[k + 1][0] if k + 1 < len(spans) else len(text)
            closing = eot_after(text, end, limit)
            if closing is None and role != "assistant":
                continue  # a trained system/user message (train_on=all, overrides) may run into the next turn
            if closing is None:
                raise DataError(f"message {index + 1} ({role}) is trained but the chat template puts no "
                                "end-of-turn marker after it, so the model would never learn to stop. Use a "
                                "template that closes every turn (e.g. data.template=chatml).",
                                where=where, reason="no end-of-turn marker")
            segments.append(Segment(text[end:closing], True, role))
            pos = closing
    if pos < len(text):
        segments.append(Segment(text[pos:], template_trained))
    return segments


def load_template(spec: str, tokenizer: Any | None = None) -> ChatTemplate:
    """`chatml`, `llama3`, `auto` (the tokenizer's own chat template) or a path to a .jinja file."""
    variables = _special_token_variables(tokenizer)
    if spec in BUILTIN:
        builtin = BUILTIN[spec]
        return ChatTemplate(builtin.source, name=spec, end_of_turn=(builtin.end_of_turn,),
                            variables=variables, special_tokens=builtin.special_tokens)
    if spec == "auto":
        source = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if isinstance(source, dict):
            source = source.get("default")
        if not source:
            where = getattr(tokenizer, "name_or_path", None) or "the tokenizer"
            raise TemplateError(f"data.template=auto but {where} has no chat template (no chat_template in "
                                "tokenizer_config.json, no chat_template.jinja). Set data.template=chatml or "
                                "llama3 (with data.add_special_tokens=true on a base model) or a .jinja file.")
        name = f"auto ({getattr(tokenizer, 'name_or_path', '') or 'tokenizer'})"
    else:
        path = Path(spec)
        if path.suffix != ".jinja" or not path.is_file():
            raise TemplateError(f"data.template={spec!r}: expected chatml, llama3, auto or an existing .jinja file")
        try:
            source, name = path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as exc:
            raise TemplateError(f"data.template={spec!r}: invalid UTF-8 at byte {exc.start}; expected a UTF-8 "
                                "text file. Re-encode it as UTF-8 (e.g. iconv -t UTF-8).") from None
    return ChatTemplate(source, name=name, end_of_turn=_end_of_turn_candidates(tokenizer), variables=variables)


def _special_token_variables(tokenizer: Any | None) -> dict[str, Any]:
    if tokenizer is None:
        return {"bos_token": "", "eos_token": ""}
    variables = {key: str(value) if isinstance(value, str) else value
                 for key, value in dict(getattr(tokenizer, "special_tokens_map", {}) or {}).items()}
    variables.setdefault("bos_token", "")
    variables.setdefault("eos_token", "")
    return variables


def _end_of_turn_candidates(tokenizer: Any | None) -> tuple[str, ...]:
    if tokenizer is None:
        return END_OF_TURN_MARKERS
    vocab_specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    vocab_specials |= {str(token) for token in decoder.values()}
    found = [m for m in END_OF_TURN_MARKERS if m in vocab_specials]
    eos = getattr(tokenizer, "eos_token", None)
    if eos:
        found.append(str(eos))
    if not found:
        raise TemplateError(f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no end-of-turn "
                            f"token (no eos_token, none of {', '.join(END_OF_TURN_MARKERS)}); the model could "
                            "not learn to stop. Use data.template=chatml with data.add_special_tokens=true.")
    return tuple(found)


def _input_chars(messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None) -> int:
    """How many characters a render's inputs hold (contents, reasoning, tool calls, tool schemas): the part of
    a render's length the row itself brings; the template may add MAX_TEMPLATE_TEXT on top."""
    size = _tools_chars(tools) if tools else 0
    for message in messages:
        for key in ("content", "reasoning_content"):
            if isinstance(message.get(key), str):
                size += len(message[key])
        if message.get("tool_calls"):
            size += len(json.dumps(message["tool_calls"], ensure_ascii=False, default=str))
    return size


_last_tools: tuple[Any, int] = (None, 0)
"""The last tools list measured and its size: a conversation's two renders (itself, with sentinels) pass the
same object. Holding it keeps its id from being reused; rows are never changed in place."""


def _tools_chars(tools: Sequence[Any]) -> int:
    """len(json.dumps(list(tools), ensure_ascii=False)): from the tool pool's sizes where every tool is pooled
    (the readers pool them), else measured."""
    global _last_tools
    last, size = _last_tools
    if last is not tools:
        sizes = [TOOL_POOL.json_size(tool) for tool in tools]
        if None in sizes:
            size = len(json.dumps(list(tools), ensure_ascii=False, default=str))
        else:
            size = sum(sizes) + 2 * len(sizes)  # type: ignore[arg-type]  # "[", "]" and ", " between items
        _last_tools = (tools, size)
    return size
