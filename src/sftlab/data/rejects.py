"""The log of rows that did not become training examples: nothing is dropped without a trace.

Each rejected row is written to rejects.jsonl as {"where", "reason", "message", "row"}, where `row` is
the raw text of the input row, so it can be fixed and fed back.

The log never deletes or truncates what it did not write: an existing path is replaced only when it is a
rejects log itself (its first line is such a record) — anything else (a data file, a directory, a device,
a symlink, an input of the command) is refused before anything is read. The log is written beside its
place and renamed in when closed; the scratch of a killed run is removed by the next one.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from sftlab.data.schema import Conversation, message_record
from sftlab.errors import ConfigError
from sftlab.files import remove_stale_scratch

RECORD_START = '{"where": '
"""How every line of a rejects log begins (json.dumps keeps the record's key order)."""


class RejectLog:
    """Counts rejected rows by reason and, given a path, writes each one (created on the first reject)."""

    def __init__(self, path: str | Path | None = None, *, inputs: Iterable[str | Path | None] = ()) -> None:
        self.path = check_path(path, inputs=inputs) if path is not None else None
        self.counts: Counter[str] = Counter()
        self._file: IO[str] | None = None
        self._scratch: Path | None = None
        if self.path is not None:
            remove_stale_scratch(self.path)

    def add(self, *, where: str, reason: str, message: str, row: str | None) -> None:
        self.counts[reason] += 1
        if self.path is None:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._scratch = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            # backslashreplace: a lone surrogate (from a JSON escape) is written as its JSON escape again
            self._file = self._scratch.open("x", encoding="utf-8", errors="backslashreplace")
        record = {"where": where, "reason": reason, "message": message, "row": row}
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def close(self) -> None:
        """Put the log in place; with no rejects, an earlier run's log there (stale: it would mislead) goes."""
        if self._file is not None:
            self._file.close()
            self._file = None
            os.replace(self._scratch, self.path)
        elif self.path is not None and self.path.is_file() and not self.path.is_symlink() and is_rejects_log(self.path):
            self.path.unlink()
        self.path = None  # closed: a second close does nothing

    def __enter__(self) -> RejectLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # after a failure too: the rows rejected before it are worth seeing


def check_path(path: str | Path, *, inputs: Iterable[str | Path | None] = ()) -> Path:
    """`path` as a place to write a rejects log, or a ConfigError: it must be new or an earlier rejects log —
    never a directory, a device, a symlink, an input of the command (`inputs`), or any other file."""
    path = Path(path)
    for given in inputs:
        if given is not None and Path(given).exists() and _same(path, Path(given)):
            raise ConfigError(f"--rejects {path} is {given}, an input of this command: writing the rejects there "
                              "would destroy it. Give --rejects a new file, e.g. "
                              f"{path.with_name(path.stem + '.rejects.jsonl')}.")
    if path.is_symlink():
        raise ConfigError(f"--rejects {path} is a symlink (to {os.readlink(path)}); it is never written through. "
                          "Give --rejects a new file.")
    if not path.exists():
        return path
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise ConfigError(f"--rejects {path} is {kind}; give --rejects a file path (new, or an earlier rejects log).")
    if not is_rejects_log(path):
        raise ConfigError(f"--rejects {path} exists and is not a rejects log sftlab wrote; it is never replaced. "
                          "Give --rejects a new file, or move that one away.")
    return path


def is_rejects_log(path: Path) -> bool:
    """Whether a file is a rejects log (it starts with one of sftlab's records): only its first bytes are read."""
    try:
        with path.open("rb") as file:
            head = file.read(len(RECORD_START))
    except OSError:
        return False
    return head == RECORD_START.encode()


def _same(path: Path, other: Path) -> bool:
    try:
        return (path.exists() and os.path.samefile(path, other)) or path.resolve() == other.resolve()
    except OSError:
        return False


def conversation_row(conversation: Conversation) -> str:
    """A conversation as a messages-format row, so a rejected one can be fixed and fed back."""
    row: dict[str, Any] = {"messages": [message_record(m) for m in conversation.messages]}
    if conversation.tools is not None:
        row["tools"] = list(conversation.tools)
    return json.dumps(row, ensure_ascii=False)
