"""The log of rows that did not become training examples: nothing is dropped without a trace.

Each rejected row is written to rejects.jsonl as {"where", "reason", "message", "row"}, where `row` is
the raw text of the input row, so it can be fixed and fed back.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import IO, Any

from sftlab.data.schema import Conversation, message_record


class RejectLog:
    """Counts rejected rows by reason and, given a path, writes each one (created on the first reject)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.counts: Counter[str] = Counter()
        self._file: IO[str] | None = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)  # a stale file from an earlier run would mislead

    def add(self, *, where: str, reason: str, message: str, row: str | None) -> None:
        self.counts[reason] += 1
        if self.path is None:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # backslashreplace: a lone surrogate (from a JSON escape) is written as its JSON escape again
            self._file = self.path.open("w", encoding="utf-8", errors="backslashreplace")
        record = {"where": where, "reason": reason, "message": message, "row": row}
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "RejectLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def conversation_row(conversation: Conversation) -> str:
    """A conversation as a messages-format row, so a rejected one can be fixed and fed back."""
    row: dict[str, Any] = {"messages": [message_record(m) for m in conversation.messages]}
    if conversation.tools is not None:
        row["tools"] = list(conversation.tools)
    return json.dumps(row, ensure_ascii=False)
