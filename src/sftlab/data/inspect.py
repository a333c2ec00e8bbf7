"""Views of encoded examples for `sftlab inspect`: marked text, JSON lines, and an HTML page.

Text view: the decoded conversation with trained spans highlighted (colour), or wrapped in `[[...]]` when
colour is off — the golden-file notation used by the tests. In colour (and in HTML) reasoning, tool calls
and tool results have colours of their own, trained or not, so a glance shows what a tool-calling turn trains.
"""

from __future__ import annotations

import html
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from sftlab.data.encode import IGNORE_INDEX, ROLE_CODES, Encoded, Example
from sftlab.errors import DataError

OPEN, CLOSE = "[[", "]]"


def runs(example_ids: Sequence[int], labels: Sequence[int]) -> list[tuple[bool, list[int]]]:
    """Maximal runs of consecutive tokens with the same trained flag: [(trained, ids), ...]."""
    out: list[tuple[bool, list[int]]] = []
    for token, label in zip(example_ids, labels):
        trained = label != IGNORE_INDEX
        if out and out[-1][0] == trained:
            out[-1][1].append(token)
        else:
            out.append((trained, [token]))
    return out


ROLE_STYLES = {"reasoning": ("black on cyan", "cyan"), "tool_call": ("black on yellow", "yellow"),
               "tool": ("black on magenta", "magenta")}
"""(trained, untrained) terminal styles of the roles shown apart; others: black on green / dim."""
ROLE_NAMES = {code: role for role, code in ROLE_CODES.items()}


def role_runs(encoded: Encoded) -> list[tuple[bool, str, list[int]]]:
    """Maximal runs of tokens with the same trained flag and role: [(trained, role, ids), ...]."""
    out: list[tuple[bool, str, list[int]]] = []
    for token, label, code in zip(encoded.example.input_ids, encoded.example.labels, encoded.roles):
        key = (label != IGNORE_INDEX, ROLE_NAMES.get(code, ""))
        if out and out[-1][:2] == key:
            out[-1][2].append(token)
        else:
            out.append((*key, [token]))
    return out


def marked_text(encoded: Encoded, tokenizer: Any) -> str:
    """The decoded example with each trained run wrapped in [[...]]."""
    parts = []
    for trained, ids in runs(encoded.example.input_ids, encoded.example.labels):
        text = _decode(tokenizer, ids)
        parts.append(f"{OPEN}{text}{CLOSE}" if trained else text)
    return "".join(parts)


def example_record(example: Example, tokenizer: Any) -> dict[str, Any]:
    """One example as `--format json` writes it: where, input_ids, labels and each token's text."""
    return {"where": example.where, "input_ids": example.input_ids, "labels": example.labels,
            "tokens": [_decode(tokenizer, [token]) for token in example.input_ids]}


def tokens_html(record: dict[str, Any]) -> str:
    """An example_record as HTML: one <span> per token, class "t on" if trained, "t off" if not (plus
    "r-reasoning" / "r-tool_call" / "r-tool" where the record has roles), titled with its position and id
    (styled by TOKEN_CSS). Shared by the inspect page and the run report."""
    spans = []
    roles = record.get("roles") or [""] * len(record["tokens"])
    for position, (text, token, label, role) in enumerate(zip(record["tokens"], record["input_ids"],
                                                               record["labels"], roles)):
        css = "t on" if label != IGNORE_INDEX else "t off"
        css += f" r-{role}" if role in ROLE_STYLES else ""
        spans.append(f'<span class="{css}" title="#{position} id {token}">{html.escape(text)}</span>')
    return "".join(spans)


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _summary(encoded: Encoded) -> str:
    labels = encoded.example.labels
    trained = sum(1 for label in labels if label != IGNORE_INDEX)
    cut = ", truncated" if encoded.truncated else ""
    return f"{len(labels)} tokens, {trained} trained{cut}"


def write(results: Iterable[Encoded | DataError], tokenizer: Any, *, fmt: str = "text",
          output: str | Path | None = None, color: bool = True) -> None:
    """Write the examples (and the rows refused, with their reason) in `fmt` to `output` or stdout."""
    results = list(results)
    if fmt == "html":
        page = _html(results, tokenizer)
        if output:
            Path(output).write_text(page, encoding="utf-8")
        else:
            sys.stdout.write(page)
        return
    with (Path(output).open("w", encoding="utf-8") if output else _stdout()) as stream:
        if fmt == "json":
            _json_lines(results, tokenizer, stream)
        else:
            _text(results, tokenizer, stream, color=color and output is None and stream.isatty())


class _stdout:
    def __enter__(self) -> IO[str]:
        return sys.stdout

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()


def _json_lines(results: list[Encoded | DataError], tokenizer: Any, stream: IO[str]) -> None:
    for result in results:
        if isinstance(result, DataError):
            record: dict[str, Any] = {"where": result.where, "error": result.detail, "reason": result.reason}
        else:
            record = example_record(result.example, tokenizer)
        stream.write(json.dumps(record, ensure_ascii=False) + "\n")


def _text(results: list[Encoded | DataError], tokenizer: Any, stream: IO[str], *, color: bool) -> None:
    from rich.console import Console
    from rich.text import Text

    console = Console(file=stream, force_terminal=color, no_color=not color, highlight=False,
                      soft_wrap=True, width=10_000 if not color else None)
    for result in results:
        if isinstance(result, DataError):
            console.print(Text(f"── {result.where}: refused ({result.reason}): {result.detail}", style="red"))
            continue
        console.print(Text(f"── {result.example.where}: {_summary(result)}", style="bold"))
        if not color:
            console.print(Text(marked_text(result, tokenizer)))
            continue
        body = Text()
        for trained, role, ids in role_runs(result):
            styles = ROLE_STYLES.get(role, ("black on green", "dim"))
            body.append(_decode(tokenizer, ids), style=styles[0] if trained else styles[1])
        console.print(body)


TOKEN_CSS = """pre { white-space: pre-wrap; word-break: break-word; font-size: 13px; line-height: 1.6; }
.t { border-right: 1px solid #eee; }
.on { background: #c8f7c5; }
.off { color: #777; }
.on.r-reasoning { background: #b9ecf5; } .off.r-reasoning { color: #0a7d8c; }
.on.r-tool_call { background: #f7e7a1; } .off.r-tool_call { color: #8a6d00; }
.off.r-tool { color: #a0309a; }"""
"""The styles tokens_html's spans need."""

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>sftlab inspect</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; max-width: 72rem; }}
.example {{ border: 1px solid #ddd; border-radius: 6px; margin: 1rem 0; padding: .5rem 1rem; }}
.head {{ font-weight: 600; color: #333; }}
{token_css}
.err {{ color: #b00; }}
</style></head><body>
<h1>sftlab inspect</h1>
<p>Green tokens are trained (their labels are the token ids); grey tokens are ignored by the loss.
Reasoning is blue, tool calls yellow, tool results purple (a background when trained, the text's colour
when not). Hover a token for its id and position.</p>
{body}
</body></html>
"""


def _html(results: list[Encoded | DataError], tokenizer: Any) -> str:
    blocks = []
    for result in results:
        if isinstance(result, DataError):
            blocks.append(f'<div class="example err">{html.escape(result.where)}: refused '
                          f'({html.escape(result.reason)}): {html.escape(result.detail)}</div>')
            continue
        record = example_record(result.example, tokenizer)
        record["roles"] = [ROLE_NAMES.get(code, "") for code in result.roles]
        spans = tokens_html(record)
        blocks.append(f'<div class="example"><div class="head">{html.escape(result.example.where)} — '
                      f'{_summary(result)}</div><pre>{spans}</pre></div>')
    return _PAGE.format(body="\n".join(blocks), token_css=TOKEN_CSS)
